"""`python -m srdit.data.prepare` on a tiny ImageNet-style folder (conftest.py) and on the
release layout: index and shards, skipped files, the item contract, the per-image posterior
seed, cached teacher targets, resume, torchrun, and the real command at 256 px."""
import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from srdit.config import LATENT_SCALE
from srdit.data import ShardDataset, ShardError, center_crop_dhariwal
from srdit.data.prepare import image_seed
from srdit.data.shards import open_shard
from srdit.io import OutputLock, sha256_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
# source listing of the conftest folder: sorted classes, sorted files; 2 unreadable files
SOURCE = (["n01000000/img_0.JPEG", "n01000000/img_1.JPEG", "n01000000/img_2.JPEG", "n01000000/img_3.JPEG",
           "n02000000/bad_garbage.JPEG", "n02000000/img_0.JPEG", "n02000000/img_1.JPEG", "n02000000/img_2.JPEG",
           "n02000000/img_3.JPEG", "n03000000/img_0.JPEG", "n03000000/img_1.JPEG", "n03000000/img_2.JPEG",
           "n03000000/img_3.JPEG", "n03000000/img_9_truncated.JPEG"])
GOOD = [i for i, p in enumerate(SOURCE) if "img_" in p and "truncated" not in p]


def index_of(out):
    with open(os.path.join(out, "index.json")) as f:
        return json.load(f)


def shard_arrays(out):
    """Every shard's tensors concatenated (unscaled latents, source indices, ...)."""
    shards = [open_shard(os.path.join(out, s["file"])) for s in index_of(out)["shards"]]
    return {k: np.concatenate([s[k] for s in shards]) for k in ("latent", "label", "source_index")}


def crop_of(src, i, r=64):
    with Image.open(os.path.join(src, SOURCE[i])) as image:
        return center_crop_dhariwal(image, r)


def test_index_shards_and_summary(prepared, weights):
    out, text = prepared
    index = index_of(out)
    assert index["format"] == "srdit-shards" and index["version"] == 2 and index["resolution"] == 64
    assert index["latent_shape"] == [32, 4, 4]
    assert index["samples"] == 12 and index["skipped"] == 2 and index["source"]["files"] == 14
    assert index["classes"] == ["n01000000", "n02000000", "n03000000"]
    # the default stores the crops as they are (the pixels the release's teacher reads from its PNGs)
    assert index["image"] == {"format": "raw", "dtype": "uint8", "shape": [3, 64, 64], "exact": True}
    assert index["teacher"] is None
    assert index["tokenizer"]["sha256"] == sha256_file(weights["vae"]) and index["latent_scale"] == LATENT_SCALE
    assert [s["file"] for s in index["shards"]] == [f"shard-00000{k}.safetensors" for k in range(4)]
    assert [s["samples"] for s in index["shards"]] == [4, 3, 4, 1]
    for s in index["shards"]:
        path = os.path.join(out, s["file"])
        assert os.path.getsize(path) == s["bytes"] and sha256_file(path) == s["sha256"]
    assert "12 samples in 4 shards" in text and "2 unreadable image(s) skipped" in text and "images/s" in text
    safetensors = pytest.importorskip("safetensors")  # the shards are plain safetensors files
    with safetensors.safe_open(os.path.join(out, "shard-000001.safetensors"), "np") as f:
        assert f.get_tensor("latent").shape == (3, 32, 4, 4) and f.metadata()["format"] == "srdit-shards"
        assert f.get_tensor("image").shape == (3, 3, 64, 64) and f.get_tensor("image").dtype == np.uint8


def test_unreadable_images_are_skipped_counted_and_logged(prepared):
    out, _ = prepared
    with open(os.path.join(out, "skipped.txt")) as f:
        lines = [line.split("\t") for line in f if not line.startswith("#")]
    assert [(int(i), path) for i, path, _ in lines] == [(4, SOURCE[4]), (13, SOURCE[13])]
    assert "UnidentifiedImageError" in lines[0][2] and "truncated" in lines[1][2]
    assert sorted(shard_arrays(out)["source_index"].tolist()) == GOOD


def test_items_follow_the_contract(prepared, imagenet_src):
    """Default format raw: every image is the exact crop, read without decoding."""
    out, _ = prepared
    ds = ShardDataset(out)
    assert len(ds) == 12 and ds.kind == "image" and ds.num_classes == 3
    assert ds.image_format == "raw" and ds.exact_images
    raw = shard_arrays(out)
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"latent", "label", "image"}
        assert item["latent"].dtype == torch.float32 and item["latent"].shape == (32, 4, 4)
        assert torch.equal(item["latent"], torch.from_numpy(raw["latent"][i]) * LATENT_SCALE)  # scaled at load
        assert isinstance(item["label"], int) and item["label"] == int(SOURCE[raw["source_index"][i]][2]) - 1  # n0k: k-1
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 64)
        crop = torch.from_numpy(crop_of(imagenet_src, raw["source_index"][i]).copy()).permute(2, 0, 1)
        assert torch.equal(item["image"], crop)  # the exact pixels
    batch = ds.batch([11, 0, 5])
    assert batch["label"].tolist() == [2, 0, 1] and batch["image"].shape == (3, 3, 64, 64)
    assert torch.equal(batch["image"][1], ds[0]["image"])
    with mock.patch("srdit.data.shards.decode_image", side_effect=AssertionError("decoded")):
        ds.batch(range(12))  # raw crops are never decoded


def test_png_is_exact_and_jpeg_close(prepared, prepared_jpeg, imagenet_src, weights, run_prepare, tmp_path):
    """--image-format png stores the same pixels as raw; jpeg (q95 4:4:4) close ones. The index
    and ShardDataset name the format; the latents do not depend on it."""
    code, text = run_prepare("--src", imagenet_src, "--out", tmp_path / "png", "--resolution", 64, "--vae",
                             weights["vae"], "--batch", 5, "--shard-size", 4, "--workers", 0, "--image-format", "png")
    assert code == 0, text
    exact, png, jpeg = ShardDataset(prepared[0]), ShardDataset(tmp_path / "png"), ShardDataset(prepared_jpeg[0])
    assert (png.image_format, png.exact_images, jpeg.image_format, jpeg.exact_images) == ("png", True, "jpeg", False)
    assert index_of(prepared_jpeg[0])["image"] == {"format": "jpeg", "quality": 95, "subsampling": "4:4:4",
                                                   "exact": False}
    everything = range(len(exact))
    a, b, c = exact.batch(everything), png.batch(everything), jpeg.batch(everything)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["latent"], c["latent"])
    error = (c["image"].float() - a["image"].float()).abs()
    assert 0 < error.mean() < 3 and error.max() < 40  # JPEG q95 4:4:4 of the exact crop (sharp test images)
    sizes = {name: index_of(d)["bytes"] for name, d in (("raw", prepared[0]), ("png", tmp_path / "png"),
                                                         ("jpeg", prepared_jpeg[0]))}
    assert sizes["jpeg"] < sizes["png"] < sizes["raw"]


def test_posterior_sample_uses_a_per_image_seed(prepared, imagenet_src, weights):
    from srdit.model.invae import load_invae, pixels_from_uint8

    out, _ = prepared
    raw = shard_arrays(out)
    vae = load_invae(weights["vae"])
    rows = [0, 6, 11]
    pixels = torch.from_numpy(np.stack([crop_of(imagenet_src, raw["source_index"][r]) for r in rows])).permute(0, 3, 1, 2)
    with torch.no_grad():
        mean, logvar = vae.encode_moments(pixels_from_uint8(pixels))
    for j, r in enumerate(rows):
        eps = torch.randn(32, 4, 4, generator=torch.Generator().manual_seed(image_seed(0, int(raw["source_index"][r]))))
        expected = mean[j] + torch.exp(0.5 * logvar[j]) * eps
        torch.testing.assert_close(torch.from_numpy(raw["latent"][r]), expected, atol=1e-5, rtol=1e-5)
    seeds = {image_seed(s, i) for s in (0, 1) for i in range(1000)}
    assert len(seeds) == 2000  # unrelated streams for neighbouring images and seeds


def test_torchrun_two_ranks_with_other_batches_give_the_same_samples(prepared, imagenet_src, weights, tmp_path):
    """One shard range per rank, batches of 3 instead of 5: the same samples, labels, images
    and (up to conv rounding) latents as the single-process run."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "srdit.data.prepare", "--src", str(imagenet_src), "--out", str(out), "--resolution", "64",
           "--vae", weights["vae"], "--batch", "3", "--shard-size", "4", "--workers", "0"]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "12 samples in 4 shards" in result.stdout
    a, b = shard_arrays(prepared[0]), shard_arrays(out)
    assert np.array_equal(a["label"], b["label"]) and np.array_equal(a["source_index"], b["source_index"])
    np.testing.assert_allclose(a["latent"], b["latent"], atol=1e-5, rtol=1e-5)
    for k in range(4):
        x, y = (open_shard(os.path.join(d, f"shard-00000{k}.safetensors")) for d in (prepared[0], out))
        assert np.array_equal(x["image"], y["image"])


def test_resume_skips_finished_shards_and_redoes_a_missing_one(prepared, imagenet_src, weights, run_prepare, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    before = index_of(out)["shards"]
    args = ["--src", imagenet_src, "--out", out, "--resolution", 64, "--vae", weights["vae"], "--batch", 5,
            "--shard-size", 4, "--workers", 0]
    code, text = run_prepare(*args)
    assert code == 0 and "this run: 0 shard(s)" in text and "4 shard(s) were done before" in text
    os.remove(out / "shard-000002.safetensors")
    os.remove(out / "parts" / "shard-000002.json")
    (out / "shard-000001.safetensors.tmp.999").write_bytes(b"half-written")  # an interrupted run's leftover
    code, text = run_prepare(*args)
    assert code == 0 and "this run: 1 shard(s), 4 images" in text, text
    assert index_of(out)["shards"] == before  # the same bytes again
    assert not (out / "shard-000001.safetensors.tmp.999").exists()
    code, text = run_prepare(*args[:-6], "--seed", 1, "--shard-size", 4, "--workers", 0)
    assert code == 2 and "other settings (seed: 0 -> 1)" in text


def test_cached_teacher_targets_are_the_teachers_output(prepared_teacher, prepared, imagenet_src, weights):
    from srdit.model.dinov2 import load_dinov2, repa_targets

    out, _ = prepared_teacher
    index = index_of(out)
    assert index["image"] is None and index["teacher"]["shape"] == [17, 768]
    assert {k: index["teacher"][k] for k in ("arch", "img_size", "pos_interp", "dtype")} == {
        "arch": "vitb14", "img_size": 56, "pos_interp": "timm", "dtype": "float16"}
    assert index["teacher"]["sha256"] == sha256_file(weights["teacher"])
    ds = ShardDataset(out)
    assert ds.kind == "teacher" and len(ds) == 12
    item = ds[3]
    assert set(item) == {"latent", "label", "teacher"}
    assert item["teacher"].dtype == torch.float16 and item["teacher"].shape == (17, 768)
    raw = shard_arrays(out)
    teacher = load_dinov2("vitb14", weights["teacher"], 56, "timm")
    crops = torch.from_numpy(np.stack([crop_of(imagenet_src, i) for i in raw["source_index"][:4]])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = repa_targets(*teacher(crops))
    torch.testing.assert_close(ds.batch([0, 1, 2, 3])["teacher"].float(), expected, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(raw["latent"], shard_arrays(prepared[0])["latent"], atol=1e-5, rtol=1e-5)


def release_layout(root, labels, r=64, seed=0, skipped=2):
    """A folder exactly as the release's preprocessing/dataset_tools.py writes it: `convert` ->
    images/00000/img<8-digit source index>.png (uncompressed PNG; source image `skipped` failed,
    so its number is missing) + images/dataset.json; `encode` -> vae-in/00000/img-latents-<8-digit
    position in the sorted images>.npy holding float32 [1, 32, r/16, r/16] (one posterior sample,
    unscaled) + vae-in/dataset.json {"labels": [[latent name, label], ...]}.
    Returns (pixels [r, r, 3], latent [1, 32, r/16, r/16]) per sample, in sample order."""
    rng = np.random.default_rng(seed)
    (root / "images" / "00000").mkdir(parents=True)
    (root / "vae-in" / "00000").mkdir(parents=True)
    numbers = [n for n in range(len(labels) + 1) if n != skipped]
    samples, image_labels, latent_labels = [], [], []
    for position, (number, label) in enumerate(zip(numbers, labels)):
        pixels = (rng.random((r, r, 3)) * 255).astype(np.uint8)
        name = f"{number:08d}"[:5] + f"/img{number:08d}.png"
        Image.fromarray(pixels).save(root / "images" / name, format="png", compress_level=0, optimize=False)
        z = rng.standard_normal((1, 32, r // 16, r // 16)).astype(np.float32)
        latent_name = f"{position:08d}"[:5] + f"/img-latents-{position:08d}.npy"
        np.save(root / "vae-in" / latent_name, z)
        samples.append((pixels, z))
        image_labels.append([name, label])
        latent_labels.append([latent_name, label])
    (root / "images" / "dataset.json").write_text(json.dumps({"labels": image_labels}))
    (root / "vae-in" / "dataset.json").write_text(json.dumps({"labels": latent_labels}))
    return samples


def test_release_layout_imports_its_sampled_latents_and_exact_images(tmp_path, run_prepare):
    """The release's own preprocessed folder: latents as stored (scaled only at load, as the
    release's sample_posterior does), labels from vae-in/dataset.json, the i-th image with the
    i-th latent in sorted order (the numbers differ after a skipped image), pixels exact."""
    labels = [3, 1, 0, 1, 2]
    samples = release_layout(tmp_path / "release", labels)
    assert sorted(os.listdir(tmp_path / "release" / "images" / "00000"))[2] == "img00000003.png"
    code, text = run_prepare("--src", tmp_path / "release", "--out", tmp_path / "out", "--resolution", 64,
                             "--workers", 0)
    assert code == 0, text
    ds = ShardDataset(tmp_path / "out")
    assert ds.labels.tolist() == labels and ds.num_classes == 4 and ds.image_format == "raw"
    index = index_of(tmp_path / "out")
    assert index["tokenizer"]["source"] == "release vae-in sampled latents" and index["tokenizer"]["file"] is None
    assert index["source"]["layout"] == "release" and index["source"]["latents"] == "release vae-in sampled latents"
    for i, (pixels, z) in enumerate(samples):
        item = ds[i]
        assert torch.equal(item["latent"], torch.from_numpy(z[0] * np.float32(LATENT_SCALE)))  # no re-sampling
        assert torch.equal(item["image"], torch.from_numpy(pixels).permute(2, 0, 1))  # the teacher's exact pixels
    # the seed draws nothing: the stored samples are the latents
    code, text = run_prepare("--src", tmp_path / "release", "--out", tmp_path / "seed1", "--resolution", 64,
                             "--workers", 0, "--seed", 1, "--latents", "release")
    assert code == 0, text
    assert torch.equal(ShardDataset(tmp_path / "seed1").batch(range(5))["latent"], ds.batch(range(5))["latent"])
    code, text = run_prepare("--src", tmp_path / "release", "--out", tmp_path / "out2", "--resolution", 64,
                             "--latents", "encode")
    assert code == 2 and "--vae INVAE.pt is required" in text


def test_release_layouts_that_do_not_fit_are_one_line_errors(tmp_path, imagenet_src, run_prepare):
    root = tmp_path / "release"
    release_layout(root, [0, 1, 2])
    code, text = run_prepare("--src", root, "--out", tmp_path / "o1", "--resolution", 128, "--workers", 0)
    assert code == 2 and "img-latents-00000000.npy holds float32 (1, 32, 4, 4), expected float32 (1, 32, 8, 8)" in text
    os.remove(root / "vae-in" / "00000" / "img-latents-00000002.npy")
    code, text = run_prepare("--src", root, "--out", tmp_path / "o2", "--resolution", 64, "--workers", 0)
    assert code == 2 and "images/ holds 3 images but vae-in/ 2 latent files" in text
    # INVAE (mean, std) moments under REPA-E's names are not a release layout: named, not sampled
    np.save(root / "vae-in" / "00000" / "img-latents-00000002.npy", np.zeros((64, 4, 4), np.float32))
    code, text = run_prepare("--src", root, "--out", tmp_path / "o3", "--resolution", 64, "--workers", 0)
    assert code == 2 and "img-latents-00000002.npy holds float32 (64, 4, 4)" in text
    (root / "vae-in" / "dataset.json").write_text('{"labels": null}')
    code, text = run_prepare("--src", root, "--out", tmp_path / "o4", "--resolution", 64, "--workers", 0)
    assert code == 2 and "vae-in/dataset.json holds no labels" in text
    code, text = run_prepare("--src", imagenet_src, "--out", tmp_path / "o5", "--resolution", 64, "--latents", "release")
    assert code == 2 and "has no release vae-in/ folder" in text


def test_the_real_command_at_256_px(tmp_path, weights):
    """`python -m srdit.data.prepare ... --resolution 256` as a user runs it (2 images)."""
    src = tmp_path / "src"
    (src / "n00000001").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for j, size in enumerate([(300, 260), (256, 341)]):
        small = (rng.random((size[1] // 16, size[0] // 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(src / "n00000001" / f"{j}.JPEG")
    result = subprocess.run([sys.executable, "-m", "srdit.data.prepare", "--src", str(src), "--out", str(tmp_path / "out"),
                             "--resolution", "256", "--vae", weights["vae"], "--batch", "2", "--workers", "1"],
                            env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 samples in 1 shards" in result.stdout
    progress = [line for line in result.stdout.splitlines() if line.startswith("prepare (1 of 1 shards)  img 2/2")]
    assert progress and "img/s" in progress[-1] and "ETA" in progress[-1]  # a log file's line: rate and ETA
    item = ShardDataset(tmp_path / "out")[1]
    assert item["latent"].shape == (32, 16, 16) and item["image"].shape == (3, 256, 256) and item["label"] == 0


def test_bad_arguments_are_one_line_errors(tmp_path, imagenet_src, weights, run_prepare):
    base = ["--src", imagenet_src, "--out", tmp_path / "o", "--vae", weights["vae"]]
    assert run_prepare(*base, "--resolution", 100)[1].count("multiple of 16") == 1
    assert "--cache-teacher needs --teacher" in run_prepare(*base, "--resolution", 64, "--cache-teacher")[1]
    assert "only used with --cache-teacher" in run_prepare(*base, "--resolution", 64, "--teacher", weights["teacher"])[1]
    code, text = run_prepare("--src", tmp_path / "nowhere", "--out", tmp_path / "o", "--resolution", 64)
    assert code == 2 and "is not a directory" in text


def test_a_failed_first_launch_blocks_nothing_and_a_second_launch_is_refused(imagenet_src, weights, run_prepare,
                                                                              tmp_path):
    out = tmp_path / "out"
    broken = tmp_path / "e2e-invae-400k.pt"
    torch.save({"not": torch.zeros(1)}, broken)  # the wrong file: fails when loaded, after the checks
    args = ["--src", imagenet_src, "--out", out, "--resolution", 64, "--batch", 5, "--shard-size", 4, "--workers", 0]
    code, text = run_prepare(*args, "--vae", broken)
    assert code == 2 and str(broken) in text and not (out / "prepare.json").exists()
    with OutputLock(os.path.join(out, ".lock"), "a prepared folder"):  # as another preparation holds it
        code, text = run_prepare(*args, "--vae", weights["vae"])
    assert code == 2 and f"in use by pid {os.getpid()}" in text
    (out / "prepare.json").write_text('{"seed": 99}')  # an attempt that recorded no shard
    code, text = run_prepare(*args, "--vae", weights["vae"])  # the corrected command
    assert code == 0, text


def test_an_unreadable_index_names_the_file(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    (out / "index.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ShardError, match=r"index.json is not a readable index \(UnicodeDecodeError"):
        ShardDataset(out)


def _with_nan(state: dict) -> tuple[dict, str]:
    """A copy of a state dict with one NaN in its first floating-point tensor, and that tensor's name."""
    key = next(k for k, v in state.items() if v.is_floating_point())
    state = {k: v.clone() for k, v in state.items()}
    state[key].view(-1)[0] = float("nan")
    return state, key


def test_non_finite_weights_are_refused_before_anything_is_written(imagenet_src, weights, run_prepare, tmp_path,
                                                                  monkeypatch):
    """As srdit.sample refuses a checkpoint holding NaN: the INVAE (whose NaN made every latent NaN
    and the command exit 0) and the teacher of --cache-teacher."""
    state, key = _with_nan(torch.load(weights["vae"], weights_only=True))
    torch.save(state, tmp_path / "nan-invae.pt")
    args = ["--src", imagenet_src, "--resolution", 64, "--shard-size", 4, "--workers", 0]
    code, text = run_prepare(*args, "--out", tmp_path / "out", "--vae", tmp_path / "nan-invae.pt")
    assert code == 2 and f"nan-invae.pt: 1 weight tensor(s) hold NaN or Inf ({key})" in text, text
    assert len(text.strip().splitlines()) == 1 and not (tmp_path / "out" / "prepare.json").exists()
    assert not list((tmp_path / "out").glob("shard-*"))

    from srdit.model import dinov2

    real = dinov2.load_dinov2

    def poisoned(*a, **k):  # the teacher file as loaded, with an Inf in it
        teacher = real(*a, **k)
        with torch.no_grad():
            next(teacher.parameters()).view(-1)[0] = float("inf")
        return teacher

    monkeypatch.setattr(dinov2, "load_dinov2", poisoned)
    code, text = run_prepare(*args, "--out", tmp_path / "out-t", "--vae", weights["vae"], "--teacher",
                             weights["teacher"], "--cache-teacher")
    assert code == 2 and "dinov2_vitb14_pretrain.pth: 1 weight tensor(s) hold NaN or Inf" in text, text
    assert not list((tmp_path / "out-t").glob("shard-*"))


def test_a_batch_encoded_to_nan_stops_the_run_naming_its_files(imagenet_src, weights, run_prepare, tmp_path,
                                                               monkeypatch):
    """Finite weights can still give NaN (bf16 overflow, a bad image): the batch is refused, not
    written; finished shards are kept and a rerun finishes the rest."""
    from srdit.data import prepare

    real = prepare.posterior_sample

    def nan_for_source_6(mean, std, seed, indices):
        z = real(mean, std, seed, indices)
        z[[int(i) == 6 for i in indices]] = float("nan")
        return z

    monkeypatch.setattr(prepare, "posterior_sample", nan_for_source_6)
    out = tmp_path / "out"
    args = ["--src", imagenet_src, "--out", out, "--resolution", 64, "--vae", weights["vae"], "--batch", 5,
            "--shard-size", 4, "--workers", 0]
    code, text = run_prepare(*args)
    assert code == 2, text
    assert ("the latents of 1 of the 3 images of the encoder batch of source images 5-7 (shard-000001.safetensors) "
            f"are NaN or Inf: {SOURCE[6]}; the INVAE ({weights['vae']}) computed them") in text, text
    assert (out / "shard-000000.safetensors").exists() and not (out / "shard-000001.safetensors").exists()
    assert not (out / "index.json").exists()
    monkeypatch.undo()
    code, text = run_prepare(*args)
    assert code == 0 and "this run: 3 shard(s)" in text, text


def test_release_latents_holding_nan_are_refused_naming_the_file(tmp_path, run_prepare):
    release_layout(tmp_path / "release", [0, 1, 2])
    path = tmp_path / "release" / "vae-in" / "00000" / "img-latents-00000001.npy"
    z = np.load(path)
    z[0, 3, 1, 1] = np.inf
    np.save(path, z)
    code, text = run_prepare("--src", tmp_path / "release", "--out", tmp_path / "out", "--resolution", 64,
                             "--workers", 0)
    assert code == 2 and "are NaN or Inf: vae-in/00000/img-latents-00000001.npy; the release's vae-in/" in text, text


def test_file_names_that_are_not_utf8_are_prepared_listed_and_resumed(weights, run_prepare, tmp_path):
    """A file or class folder whose name is not UTF-8 (os.listdir gives it as lone surrogates,
    which UTF-8 cannot encode) aborted the whole run; now it is prepared, or skipped and listed
    when unreadable, and the JSON files hold valid Unicode (the bytes shown as \\xNN)."""
    def name(raw: bytes) -> str:
        return os.fsdecode(raw)

    src = tmp_path / "src"
    rng = np.random.default_rng(3)
    for folder, files in ((b"n01", (b"a.JPEG", b"b\xff.JPEG")), (b"n0\xff", (b"a.JPEG",))):
        os.makedirs(os.path.join(src, name(folder)))
        for file in files:
            Image.fromarray(rng.integers(0, 256, (80, 70, 3), np.uint8)).save(
                os.path.join(src, name(folder), name(file)), format="JPEG")
    with open(os.path.join(src, "n01", name(b"c\xfe.JPEG")), "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "out"
    args = ["--src", src, "--out", out, "--resolution", 64, "--vae", weights["vae"], "--workers", 0]
    code, text = run_prepare(*args)
    assert code == 0 and "3 samples in 1 shards" in text and "1 unreadable image(s) skipped" in text, text
    ds = ShardDataset(out)
    assert ds.labels.tolist() == [0, 0, 1] and ds.classes == ["n01", "n0\\xff"]
    with open(out / "skipped.txt", encoding="utf-8") as f:
        assert f.read().splitlines()[1].startswith("2\tn01/c\\xfe.JPEG\tUnidentifiedImageError")
    for path in (out / "index.json", out / "prepare.json", out / "parts" / "shard-000000.json"):
        with open(path) as f:  # strict UTF-8 throughout: no lone surrogate, raw or escaped
            json.dumps(json.load(f), ensure_ascii=False).encode("utf-8")
    code, text = run_prepare(*args)
    assert code == 0 and "this run: 0 shard(s)" in text, text


def test_an_empty_out_or_one_inside_src_is_refused(weights, run_prepare, tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "n01").mkdir(parents=True)
    Image.fromarray(np.full((80, 70, 3), 90, np.uint8)).save(src / "n01" / "a.JPEG")
    monkeypatch.chdir(tmp_path)  # where an empty --out used to write its shards
    base = ["--src", src, "--resolution", 64, "--vae", weights["vae"], "--workers", 0]
    code, text = run_prepare(*base, "--out", "")
    assert code == 2 and "--out is empty" in text and len(text.strip().splitlines()) == 1, text
    assert sorted(os.listdir(tmp_path)) == ["src"]
    for inside in (src / "prepared", src, src / "n01" / "out"):
        code, text = run_prepare(*base, "--out", inside)
        assert code == 2 and f"--out {inside} is inside --src {src}" in text, text
    assert sorted(p.name for p in src.rglob("*")) == ["a.JPEG", "n01"]

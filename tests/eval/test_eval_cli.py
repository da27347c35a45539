"""`python -m srdit.eval`, the reference feature cache and the in-training `quick_eval`, with
random-init networks saved in their original layouts.

Speed: the Inception runs at its smallest input, 75 px (INPUT_SIZE patched; the 299-px path is
tests/eval/test_inception.py's), so sFID is 3 x 3 x 7 = 63-d; the KDD network is the ViT-L/14 code
path at 224 px with a 64-wide, 2-block arch in place of vitl14's table entry. FID's 2048-d square
root goes through `--fid-method eigh`: scipy's sqrtm of a singular 2048-d product takes minutes
on two cores; test_eigh_fid_equals_adm_sqrtm ties the two together.
"""
import json
import os
import types

import numpy as np
import pytest
import torch

from srdit.config import apply_overrides, preset
from srdit.eval import features, metrics
from srdit.eval import inception as inception_module
from srdit.eval.main import main
from srdit.eval.quick import QuickReference, build_quick_eval, fid_key, quick_eval
from srdit.model import build_model, dinov2
from srdit.sample.npz import read_arrays

N_REF = 24


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception_module, "INPUT_SIZE", 75)
        mp.setitem(dinov2.ARCHS, "vitl14", dinov2.DINOv2Arch(64, 2, 2, 14, 37, "dinov2_vitl14_pretrain.pth"))
        torch.manual_seed(0)
        inc = inception_module.build_inception()
        torch.save(inc.state_dict(), d / "pt_inception.pth")
        teacher = dinov2.build_dinov2("vitl14", 224).freeze()
        torch.save(teacher.state_dict(), d / "dinov2_vitl14_pretrain.pth")
        rng = np.random.default_rng(0)
        # smooth-ish random images: a coarse pattern upsampled, plus noise
        coarse = rng.integers(0, 256, (N_REF, 4, 4, 3)).repeat(8, 1).repeat(8, 2)
        images = np.clip(coarse + rng.normal(0, 20, coarse.shape), 0, 255).astype(np.uint8)
        feats = features.inception_features(inc, [images])
        mu, sigma = metrics.feature_stats(feats["pool"])
        mu_s, sigma_s = metrics.feature_stats(feats["spatial"])
        np.savez(d / "ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
        settings = np.array(json.dumps({"sampler": "sde", "nfe": 250, "seed": 7}))
        np.savez(d / "samples.npz", arr_0=images, arr_1=np.arange(N_REF) % 10, settings=settings)
        yield types.SimpleNamespace(dir=d, inc=inc, teacher=teacher, images=images, ref=str(d / "ref.npz"),
                                    samples=str(d / "samples.npz"), inception=str(d / "pt_inception.pth"),
                                    kdd=str(d / "dinov2_vitl14_pretrain.pth"))


def run(nets, tmp_path, *extra):
    return main([nets.samples, "--ref", nets.ref, "--inception", nets.inception, "--batch", "5",
                 "--fid-method", "eigh", "--cache-dir", str(tmp_path / "cache"), *extra])


def test_reference_against_itself(nets, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert run(nets, tmp_path, "--kdd-teacher", nets.kdd, "--json", str(out)) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ("FID", "sFID", "IS", "Precision", "Recall", "KDD"):
        assert sum(line.startswith(name + " ") for line in lines) == 1, name
    assert any("NFE 250" in line and "seed 7" in line for line in lines)  # the samples' settings
    r = json.loads(out.read_text())
    trace = float(np.trace(np.load(nets.ref)["sigma"]))
    assert abs(r["fid"]) < 1e-6 * trace and abs(r["sfid"]) < 1e-6 * float(np.trace(np.load(nets.ref)["sigma_s"]))
    assert (r["precision"], r["recall"]) == (1.0, 1.0)
    assert np.isfinite(r["is"]) and r["is"] >= 1.0
    assert np.isfinite(r["kdd"]) and abs(r["kdd"]) < 0.1
    assert r["num_samples"] == N_REF and r["reference_images"] == N_REF and r["kdd_real_images"] == N_REF
    assert r["reference_stats"] == "stored in the reference npz"
    assert r["sample_settings"] == {"sampler": "sde", "nfe": 250, "seed": 7}
    assert sorted(f.split("-")[0] for f in os.listdir(tmp_path / "cache")) == ["inception", "kdd"]


def test_reference_features_are_cached_by_content(nets, tmp_path, monkeypatch):
    calls = []
    real = features.inception_features

    def counting(model, batches, device=None, **kwargs):
        calls.append(1)
        return real(model, batches, device, **kwargs)

    monkeypatch.setattr(features, "inception_features", counting)
    assert run(nets, tmp_path) == 0
    assert len(calls) == 1  # the reference's features (the samples go through main's own import)
    assert run(nets, tmp_path) == 0
    assert len(calls) == 1  # cached
    # another reference file (different content): its own cache entry; no stored stats -> computed
    other = tmp_path / "other.npz"
    np.savez(other, arr_0=nets.images[::-1].copy())
    assert main([nets.samples, "--ref", str(other), "--inception", nets.inception, "--fid-method", "eigh",
                 "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "o.json")]) == 0
    assert len(calls) == 2 and len(os.listdir(tmp_path / "cache")) == 2
    r = json.loads((tmp_path / "o.json").read_text())
    assert r["reference_stats"] == "computed from the reference images" and abs(r["fid"]) < 1e-3


def test_kdd_against_another_real_set(nets, tmp_path):
    real = tmp_path / "real.npz"
    np.savez(real, arr_0=np.full((8, 20, 20, 3), 128, np.uint8))
    out = tmp_path / "m.json"
    assert run(nets, tmp_path, "--kdd-teacher", nets.kdd, "--kdd-real", str(real), "--json", str(out)) == 0
    r = json.loads(out.read_text())
    assert r["kdd_real_images"] == 8 and r["kdd_real"] == str(real) and r["kdd"] > 0


@pytest.mark.parametrize("which", ["samples", "ref", "inception", "kdd"])
def test_missing_files_are_named(nets, tmp_path, capsys, which):
    missing = str(tmp_path / f"missing-{which}")
    args = {"samples": nets.samples, "ref": nets.ref, "inception": nets.inception, "kdd": nets.kdd}
    args[which] = missing
    assert main([args["samples"], "--ref", args["ref"], "--inception", args["inception"],
                 "--kdd-teacher", args["kdd"]]) == 2
    err = capsys.readouterr().err
    assert missing in err
    if which in ("inception", "kdd"):
        assert {"inception": "pt_inception-2015-12-05", "kdd": "dinov2_vitl14_pretrain.pth"}[which] in err


def test_eigh_fid_equals_adm_sqrtm():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 48)) @ rng.normal(size=(48, 48)) * 0.3 + 0.5
    mu, sigma = metrics.feature_stats(ref)
    for n in (20, 300):  # fewer samples than dimensions (singular covariance) and more
        fake = rng.normal(size=(n, 48)) * 1.2
        adm = metrics.fid_from_features(fake, mu, sigma)
        assert metrics.frechet_distance_eigh(fake, mu, sigma) == pytest.approx(adm, rel=1e-7)
    assert metrics.frechet_distance_eigh(ref, mu, sigma) == pytest.approx(0.0, abs=1e-9 * np.trace(sigma))


def test_quick_eval_on_a_tiny_model(nets, tmp_path):
    cfg = apply_overrides(preset("quickstart"), ["model.hidden=32", "model.heads=2", "model.depth=5",
                                                 "model.projector_dim=32", "sample.num_steps=2"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception_module, "INPUT_SIZE", 75)
        ref = QuickReference.load(nets.ref, inception=nets.inc, kdd_teacher=nets.teacher, cache_dir=str(tmp_path))
        rng_before = torch.get_rng_state()
        first = quick_eval(model, cfg, inception=nets.inc, ref=ref, kdd_teacher=nets.teacher, num_samples=12, batch=8)
        second = quick_eval(model, cfg, inception=nets.inc, ref=ref, kdd_teacher=nets.teacher, num_samples=12, batch=8)
    assert set(first) == {"fid12", "kdd", "kdd_std", "quick_eval_s"}
    assert np.isfinite(first["fid12"]) and first["fid12"] > 0 and np.isfinite(first["kdd"])
    assert (first["fid12"], first["kdd"]) == (second["fid12"], second["kdd"])  # its own seeded generators
    assert torch.equal(torch.get_rng_state(), rng_before) and model.training
    assert (fid_key(10_000), fid_key(50_000)) == ("fid10k", "fid50k")


def test_build_quick_eval_needs_reference_and_inception():
    with pytest.raises(ValueError, match="eval.reference"):
        build_quick_eval(preset("quickstart"), torch.device("cpu"))


def test_build_quick_eval_refuses_an_invae_holding_nan(nets, tmp_path):
    """As srdit.sample and srdit.data.prepare do: the training log would show a FID of garbage."""
    from srdit.model.invae import build_invae

    state = build_invae().state_dict()
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "nan-invae.pt")
    cfg = apply_overrides(preset("sr-dit-b1-256"), [f"eval.reference={nets.ref}", f"eval.inception={nets.inception}",
                                                    f"data.invae={tmp_path / 'nan-invae.pt'}"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception_module, "INPUT_SIZE", 75)
        with pytest.raises(ValueError, match=r"nan-invae.pt: 1 weight tensor\(s\) hold NaN or Inf"):
            build_quick_eval(cfg, torch.device("cpu"))


def test_training_loop_logs_the_quick_evaluation(nets, tmp_path):
    from srdit.train.main import main as train_main

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception_module, "INPUT_SIZE", 75)
        assert train_main(["--preset", "quickstart", "--out", str(out), "model.hidden=32", "model.heads=2",
                           "model.depth=5", "model.projector_dim=32", "train.global_batch=16", "train.max_steps=2",
                           "sample.num_steps=2", "train.eval_every=2", "train.eval_samples=12",
                           f"eval.reference={nets.ref}", f"eval.inception={nets.inception}"]) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in records if "fid12" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2 and np.isfinite(evals[0]["fid12"])


def test_non_finite_reference_statistics_and_features_are_errors_not_hangs(nets, tmp_path, capsys):
    with np.load(nets.ref) as f:
        stored = dict(f)
    stored["sigma"] = stored["sigma"].copy()
    stored["sigma"][3, 5] = np.nan  # made the ADM evaluator's sqrtm spin for > 12 minutes
    np.savez(tmp_path / "nan_ref.npz", **stored)
    assert main([nets.samples, "--ref", str(tmp_path / "nan_ref.npz"), "--inception", nets.inception,
                 "--fid-method", "sqrtm", "--no-cache"]) == 2
    assert "nan_ref.npz: its stored sigma holds non-finite values" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds non-finite"):
        metrics.frechet_distance(stored["mu"], stored["sigma"], stored["mu"], stored["sigma"])
    with pytest.raises(ValueError, match=r"Inception logits features of samples.npz \(batch 1\) holds non-finite"):
        features.inception_features(_nan_on_second(nets.inc), [nets.images[:2], nets.images[2:4]], name="samples.npz")


def _nan_on_second(model):
    """The model, but its second call returns NaN logits."""
    calls = []

    def forward(x):
        out = model(x)
        calls.append(1)
        return {**out, "logits": out["logits"] * float("nan")} if len(calls) == 2 else out

    forward.fc = model.fc
    return forward


@pytest.mark.parametrize("case", ["not a zip", "no GPU", "not a device", "not Inception weights"])
def test_bad_inputs_are_one_line_errors(nets, tmp_path, capsys, case):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"garbage" * 100)
    wrong = tmp_path / "wrong.pth"
    torch.save({"a": torch.zeros(3)}, wrong)
    argv, expected = {
        "not a zip": ([str(garbage), "--ref", nets.ref, "--inception", nets.inception], "is not an .npz file"),
        "no GPU": ([nets.samples, "--ref", nets.ref, "--inception", nets.inception, "--device", "cuda"],
                   "no CUDA GPU" if not torch.cuda.is_available() else None),
        "not a device": ([nets.samples, "--ref", nets.ref, "--inception", nets.inception, "--device", "gpu0"],
                         "--device 'gpu0' is not a device name"),
        "not Inception weights": ([nets.samples, "--ref", nets.ref, "--inception", str(wrong)],
                                  "does not match the FID Inception layout"),
    }[case]
    if expected is None:
        pytest.skip("a GPU is present")
    assert main([*argv, "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "allow_pickle" not in err, err


def test_a_damaged_cache_entry_is_computed_again_and_replaced(nets, tmp_path, capsys):
    """It failed with BadZipFile on every run until the cache was deleted by hand."""
    out = tmp_path / "m.json"
    assert run(nets, tmp_path, "--kdd-teacher", nets.kdd, "--json", str(out)) == 0
    first = json.loads(out.read_text())
    entries = {f.split("-")[0]: tmp_path / "cache" / f for f in os.listdir(tmp_path / "cache")}
    data = bytearray(entries["inception"].read_bytes())
    data[len(data) // 2] ^= 0xFF  # the zip opens; the CRC of the features does not match
    entries["inception"].write_bytes(data)
    entries["kdd"].write_bytes(entries["kdd"].read_bytes()[:100])  # truncated by a full disk
    capsys.readouterr()
    assert run(nets, tmp_path, "--kdd-teacher", nets.kdd, "--json", str(out)) == 0
    text = capsys.readouterr().out
    assert (f"feature cache: {entries['inception']} is unreadable (BadZipFile: Bad CRC-32 for file "
            "'pool.npy'); computing it again and replacing it") in text, text
    assert f"feature cache: {entries['kdd']} is unreadable (not a zip archive" in text
    again = json.loads(out.read_text())
    assert {k: again[k] for k in ("fid", "precision", "recall", "kdd")} == {
        k: first[k] for k in ("fid", "precision", "recall", "kdd")}
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(p.name for p in entries.values())  # replaced in place
    read_arrays(str(entries["inception"]), ("pool", "spatial", "logits"))  # whole again
    read_arrays(str(entries["kdd"]), ("cls",))
    assert run(nets, tmp_path, "--kdd-teacher", nets.kdd) == 0
    assert "feature cache" not in capsys.readouterr().out


def test_a_reference_without_images_is_refused_before_any_feature_is_computed(nets, tmp_path, capsys, monkeypatch):
    from srdit.eval import main as eval_main

    with np.load(nets.ref) as f:
        np.savez(tmp_path / "stats_only.npz", **{k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
    calls = []
    monkeypatch.setattr(eval_main, "load_inception", lambda *a, **k: calls.append("load") or nets.inc)
    assert main([nets.samples, "--ref", str(tmp_path / "stats_only.npz"), "--inception", nets.inception,
                 "--no-cache"]) == 2
    assert calls == []  # refused before the networks were loaded or any sample was read
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"srdit.eval: error: {tmp_path / 'stats_only.npz'} has no array 'arr_0' (it has: ")
    assert "the reference needs its images as arr_0" in err and len(err.splitlines()) == 1, err
    real = tmp_path / "no_images.npz"
    np.savez(real, labels=np.arange(3))
    assert main([nets.samples, "--ref", nets.ref, "--inception", nets.inception, "--kdd-teacher", nets.kdd,
                 "--kdd-real", str(real), "--no-cache"]) == 2
    assert "the KDD real set needs its images as arr_0" in capsys.readouterr().err and calls == []


def test_samples_and_reference_of_different_resolutions_are_warned_about(nets, tmp_path, capsys):
    assert run(nets, tmp_path) == 0
    assert "warning" not in capsys.readouterr().err  # 32 px against 32 px
    bigger = tmp_path / "samples40.npz"
    np.savez(bigger, arr_0=np.repeat(np.repeat(nets.images, 5, 1), 5, 2)[:, :40, :40])
    assert main([str(bigger), "--ref", nets.ref, "--inception", nets.inception, "--batch", "8", "--fid-method",
                 "eigh", "--cache-dir", str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    assert (f"srdit.eval: warning: the samples are 40x40 px but the reference's images 32x32 px ({nets.ref})"
            in err), err

"""`python -m srdit.sample`: the ADM npz, balanced labels, stored settings, resume after an
interruption, 1 vs 2 ranks, release state dicts, INVAE decoding and clear errors.

The checkpoint is a 2-step run of a shrunken quickstart (as tests/train does), sampled with a
2-step SDE into 30 samples in batches of 8 (the last batch is short).
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from srdit.sample import main as sample_main
from srdit.train.main import main as train_main

TINY = ["model.hidden=32", "model.heads=2", "model.depth=5", "model.projector_dim=32"]
SAMPLE = ["sample.num_samples=30", "sample.batch=8", "sample.num_steps=2"]
ENV = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # unguided sampling settings in the checkpoint (the quickstart's grid uses CFG 2.0): the
    # layout tests below read the sampler's defaults; guidance has its own tests
    assert train_main(["--preset", "quickstart", "--out", str(out), *TINY, "train.global_batch=16",
                       "train.max_steps=2", "sample.num_steps=2", "sample.guidance=none",
                       "sample.guidance_scale=1.0"]) == 0
    return str(out / "checkpoints" / "step_000000002.pt")


@pytest.fixture(scope="module")
def straight(ckpt, tmp_path_factory):
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("straight") / "samples.npz"
    assert sample_main.main(["--ckpt", ckpt, "--out", str(out), *SAMPLE]) == 0
    return out


def test_npz_layout_labels_settings_and_grid(straight):
    with np.load(straight) as f:
        assert f.files == ["arr_0", "arr_1", "settings"]
        images, labels, settings = f["arr_0"], f["arr_1"], json.loads(str(f["settings"]))
    assert images.dtype == np.uint8 and images.shape == (30, 16, 16, 3)
    assert labels.dtype == np.int64 and labels.shape == (30,)
    np.testing.assert_array_equal(labels, np.arange(30) % 10)  # balanced and interleaved
    assert np.bincount(labels).tolist() == [3] * 10
    assert (images[..., 0] == images[..., 1]).all()  # grey quickstart digits, 3 equal channels
    assert images.std() > 0
    expected = {"sampler": "sde", "num_steps": 2, "nfe": 2, "t_min": 0.04, "final_step": "sde_mean",
                "time_shift": 0.25, "guidance": "none", "num_classes": 10, "num_samples": 30, "batch": 8,
                "seed": 0, "precision": "fp32", "tf32": False, "device_type": "cpu", "step": 2, "weights": "ema",
                "sampler_state_dtype": "float64", "cls_guidance_scale": 1.0}  # the release integrates in float64
    assert {k: settings[k] for k in expected} == expected
    assert settings["labels"].startswith("balanced")
    assert settings["config"]["model"]["hidden"] == 32
    assert os.path.exists(straight.with_suffix(".png"))
    assert not os.path.exists(f"{straight}.parts")


def test_prints_settings_and_a_finished_file_is_left_alone(ckpt, straight, capsys):
    before = sha(straight)
    assert sample_main.main(["--ckpt", ckpt, "--out", str(straight), *SAMPLE]) == 0
    out = capsys.readouterr().out
    for text in ("sampler sde", "NFE 2", "t_min 0.04", "time shift 0.25", "guidance none", "labels balanced",
                 "seed 0", "precision fp32", "already complete"):
        assert text in out, text
    assert sha(straight) == before
    assert sample_main.main(["--ckpt", ckpt, "--out", str(straight), *SAMPLE, "sample.seed=1"]) == 2
    assert "exists with other settings" in capsys.readouterr().err


def _stop_after(batches: int):
    """Parts.write that raises KeyboardInterrupt (as Ctrl-C or a kill would) after `batches` writes."""
    write, done = sample_main.Parts.write, []

    def interrupted(self, b, images, labels):
        if len(done) == batches:
            raise KeyboardInterrupt
        done.append(b)
        write(self, b, images, labels)

    return interrupted


def test_resume_after_interruption_gives_the_same_file(ckpt, straight, tmp_path, monkeypatch, capsys):
    out = tmp_path / "samples.npz"
    monkeypatch.setattr(sample_main.Parts, "write", _stop_after(2))
    with pytest.raises(KeyboardInterrupt):
        sample_main.main(["--ckpt", ckpt, "--out", str(out), *SAMPLE])
    monkeypatch.undo()
    parts = f"{out}.parts"
    assert sorted(os.listdir(parts)) == ["batch_000000.npz", "batch_000001.npz", "settings.json"]
    assert not out.exists()
    with open(os.path.join(parts, "batch_000002.npz.tmp.999"), "wb") as f:
        f.write(b"half a batch")  # what a killed write leaves

    assert sample_main.main(["--ckpt", ckpt, "--out", str(out), *SAMPLE, "sample.seed=1"]) == 2  # other settings
    err = capsys.readouterr().err
    assert "other settings" in err and "seed: 0 -> 1" in err

    assert sample_main.main(["--ckpt", ckpt, "--out", str(out), *SAMPLE]) == 0
    assert "resuming: 16 of 30 samples" in capsys.readouterr().out
    assert sha(out) == sha(straight)
    assert not os.path.exists(parts)


def _damage(path, how: str) -> None:
    """What a crash, a full disk or bit rot leaves of a part file."""
    data = bytearray(open(path, "rb").read())
    if how == "flipped byte":  # the zip still opens; only the CRC of the images tells
        data[len(data) // 2] ^= 0xFF
    elif how == "truncated":
        data = data[: len(data) // 2]
    with open(path, "wb") as f:
        f.write(data)


def test_damaged_parts_are_named_removed_and_drawn_again(ckpt, straight, tmp_path, monkeypatch, capsys):
    """A damaged part was trusted: assembling failed with BadZipFile on every rerun. Now each
    part is read whole before it counts as drawn; a bad one is removed, named and drawn again."""
    out = tmp_path / "samples.npz"
    monkeypatch.setattr(sample_main.Parts, "write", _stop_after(3))
    with pytest.raises(KeyboardInterrupt):
        sample_main.main(["--ckpt", ckpt, "--out", str(out), *SAMPLE])
    monkeypatch.undo()
    parts = sample_main.Parts(str(out))
    _damage(parts.path(0), "flipped byte")
    _damage(parts.path(1), "truncated")
    capsys.readouterr()
    assert sample_main.main(["--ckpt", ckpt, "--out", str(out), *SAMPLE]) == 0
    text = capsys.readouterr().out
    assert (f"{parts.path(0)} is unreadable (BadZipFile: Bad CRC-32 for file 'images.npy'): removed, batch 0 is "
            "drawn again") in text, text
    assert f"{parts.path(1)} is unreadable (not a zip archive" in text and "batch 1 is drawn again" in text
    assert "resuming: 8 of 30 samples" in text  # batch 2 was sound and kept
    assert sha(out) == sha(straight)


def test_a_part_damaged_after_planning_is_a_one_line_error(tmp_path):
    parts = sample_main.Parts(str(tmp_path / "s.npz"))
    os.makedirs(parts.dir)
    parts.write(0, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    assert parts.damage(0, 2) is None
    assert parts.damage(0, 3).endswith("batch_000000.npz holds images uint8 (2, 4, 4, 3), expected uint8 [3, H, W, 3]")
    _damage(parts.path(0), "truncated")
    with pytest.raises(sample_main.SamplingError, match=r"batch_000000.npz is unreadable .*; rerun the same command "
                                                        r"to draw it again"):
        parts.read(0)


def _spawn(args, nproc):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    launcher = [sys.executable] if nproc == 1 else torchrun
    command = [*launcher, "-m", "srdit.sample", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def test_one_and_two_ranks_give_identical_files(ckpt, tmp_path, monkeypatch):
    files = {nproc: tmp_path / f"ranks{nproc}.npz" for nproc in (1, 2)}
    # the 2-rank run resumes a 1-process run that stopped after batches 0 and 1, whose batch 1 is
    # damaged: rank 1 checks it (the ranks share the check), removes it, rank 0 names it, and the
    # ranks share batches 1-3
    monkeypatch.setattr(sample_main.Parts, "write", _stop_after(2))
    with pytest.raises(KeyboardInterrupt):
        sample_main.main(["--ckpt", ckpt, "--out", str(files[2]), *SAMPLE])
    monkeypatch.undo()
    _damage(sample_main.Parts(str(files[2])).path(1), "flipped byte")
    for nproc in (1, 2):
        result = _spawn(["--ckpt", ckpt, "--out", str(files[nproc]), *SAMPLE], nproc)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "over 2 process(es)" in result.stdout and "resuming: 8 of 30 samples" in result.stdout
    assert "batch_000001.npz is unreadable (BadZipFile" in result.stdout and "batch 1 is drawn again" in result.stdout
    assert sha(files[1]) == sha(files[2])


def test_release_state_dict_needs_preset_and_gives_the_same_images(ckpt, straight, tmp_path, capsys):
    ema = torch.load(ckpt, weights_only=True)["ema"]
    release = tmp_path / "release.pt"
    torch.save({"module." + k: v for k, v in ema.items()}, release)  # DDP-prefixed bare state dict
    out = tmp_path / "release.npz"
    assert sample_main.main(["--ckpt", str(release), "--out", str(out), *SAMPLE]) == 2
    assert "give --preset" in capsys.readouterr().err
    assert sample_main.main(["--ckpt", str(release), "--out", str(out), "--preset", "quickstart", *TINY, *SAMPLE]) == 0
    with np.load(out) as a, np.load(straight) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        assert json.loads(str(a["settings"]))["kind"] == "release checkpoint"


@pytest.fixture(scope="module")
def latent_release(tmp_path_factory):
    """A random SR-DiT on 32 x 2 x 2 INVAE latents (32 x 32 px after decoding) and a random INVAE."""
    from srdit.config import apply_overrides, preset
    from srdit.model import build_model
    from srdit.model.invae import build_invae

    d = tmp_path_factory.mktemp("latent")
    overrides = [*TINY, "model.input_size=2"]
    torch.manual_seed(0)
    torch.save(build_model(apply_overrides(preset("sr-dit-b1-256"), overrides)).state_dict(), d / "model.pt")
    torch.save(build_invae().state_dict(), d / "invae.pt")
    return d, overrides


def test_latent_model_decodes_with_the_invae(latent_release, tmp_path, capsys):
    d, overrides = latent_release
    args = ["--ckpt", str(d / "model.pt"), "--preset", "sr-dit-b1-256", *overrides, "sample.num_samples=3",
            "sample.batch=3", "sample.num_steps=2"]
    assert sample_main.main([*args, "--out", str(tmp_path / "a.npz")]) == 2
    assert "give --vae" in capsys.readouterr().err
    assert sample_main.main([*args, "--out", str(tmp_path / "a.npz"), "--vae", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    nan_invae = {k: v.clone() for k, v in torch.load(d / "invae.pt", weights_only=True).items()}
    next(v for v in nan_invae.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save(nan_invae, tmp_path / "nan-invae.pt")
    assert sample_main.main([*args, "--out", str(tmp_path / "a.npz"), "--vae", str(tmp_path / "nan-invae.pt")]) == 2
    assert "nan-invae.pt: 1 weight tensor(s) hold NaN or Inf" in capsys.readouterr().err  # decoded images: garbage
    assert sample_main.main([*args, "--out", str(tmp_path / "a.npz"), "--vae", str(d / "invae.pt")]) == 0
    with np.load(tmp_path / "a.npz") as f:
        assert f["arr_0"].shape == (3, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_1"], [0, 1, 2])
        assert "INVAE" in json.loads(str(f["settings"]))["decoder"]


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert sample_main.main(["--ckpt", str(missing), "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and str(missing) in err


def test_a_run_folder_as_ckpt_names_the_checkpoint_to_give(ckpt, tmp_path, capsys):
    run = os.path.dirname(os.path.dirname(ckpt))
    assert sample_main.main(["--ckpt", run, "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"srdit.sample: error: --ckpt {run} is a directory; give a checkpoint file, e.g. {ckpt}", err
    assert sample_main.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "s.npz")]) == 2
    assert f"e.g. {tmp_path}/checkpoints/step_*.pt" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, stored", [
    (["sample.precision=bf16"], {"precision": "bf16"}),
    (["sample.guidance=pdg", "sample.guidance_scale=2.5", "sample.guidance_low=0.1", "sample.guidance_high=0.8"],
     {"guidance": "pdg", "guidance_scale": 2.5, "guidance_interval": [0.1, 0.8]}),
    (["sample.guidance=cfg", "sample.guidance_scale=1.5"], {"guidance": "cfg", "guidance_scale": 1.5}),
    (["sample.sampler=heun"], {"sampler": "heun", "nfe": 3, "t_min": None}),
    (["sample.balanced_labels=false"], {"labels": "uniform random"}),
])
def test_sampler_settings_run_and_are_stored(ckpt, tmp_path, overrides, stored):
    out = tmp_path / "s.npz"
    assert sample_main.main(["--ckpt", ckpt, "--out", str(out), "sample.num_samples=6", "sample.batch=4",
                             "sample.num_steps=2", *overrides]) == 0
    with np.load(out) as f:
        settings = json.loads(str(f["settings"]))
        assert f["arr_0"].shape == (6, 16, 16, 3) and ((0 <= f["arr_1"]) & (f["arr_1"] < 10)).all()
    assert {k: settings[k] for k in stored} == stored


def test_a_checkpoint_with_a_nan_weight_is_refused_naming_it(ckpt, tmp_path, capsys):
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in state["ema"].items() if v.is_floating_point())
    state["ema"][key].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    assert sample_main.main(["--ckpt", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "s.npz"), *SAMPLE]) == 2
    err = capsys.readouterr().err
    assert "hold NaN or Inf" in err and key in err
    assert not os.path.exists(tmp_path / "s.npz")


def test_a_batch_that_comes_out_non_finite_is_an_error_naming_it(ckpt, tmp_path, capsys, monkeypatch):
    from srdit.sample import batches

    real = batches.generate
    monkeypatch.setattr(batches, "generate", lambda *a, **k: real(*a, **k) * float("nan"))
    assert sample_main.main(["--ckpt", ckpt, "--out", str(tmp_path / "s.npz"), *SAMPLE]) == 2
    assert "sample batch 0 (samples 0-7) came out with NaN or Inf" in capsys.readouterr().err


def test_two_jobs_on_one_output_the_second_is_refused(ckpt, tmp_path, capsys):
    from srdit.io import OutputLock

    out = tmp_path / "s.npz"
    with OutputLock(f"{out}.lock", "a samples file"):  # as another job holds it
        assert sample_main.main(["--ckpt", ckpt, "--out", str(out), *SAMPLE]) == 2
    assert f"in use by pid {os.getpid()} on host" in capsys.readouterr().err
    assert sample_main.main(["--ckpt", ckpt, "--out", str(out), *SAMPLE]) == 0


def test_a_job_that_failed_before_its_first_batch_blocks_nothing(ckpt, tmp_path):
    out = tmp_path / "s.npz"
    os.makedirs(f"{out}.parts")
    with open(f"{out}.parts/settings.json", "w") as f:
        json.dump({"seed": 123}, f)  # settings of an earlier attempt that wrote no batch
    assert sample_main.main(["--ckpt", ckpt, "--out", str(out), *SAMPLE]) == 0


def test_progress_lines_in_a_log_file(ckpt, tmp_path):
    result = _spawn(["--ckpt", ckpt, "--out", str(tmp_path / "s.npz"), *SAMPLE], 1)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("sample  img 30/30 (100%)") and "elapsed" in line for line in result.stdout.splitlines())


def test_a_float32_sampler_state_is_a_switch_away_and_recorded(ckpt, straight, tmp_path):
    out = tmp_path / "fp32.npz"
    assert sample_main.main(["--ckpt", ckpt, "--out", str(out), *SAMPLE, "sample.state_precision=fp32"]) == 0
    with np.load(out) as a, np.load(straight) as b:
        assert json.loads(str(a["settings"]))["sampler_state_dtype"] == "float32"
        assert a["arr_0"].shape == b["arr_0"].shape and not np.array_equal(a["arr_0"], b["arr_0"])

"""`python -m srdit.train`: outputs, exact resume, kill -9, SIGTERM, DDP equivalence, bad input.

Runs use a shrunken quickstart (every part of the recipe, ~40k parameters, 16 images a step)
so that each takes seconds on the CPU.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from srdit.train.main import main

# train.lr_decay_steps=0: these tests stop and extend runs (train.max_steps), which moves a decay
# that ends at max_steps; the quickstart's decay is tested in test_settings.py
TINY = ["model.hidden=32", "model.heads=2", "model.depth=5", "model.projector_dim=32", "train.global_batch=16",
        "train.log_every=1", "sample.num_steps=3", "train.lr_decay_steps=0"]
ENV = {**os.environ, "TRITON_INTERPRET": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def run(out, *overrides, preset="quickstart"):
    return main(["--preset", preset, "--out", str(out), *TINY, *overrides])


def losses(out) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (a rerun after a crash) keeps the last."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def spawn(out, *overrides, nproc=1, program=("-m", "srdit.train"), env=None):
    """srdit.train (or `program` given its arguments) in a process of its own, or under torchrun."""
    launcher = [sys.executable, *program]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    *program]
    return subprocess.Popen([*launcher, "--preset", "quickstart", "--out", str(out), *TINY, *overrides],
                            env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(out, step, proc, timeout=120):
    """Block until `out`'s metrics.jsonl has logged `step` (the run is then past it)."""
    deadline = time.time() + timeout
    path = os.path.join(out, "metrics.jsonl")
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and max(losses(out), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"run in {out} did not reach step {step}")


def test_run_writes_config_metrics_checkpoints_samples_and_loss_curve(tmp_path):
    assert run(tmp_path, "train.max_steps=4", "train.ckpt_every=2", "train.sample_every=2",
               "train.keep_checkpoints=1") == 0
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.yaml", "loss.png", "metrics.jsonl", "samples"]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "vel", "repa", "cls", "cfm", "lr", "grad_norm", "img_per_s"):
        assert all(key in r and r[key] == r[key] for r in records), key
    for r in records:  # the weighted terms, as the release's logs show them, add up to the loss
        assert (r["repa_w"], r["cls_w"], r["cfm_w"]) == (0.5 * r["repa"], 0.03 * r["cls"], 0.05 * r["cfm"])
        assert abs(r["vel"] + r["repa_w"] + r["cls_w"] + r["cfm_w"] + r["disp_w"] - r["loss"]) < 1e-5
    assert os.listdir(tmp_path / "checkpoints") == ["step_000000004.pt"]  # keep_checkpoints=1
    assert sorted(os.listdir(tmp_path / "samples")) == ["step_000000002.png", "step_000000004.png"]
    from PIL import Image

    grid = Image.open(tmp_path / "samples" / "step_000000004.png")
    assert grid.size == (10 * 18 + 2, 10 * 18 + 2)  # one row per class, 10 samples each, 16 px + border


def test_resume_is_bit_identical_and_may_extend_the_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(straight, "train.max_steps=6", "train.ckpt_every=3") == 0
    assert run(split, "train.max_steps=3", "train.ckpt_every=3") == 0
    assert run(split, "train.max_steps=6", "train.ckpt_every=3", "train.log_every=1") == 0  # extend
    assert losses(split) == losses(straight)  # every step, bit for bit
    a = torch.load(straight / "checkpoints" / "step_000000006.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "step_000000006.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_resume_with_another_config_names_the_keys(tmp_path, capsys):
    assert run(tmp_path, "train.max_steps=1") == 0
    assert run(tmp_path, "train.max_steps=2", "train.lr=0.5", "model.rope=false") == 2
    err = capsys.readouterr().err
    assert "model.rope" in err and "train.lr" in err and "train.max_steps" not in err.split("use a new")[0]


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    assert run(tmp_path, "train.max_steps=4", "train.ckpt_every=2") == 0
    newest = tmp_path / "checkpoints" / "step_000000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    assert run(tmp_path, "train.max_steps=5", "train.ckpt_every=2") == 0
    out = capsys.readouterr().out
    assert "step_000000004.pt is unreadable" in out and "resumed from" in out and "step 2" in out
    straight = tmp_path / "straight"
    assert run(straight, "train.max_steps=5", "train.ckpt_every=2") == 0
    assert losses(tmp_path)[5] == losses(straight)[5]


def test_kill_9_between_checkpoints_continues_from_the_last_good_one(tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = spawn(killed, "train.max_steps=400", "train.ckpt_every=3")
    wait_for_step(killed, 4, proc)  # past the step-3 checkpoint, before the step-6 one
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the resumed and the straight run in processes like the killed one: CPU reductions split by
    # thread count, so bit-identity holds between runs with the same threads (ENV: one)
    for out in (killed, straight):
        output, _ = spawn(out, "train.max_steps=8", "train.ckpt_every=3").communicate(timeout=300)
        assert "done at step 8" in output, output
    assert losses(killed) == losses(straight)


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(tmp_path):
    proc = spawn(tmp_path, "train.max_steps=100000", "train.ckpt_every=100000")
    wait_for_step(tmp_path, 1, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "stopped by signal" in output
    saved = os.listdir(tmp_path / "checkpoints")
    assert len(saved) == 1 and max(losses(tmp_path)) == int(saved[0][5:14])


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """Same samples, same noise rows (drawn for the global batch), CFM rolled within the same
    8-sample micro-batches: 2 ranks x 8 equals 1 rank with 2 accumulation steps of 8."""
    one, two = tmp_path / "one", tmp_path / "two"
    drop = "train.path_drop_prob=0.5"  # both branches (routed and path-dropped) in 4 steps, under DDP's static graph
    assert run(one, "train.max_steps=4", "train.grad_accum=2", drop) == 0
    proc = spawn(two, "train.max_steps=4", "train.grad_accum=1", drop, nproc=2)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    # the run differs only in grad_accum: one process must use it to reproduce the two ranks' split
    a = torch.load(one / "checkpoints" / "step_000000004.pt", weights_only=True)["model"]
    b = torch.load(two / "checkpoints" / "step_000000004.pt", weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
    la, lb = losses(one), losses(two)
    assert la.keys() == lb.keys() and all(abs(la[s] - lb[s]) < 1e-5 for s in la)


@pytest.mark.parametrize("order", ["library", "fixed"])
def test_two_process_resume_is_bit_identical_also_on_one_process(tmp_path, order):
    """2 ranks shard the update (train.shard_optimizer=auto); their checkpoint holds whole
    tensors, so a resume on 2 ranks, and on 1 with the same micro-batch (grad_accum=2), continues
    the run bit for bit. In the library's order the clip is set not to act: its coefficient is
    then exactly 1 (acting, it comes from the norm summed per shard then across ranks on 2, over
    the whole buffer on 1: equal to rounding). train.reduce_order=fixed sums the norm in one order
    at any world size: there the clip acts at every step (tests/train/test_sharding.py: 4 ranks
    to 2 and 1)."""
    straight, split, one = tmp_path / "straight", tmp_path / "split", tmp_path / "one"
    clip = "train.grad_clip=1e9" if order == "library" else "train.grad_clip=0.01"
    common = ["train.ckpt_every=2", clip, f"train.reduce_order={order}"]
    # the resume on the same 2 ranks does not depend on the order: run once
    runs = ((straight, 4, 2), (split, 2, 2), (split, 4, 2), (one, 2, 2)) if order == "library" else \
        ((straight, 4, 2), (one, 2, 2))
    for out, steps, nproc in runs:
        proc = spawn(out, f"train.max_steps={steps}", *common, nproc=nproc)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        assert "update sharded: each rank updates 1/2" in output
    output, _ = spawn(one, "train.max_steps=4", "train.grad_accum=2", *common).communicate(timeout=300)
    assert "resumed from" in output and "done at step 4" in output, output
    assert losses(straight) == losses(one)
    if order == "library":
        assert losses(split) == losses(straight)
    if order == "fixed":
        with open(straight / "metrics.jsonl") as f:
            norms = [r["grad_norm"] for r in map(json.loads, f)]
        assert min(norms) > 0.01, norms  # the clip acted
    final = [torch.load(out / "checkpoints" / "step_000000004.pt", weights_only=True) for out in (straight, one)]
    for part in ("model", "ema"):
        assert all(torch.equal(final[0][part][k], final[1][part][k]) for k in final[0][part]), part
    for a, b in zip(final[0]["optimizer"][0]["state"].values(), final[1]["optimizer"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_steps_are_skipped_then_stop_with_a_clear_error(tmp_path, monkeypatch, capsys):
    from srdit.data.digits import DigitsDataset

    assert run(tmp_path, "train.max_steps=2", "train.ckpt_every=2") == 0  # two good steps, then poisoned data
    clean = DigitsDataset.batch

    def poisoned(self, indices):
        items = clean(self, indices)
        items["latent"] = items["latent"] * float("nan")
        return items

    monkeypatch.setattr(DigitsDataset, "batch", poisoned)
    assert run(tmp_path, "train.max_steps=50", "train.max_bad_steps=3", "train.keep_checkpoints=1") == 2
    assert "3 steps in a row had a non-finite loss" in capsys.readouterr().err
    # the stop's checkpoint rotates none out, although train.keep_checkpoints=1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000000002.pt", "step_000000005.pt"]
    state = torch.load(tmp_path / "checkpoints" / "step_000000005.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())  # no update was applied
    assert state["optimizer"][0]["state"][0]["step"].item() == 2
    # metrics.jsonl is strict JSON: the skipped steps' NaN loss is null
    rows = [json.loads(line, parse_constant=lambda word: pytest.fail(f"bare {word} in metrics.jsonl"))
            for line in open(tmp_path / "metrics.jsonl")]
    assert [r["loss"] is None for r in rows] == [False, False, True, True, True]


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert main(["--preset", "sr-dit-b1-256", "--out", str(tmp_path / "a")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["--preset", "quickstart", "--out", str(tmp_path / "b"), "train.nonsense=1"]) == 2
    assert "unknown config key 'train.nonsense'" in capsys.readouterr().err
    assert main(["--preset", "quickstart", "--out", str(tmp_path / "d"), "data.cached_teacher=true"]) == 2
    assert "set data.cached_teacher=false" in capsys.readouterr().err  # images, not cached targets
    assert main(["--preset", "sr-dit-b1-256", "--out", str(tmp_path / "e"), "--data", str(tmp_path / "nothere")]) == 2
    assert "nothere" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "c")])  # --preset is required (argparse)


def test_muon_runs_and_prodigy_without_its_package_says_what_to_install(tmp_path, capsys):
    assert run(tmp_path / "muon", "train.max_steps=2", "train.optimizer=muon") == 0
    state = torch.load(tmp_path / "muon" / "checkpoints" / "step_000000002.pt", weights_only=True)
    assert len(state["optimizer"]) == 2  # Muon for the body's matrices, AdamW for the rest
    try:
        import prodigyopt  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install prodigyopt"):
            run(tmp_path / "prodigy", "train.max_steps=1", "train.optimizer=prodigy")

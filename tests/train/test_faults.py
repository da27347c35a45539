"""Nothing lost, nothing silent: checkpoints that do not load or cannot be used, weights that are
not finite, a failed first launch, a full or read-only disk, two trainers on one folder, the
history after a resume, a stop between log steps, progress in a log file."""
import builtins
import errno
import glob
import json
import os
import shutil
import signal

import pytest
import torch
from test_train import TINY, losses, run, spawn, wait_for_step

from srdit.train import checkpoint
from srdit.train.main import main


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished run of 4 steps with checkpoints at 2 and 4, to copy and damage."""
    out = tmp_path_factory.mktemp("four_steps")
    assert run(out, "train.max_steps=4", "train.ckpt_every=2") == 0
    return out


def damaged_copy(four_steps, out, damage) -> str:
    """A copy of four_steps in `out` whose newest checkpoint went through damage(checkpoint dict)."""
    shutil.copytree(four_steps, out, dirs_exist_ok=True)
    newest = os.path.join(out, "checkpoints", "step_000000004.pt")
    saved = torch.load(newest, weights_only=True)
    damage(saved)
    torch.save(saved, newest)
    return newest


def steps_logged(out) -> list[int]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if "loss" in json.loads(line)]


def test_checkpoints_that_all_fail_to_load_stop_the_run_and_restart_moves_them_aside(tmp_path, capsys):
    assert run(tmp_path, "train.max_steps=4", "train.ckpt_every=2") == 0
    files = sorted(glob.glob(str(tmp_path / "checkpoints" / "step_*.pt")))
    for path in files:
        open(path, "wb").write(b"not a checkpoint")
    assert run(tmp_path, "train.max_steps=6", "train.ckpt_every=2") == 2
    err = capsys.readouterr().err
    assert "none of the 2 checkpoint(s)" in err and "step_000000004.pt" in err and "--restart" in err
    assert "weights_only=False" not in err  # never the advice to load unsafely
    assert sorted(glob.glob(str(tmp_path / "checkpoints" / "step_*.pt"))) == files  # untouched
    assert main(["--preset", "quickstart", "--out", str(tmp_path), "--restart", *TINY, "train.max_steps=2",
                 "train.ckpt_every=2"]) == 0
    previous = glob.glob(str(tmp_path / "previous-*"))
    assert len(previous) == 1 and len(glob.glob(os.path.join(previous[0], "checkpoints", "step_*.pt"))) == 2
    assert os.path.exists(os.path.join(previous[0], "metrics.jsonl")) and steps_logged(tmp_path) == [1, 2]


def test_an_unreadable_newest_checkpoint_is_moved_aside_not_overwritten_or_rotated(tmp_path, capsys):
    assert run(tmp_path, "train.max_steps=4", "train.ckpt_every=2") == 0
    newest = tmp_path / "checkpoints" / "step_000000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert run(tmp_path, "train.max_steps=8", "train.ckpt_every=2", "train.keep_checkpoints=1") == 0
    assert "moved 1 unreadable checkpoint(s)" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "unreadable" / "step_000000004.pt").stat().st_size == 1000
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")] == ["step_000000008.pt"]


def test_rotation_keeps_files_of_later_steps_it_did_not_write(tmp_path):
    for step in (2, 4, 6, 99):
        (tmp_path / f"step_{step:09d}.pt").write_bytes(b"x")
    checkpoint.rotate(str(tmp_path), keep=1, newest=6)
    assert sorted(os.listdir(tmp_path)) == ["step_000000006.pt", "step_000000099.pt"]


def test_a_failed_first_launch_does_not_block_its_folder(tmp_path, capsys):
    assert run(tmp_path, "train.max_steps=2", "data.teacher=/nonexistent/dinov2.pth") == 2
    assert "/nonexistent/dinov2.pth" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "config.yaml")  # nothing written before the checks
    (tmp_path / "config.yaml").write_text("train:\n  lr: 0.5\n")  # an older failed attempt's, no checkpoint
    assert run(tmp_path, "train.max_steps=2") == 0  # the corrected command runs


class FullDisk:
    """A file on a disk that fills up after `room` bytes: write() raises ENOSPC as the OS does,
    naming no file."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        self.room -= len(data) if isinstance(data, (str, bytes)) else memoryview(data).nbytes
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("module, name", [("srdit.io", "step_000000002.pt"), ("srdit.train.runlog", "metrics.jsonl")])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch,
                                                                              module, name):
    """The checkpoint through torch's real zip writer (which hid the ENOSPC behind "unexpected
    pos"), and metrics.jsonl."""
    def opening(path, *args, **kwargs):
        f = builtins.open(path, *args, **kwargs)
        return FullDisk(f, room=100) if name.split(".")[0] in os.path.basename(path) else f

    monkeypatch.setattr(module + ".open", opening, raising=False)
    assert run(tmp_path, "train.max_steps=2", "train.ckpt_every=2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device (ENOSPC)" in err and name in err, err
    assert not glob.glob(str(tmp_path / "checkpoints" / "*.tmp.*"))


def test_a_full_disk_under_the_lock_names_it(tmp_path, monkeypatch):
    from srdit.io import OutputLock, describe_error

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as raised:
        OutputLock(str(tmp_path / ".lock"), "the run folder").__enter__()
    monkeypatch.undo()
    assert describe_error(raised.value) == f"No space left on device (ENOSPC): {tmp_path / '.lock'}"


def test_a_read_only_folder_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    import srdit.io

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(srdit.io, "open", refuse, raising=False)  # every atomic write of the run
    assert run(tmp_path, "train.max_steps=1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Permission denied (EACCES)" in err and "config.yaml" in err


def test_temporaries_of_a_killed_run_are_removed_at_start(tmp_path, capsys):
    assert run(tmp_path, "train.max_steps=2", "train.ckpt_every=2") == 0
    stale = [tmp_path / "checkpoints" / "step_000000004.pt.tmp.4242", tmp_path / "config.yaml.tmp.4242"]
    for path in stale:
        path.write_bytes(b"half")
    assert run(tmp_path, "train.max_steps=3", "train.ckpt_every=2") == 0
    assert not any(p.exists() for p in stale) and "removed" in capsys.readouterr().out


def test_two_trainers_on_one_folder_the_second_is_refused_naming_the_first(tmp_path, capsys):
    first = spawn(tmp_path, "train.max_steps=100000", "train.ckpt_every=1000000")
    try:
        wait_for_step(tmp_path, 1, first)
        assert run(tmp_path, "train.max_steps=100000") == 2
        err = capsys.readouterr().err
        assert f"pid {first.pid} on host" in err and "in use" in err
    finally:
        first.kill()
        first.wait()
    assert run(tmp_path, "train.max_steps=2") == 0  # a killed holder's lock is gone with it


def test_a_resumed_run_keeps_one_history(tmp_path):
    assert run(tmp_path, "train.max_steps=4", "train.ckpt_every=2") == 0
    os.remove(tmp_path / "checkpoints" / "step_000000004.pt")  # as if killed after logging step 4
    assert run(tmp_path, "train.max_steps=5", "train.ckpt_every=2") == 0
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5]
    straight = tmp_path / "straight"
    assert run(straight, "train.max_steps=5", "train.ckpt_every=2") == 0
    assert losses(tmp_path) == losses(straight)


def test_progress_lines_in_a_log_file(tmp_path):
    proc = spawn(tmp_path, "train.max_steps=4", "train.log_every=2")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    lines = [line for line in out.splitlines() if line.startswith("train  step ")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"]
    for line in lines:
        for word in ("loss", "img/s", "elapsed", "ETA"):
            assert word in line, line


@pytest.mark.parametrize("backend", ["fa3", "fa4", "xformers"])
def test_gpu_attention_backends_on_the_cpu_are_refused_with_the_fix(tmp_path, capsys, backend):
    assert run(tmp_path, "train.max_steps=1", f"model.attention_backend={backend}") == 2
    assert f"model.attention_backend={backend} needs a CUDA GPU" in capsys.readouterr().err


def test_a_missing_fa3_names_what_to_install(monkeypatch):
    """The FA3 registry's own failure ("No module named ...") must not replace the message that
    says what to install."""
    import importlib.util

    from srdit.config import ConfigError
    from srdit.kernels import attention

    if importlib.util.find_spec("flash_attn_interface") is not None:
        pytest.skip("FlashAttention-3 is installed here")
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)  # get past the GPU check
    attention._fa3.cache_clear()
    try:
        with pytest.raises(ConfigError, match="needs the package flash_attn_interface"):
            attention.backend_fn("fa3")
    finally:
        attention._fa3.cache_clear()


def test_a_missing_xformers_names_what_to_install(monkeypatch):
    import importlib.util

    from srdit.config import ConfigError
    from srdit.kernels import attention

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)  # get past the GPU check
    attention._xformers.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"needs the package xformers \(pip install xformers"):
            attention.backend_fn("xformers")
    finally:
        attention._xformers.cache_clear()


def poison_after(monkeypatch, step: int):
    """From `step` on, one weight of the model is NaN (an update that overflowed)."""
    import srdit.train.main as train_main

    one_step = train_main.train_one_step

    def overflowing(run_, batches):
        one_step(run_, batches)
        if run_.state.step == step:
            with torch.no_grad():
                next(run_.state.model.parameters()).view(-1)[0] = float("nan")

    monkeypatch.setattr(train_main, "train_one_step", overflowing)


def test_non_finite_weights_are_never_saved_and_rotate_no_good_checkpoint_out(tmp_path, monkeypatch, capsys):
    assert run(tmp_path, "train.max_steps=2", "train.ckpt_every=2", "train.keep_checkpoints=1") == 0
    poison_after(monkeypatch, 3)
    assert run(tmp_path, "train.max_steps=8", "train.ckpt_every=2", "train.keep_checkpoints=1") == 2
    err = capsys.readouterr().err
    assert "the weights at step 4 hold NaN or Inf, so they were not saved" in err
    assert "step_000000002.pt, is the last good state" in err
    assert os.listdir(tmp_path / "checkpoints") == ["step_000000002.pt"]


DAMAGES = {  # the newest checkpoint's damage, and what the log must say of it
    "nan": (lambda sd: sd["ema"][next(iter(sd["ema"]))].view(-1).__setitem__(0, float("nan")), "hold NaN or Inf"),
    "shape": (lambda sd: sd["model"].__setitem__(next(iter(sd["model"])), torch.zeros(3)), "size mismatch for"),
    "missing": (lambda sd: sd["model"].pop(next(iter(sd["model"]))), "Missing key(s)"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_newest_checkpoint_that_cannot_be_used_is_set_aside_and_the_previous_one_used(four_steps, tmp_path, capsys,
                                                                                      damage):
    change, said = DAMAGES[damage]
    damaged_copy(four_steps, tmp_path, change)
    assert run(tmp_path, "train.max_steps=5", "train.ckpt_every=2") == 0
    out = capsys.readouterr().out
    assert "step_000000004.pt is unreadable" in out and said in out, out
    assert "moved 1 unreadable checkpoint(s)" in out and "step_000000002.pt at step 2" in out
    assert (tmp_path / "checkpoints" / "unreadable" / "step_000000004.pt").exists()


@pytest.mark.parametrize("damage, said", [(lambda sd: sd["config"].pop("sample"), "has no section sample"),
                                          (lambda sd: sd["config"]["train"].update(bogus=1),
                                           "unknown config key 'train.bogus'")])
def test_a_checkpoint_config_without_a_section_or_with_an_unknown_key_says_it_came_from_there(
        four_steps, tmp_path, capsys, damage, said):
    newest = damaged_copy(four_steps, tmp_path, damage)
    assert run(tmp_path, "train.max_steps=5", "train.ckpt_every=2") == 2
    err = capsys.readouterr().err
    assert f"the config stored in {newest}" in err and said in err, err


def test_resuming_past_max_steps_says_so(four_steps, tmp_path, capsys):
    shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
    assert run(tmp_path, "train.max_steps=2") == 2
    err = capsys.readouterr().err
    assert "holds a run at step 4 (step_000000004.pt), past train.max_steps=2: raise train.max_steps" in err


def test_a_half_written_last_metrics_line_is_dropped_and_damage_before_it_is_named(four_steps, tmp_path, capsys):
    shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 0.41')  # killed while writing step 5's row
    assert run(tmp_path, "train.max_steps=5", "train.ckpt_every=2") == 0
    assert "dropped 1 line(s) of" in capsys.readouterr().out
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5]
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join([lines[0], '{"step": 2, "lo\n', *lines[2:]]))
    assert run(tmp_path, "train.max_steps=5") == 2
    err = capsys.readouterr().err
    assert f"{metrics} line 2 is not a JSON row" in err and "repair or delete that line" in err


def test_a_stop_between_log_steps_logs_the_steps_since_the_last_row(tmp_path, monkeypatch, capsys):
    import srdit.train.main as train_main

    one_step = train_main.train_one_step

    def signalled(run_, batches):
        one_step(run_, batches)
        if run_.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_main, "train_one_step", signalled)
    assert run(tmp_path, "train.max_steps=100", "train.log_every=2") == 0
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 3]
    assert f"stopped by signal at step 3 (loss {rows[-1]['loss']:.4f})" in capsys.readouterr().out
    assert os.listdir(tmp_path / "checkpoints") == ["step_000000003.pt"]


def test_a_resume_that_changes_the_micro_batch_is_refused_unless_allowed(tmp_path, capsys):
    assert run(tmp_path, "train.max_steps=2", "train.ckpt_every=2") == 0  # 1 rank x 1 micro-batch of 16
    assert run(tmp_path, "train.max_steps=3", "train.grad_accum=2") == 2
    err = capsys.readouterr().err
    assert "with micro-batch 16" in err and "make it 8" in err and "add train.grad_accum=1 to keep it exact" in err
    assert run(tmp_path, "train.max_steps=3", "train.grad_accum=2", "train.allow_micro_batch_change=true") == 0
    assert "warning: step_000000002.pt was written by 1 rank(s) with micro-batch 16" in capsys.readouterr().out


def test_another_world_size_keeps_the_math_with_the_grad_accum_it_names():
    from srdit.config import ConfigError, apply_overrides, preset
    from srdit.train.resume import check_micro_batch
    from srdit.trainstate import written_layout

    def cfg(*overrides):
        return apply_overrides(preset("quickstart"), [*TINY, *overrides])

    def never(line):
        raise AssertionError(line)

    # a checkpoint from before the layout was stored: 1 rank (one RNG state) x 2 micro-batches of 8
    saved = {"data": {"step": 2, "seed": 0}, "rng": [{}], "config": cfg("train.grad_accum=2").to_dict()}
    assert written_layout(saved) == (1, 8)
    check_micro_batch(saved, cfg("train.grad_accum=1"), 2, "step_2.pt", never)  # 2 ranks x 1 x 8: exact
    with pytest.raises(ConfigError, match=r"make it 4, .*: add train.grad_accum=1 to keep it exact"):
        check_micro_batch(saved, cfg("train.grad_accum=2"), 2, "step_2.pt", never)
    with pytest.raises(ConfigError, match="no train.grad_accum keeps micro-batch 8 on 4 rank"):
        check_micro_batch(saved, cfg("train.global_batch=8"), 4, "step_2.pt", never)

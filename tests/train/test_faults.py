"""Nothing lost, nothing silent: checkpoints that do not load, a failed first launch, a full or
read-only disk, two trainers on one folder, the history after a resume, progress in a log file."""
import errno
import glob
import json
import os

import pytest
import torch
from test_train import TINY, losses, run, spawn, wait_for_step

from srdit.train import checkpoint
from srdit.train.main import main


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


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    def full(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name

    monkeypatch.setattr(torch, "save", full)
    assert run(tmp_path, "train.max_steps=2", "train.ckpt_every=2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device (ENOSPC)" in err and "step_000000002.pt" in err
    assert not glob.glob(str(tmp_path / "checkpoints" / "*.tmp.*"))


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

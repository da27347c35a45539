"""Training checkpoint files: named by step, written atomically, rotated, loaded with
weights_only=True, with fallback to an older one. What is in a checkpoint is srdit.trainstate's
business; this module only keeps the files.

A checkpoint is written to a temporary file, fsynced and renamed (srdit.io.atomic_write), so a
crash leaves either the old or the new file, never half of one; weights that are not finite are
never written (srdit.train refuses to save them: all_finite). Nothing a user could still want
is deleted: rotation removes only older checkpoints of the same run, and a checkpoint that
cannot be used (it does not load, its weights hold NaN or Inf, its tensors do not fit the model)
is moved aside to `unreadable/`, never deleted.
"""
from __future__ import annotations

import glob
import os
import re

import torch
import torch.nn as nn

from srdit import trainstate
from srdit.config import ConfigError
from srdit.io import atomic_write, describe_load_error, non_finite_tensors
from srdit.train.flat import flat_view

_NAME = re.compile(r"step_(\d{9})\.pt$")
UNREADABLE = "unreadable"


class NoLoadableCheckpoint(RuntimeError):
    """Checkpoints exist, but none of them loads."""


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:09d}.pt")


def step_of(path: str) -> int:
    return int(_NAME.search(path).group(1))


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint files of `directory`, newest (highest step) first."""
    paths = [p for p in glob.glob(os.path.join(directory, "step_*.pt")) if _NAME.search(p)]
    return sorted(paths, key=step_of, reverse=True)


def save(state_dict: dict, directory: str, step: int) -> str:
    path = checkpoint_path(directory, step)
    os.makedirs(directory, exist_ok=True)
    with atomic_write(path) as f:
        try:
            torch.save(state_dict, f)
        except RuntimeError as error:
            # torch's zip writer reports a failed write (a full disk) as "unexpected pos ..."; the
            # OSError behind it is its context: raise that, and atomic_write names the file
            if isinstance(error.__context__, OSError):
                raise error.__context__ from None
            raise
    return path


def all_finite(*modules: nn.Module) -> bool:
    """Whether every parameter of `modules` is finite, at the cost of one reduction per module
    (the min and max of its flat parameter buffer, srdit.train.flat, which a NaN or an Inf
    shows in) and one host read for all: checked for each checkpoint, never for a step."""
    ends = []
    for module in modules:
        params = list(module.parameters())
        flat = flat_view(params)
        ends += [torch.stack(torch.aminmax(t)) for t in ([flat] if flat is not None else params) if t.numel()]
    return bool(torch.isfinite(torch.cat(ends)).all()) if ends else True


def rotate(directory: str, keep: int, newest: int) -> None:
    """Delete all but the newest `keep` checkpoints of steps <= `newest` (the step just saved);
    a file of a later step, which this run did not write, is never touched."""
    ours = [p for p in list_checkpoints(directory) if step_of(p) <= newest]
    for path in ours[max(1, keep):]:
        os.remove(path)


def check_finite(saved: dict) -> None:
    """A ValueError naming the tensors of a checkpoint's model and EMA that hold NaN or Inf."""
    bad = [f"{part} {name}" for part in ("model", "ema") for name in non_finite_tensors(saved[part])]
    if bad:
        raise ValueError(f"its weights hold NaN or Inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")


def load_latest(directory: str, use, log=print) -> tuple[str | None, list[str]]:
    """Find the newest usable checkpoint of `directory` and `use(checkpoint, path)` it (load it
    into the live objects); return (its path, the newer files that could not be used). One that
    does not load (truncated, corrupt, a foreign file), holds NaN or Inf weights, or whose
    tensors `use` cannot take (another shape, a missing key) is reported and the previous one is
    tried. A ConfigError from `use` (the checkpoint's settings are not this command's) is the
    user's to resolve and propagates. (None, []) when there is none; NoLoadableCheckpoint when
    files exist but none can be used (starting over silently would lose the run)."""
    unreadable = []
    for path in list_checkpoints(directory):
        try:
            saved = trainstate.check(torch.load(path, map_location="cpu", weights_only=True))
            check_finite(saved)
            use(saved, path)
            return path, unreadable
        except ConfigError:
            raise
        except Exception as error:  # truncated, corrupt, not finite, or not this model's: say so, fall back
            log(f"checkpoint {path} is unreadable ({describe_load_error(error)[:300]}); trying the previous one")
            unreadable.append(path)
    if unreadable:
        names = ", ".join(map(os.path.basename, unreadable))
        raise NoLoadableCheckpoint(
            f"none of the {len(unreadable)} checkpoint(s) in {directory} loads ({names}); to start this run over, "
            "add --restart (the previous run's files are moved to a folder beside them, nothing is deleted)")
    return None, []


def set_aside(paths: list[str], directory: str) -> list[str]:
    """Move checkpoints that do not load to `directory/unreadable/` (kept for inspection, and out
    of the way of rotation and of this run's own files of the same name)."""
    moved = []
    if paths:
        os.makedirs(os.path.join(directory, UNREADABLE), exist_ok=True)
    for path in paths:
        target = os.path.join(directory, UNREADABLE, os.path.basename(path))
        os.replace(path, target)
        moved.append(target)
    return moved

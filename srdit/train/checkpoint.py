"""Training checkpoint files: named by step, written atomically, rotated, loaded with
weights_only=True, with fallback to an older one. What is in a checkpoint is srdit.trainstate's
business; this module only keeps the files.

A checkpoint is written to a temporary file, fsynced and renamed (srdit.io.atomic_write), so a
crash leaves either the old or the new file, never half of one. Nothing a user could still want
is deleted: rotation removes only older checkpoints of the same run, and a checkpoint that does
not load is moved aside to `unreadable/`, never deleted.
"""
from __future__ import annotations

import glob
import os
import re

import torch

from srdit import trainstate
from srdit.io import atomic_write, describe_load_error

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
        torch.save(state_dict, f)
    return path


def rotate(directory: str, keep: int, newest: int) -> None:
    """Delete all but the newest `keep` checkpoints of steps <= `newest` (the step just saved);
    a file of a later step, which this run did not write, is never touched."""
    ours = [p for p in list_checkpoints(directory) if step_of(p) <= newest]
    for path in ours[max(1, keep):]:
        os.remove(path)


def load_latest(directory: str, log=print) -> tuple[dict | None, str | None, list[str]]:
    """(checkpoint, its path, the newer files that did not load) for the newest readable
    checkpoint of `directory`; a corrupt or truncated one is reported and the previous one is
    tried. (None, None, []) when there is none; NoLoadableCheckpoint when files exist but none
    loads (starting over silently would lose the run)."""
    unreadable = []
    for path in list_checkpoints(directory):
        try:
            return trainstate.check(torch.load(path, map_location="cpu", weights_only=True)), path, unreadable
        except Exception as error:  # truncated, corrupt, or foreign file: say so, fall back
            log(f"checkpoint {path} is unreadable ({describe_load_error(error)[:300]}); trying the previous one")
            unreadable.append(path)
    if unreadable:
        names = ", ".join(map(os.path.basename, unreadable))
        raise NoLoadableCheckpoint(
            f"none of the {len(unreadable)} checkpoint(s) in {directory} loads ({names}); to start this run over, "
            "add --restart (the previous run's files are moved to a folder beside them, nothing is deleted)")
    return None, None, []


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

"""Training checkpoint files: named by step, written atomically, rotated, loaded with
weights_only=True, with fallback to an older one. What is in a checkpoint is srdit.trainstate's
business; this module only keeps the files.

A checkpoint is written to a temporary file, fsynced and renamed (srdit.io.atomic_write), so a
crash leaves either the old or the new file, never half of one; the newest `keep` are kept, and
the only good one is never deleted.
"""
from __future__ import annotations

import glob
import os
import re

import torch

from srdit import trainstate
from srdit.io import atomic_write

_NAME = re.compile(r"step_(\d{9})\.pt$")


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:09d}.pt")


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint files of `directory`, newest (highest step) first."""
    paths = [p for p in glob.glob(os.path.join(directory, "step_*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)), reverse=True)


def save(state_dict: dict, directory: str, step: int) -> str:
    path = checkpoint_path(directory, step)
    os.makedirs(directory, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(state_dict, f)
    return path


def rotate(directory: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (never fewer than one)."""
    for path in list_checkpoints(directory)[max(1, keep):]:
        os.remove(path)


def load_latest(directory: str, log=print) -> tuple[dict, str] | tuple[None, None]:
    """The newest readable checkpoint of `directory` and its path; a corrupt or truncated one is
    reported and the previous one is tried. (None, None) when there is none."""
    for path in list_checkpoints(directory):
        try:
            return trainstate.check(torch.load(path, map_location="cpu", weights_only=True)), path
        except Exception as error:  # truncated, corrupt, or foreign file: say so, fall back
            log(f"checkpoint {path} is unreadable ({type(error).__name__}: {str(error)[:200]}); "
                "falling back to the previous one")
    return None, None

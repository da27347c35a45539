"""Training checkpoints: atomic, rotated, loaded with weights_only=True, with fallback.

A checkpoint holds everything a resumed run needs to continue the same trajectory: model, EMA,
optimizer, step, the step/host generators (which draw all noise, routing and path-drop coins),
every rank's global RNG states (torch, CUDA, numpy, python), the data position and the config.
It is written to a temporary file, fsynced and renamed, so a crash leaves either the old or the
new file, never half of one; the newest `keep` are kept, and the only good one is never deleted.
"""
from __future__ import annotations

import glob
import os
import random
import re

import numpy as np
import torch

from srdit.io import atomic_write

FORMAT = "srdit-train-v1"
_NAME = re.compile(r"step_(\d{9})\.pt$")


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:09d}.pt")


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint files of `directory`, newest (highest step) first."""
    paths = [p for p in glob.glob(os.path.join(directory, "step_*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)), reverse=True)


def capture_rng() -> dict:
    """This process's global RNG states as plain Python values: they survive both
    torch.load(weights_only=True) and all_gather_object (which cannot carry tensors here)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_atomic(obj: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)


def rotate(directory: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (never fewer than one)."""
    for path in list_checkpoints(directory)[max(1, keep):]:
        os.remove(path)


def _load_one(path: str) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"not an srdit training checkpoint (format {obj.get('format') if isinstance(obj, dict) else type(obj).__name__})")
    return obj


def load_latest(directory: str, log=print) -> tuple[dict, str] | tuple[None, None]:
    """The newest readable checkpoint of `directory` and its path; a corrupt or truncated one is
    reported and the previous one is tried. (None, None) when there is none."""
    for path in list_checkpoints(directory):
        try:
            return _load_one(path), path
        except Exception as error:  # truncated, corrupt, or foreign file: say so, fall back
            log(f"checkpoint {path} is unreadable ({type(error).__name__}: {str(error)[:200]}); "
                "falling back to the previous one")
    return None, None

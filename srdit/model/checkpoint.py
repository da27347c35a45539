"""Release checkpoints (SwayStar123/SpeedrunDiT) into srdit models.

srdit names its modules as the release does, so conversion is the identity on keys apart from
wrappers that training frameworks add (`module.` from DDP, `_orig_mod.` from torch.compile).
A release training checkpoint is `torch.save({"model", "ema", "opt", "args", "steps"})` with an
argparse.Namespace in "args"; `torch.load(weights_only=True)` accepts it once Namespace is
allowed. The sampler-facing weights are the EMA ones.
"""
from __future__ import annotations

import argparse
import os

import torch

from srdit.io import describe_load_error

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def convert_release_state_dict(sd: dict) -> dict:
    """A release state dict (shared/release_state_dict_256.json layout) in srdit's layout.

    The layouts agree, so this only strips DDP/compile prefixes. The frozen pos_embed and the
    RoPE tables are kept as stored: the release EMA averaged pos_embed too.
    """
    out = {}
    for key, value in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_release_weights(path: str | os.PathLike, which: str = "ema") -> dict:
    """The state dict in a release file: a training checkpoint ({model, ema, opt, args, steps};
    `which` picks "ema" or "model") or a bare state dict, converted to srdit's layout."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"release checkpoint {path!r} does not exist (expected e.g. a SpeedrunDiT 0400000.pt)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or pickled objects a safe load refuses
        raise ValueError(f"cannot read {path} as a release checkpoint: {describe_load_error(error)}") from error
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, found {type(obj).__name__}")
    if which in obj and isinstance(obj[which], dict):
        obj = obj[which]
    elif "model" in obj and isinstance(obj["model"], dict):
        raise ValueError(f"{path}: a training checkpoint without {which!r}; its keys are {sorted(obj)}")
    return convert_release_state_dict(obj)

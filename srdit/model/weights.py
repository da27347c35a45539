"""Reading weight files of pretrained networks: one loader, one mismatch report, shared by the
DINOv2 and INVAE loaders (and anything else that loads an original-format state dict)."""
from __future__ import annotations

import os

import torch

from srdit.io import describe_load_error


def describe_mismatch(sd: dict, ref: dict, limit: int = 5) -> str:
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(ref[k].shape)}"
        for k in ref
        if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape)
    ]
    parts = []
    for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {name}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_state_file(path, expected: str, wrappers: tuple[str, ...]) -> dict:
    """torch.load(weights_only=True) a flat state dict, unwrapping one optional wrapper key."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (expected the file {expected})")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, or pickled objects weights_only refuses
        raise ValueError(f"cannot read {path} as a state dict (expected the file {expected}): "
                         f"{describe_load_error(error)}") from error
    if isinstance(sd, dict):
        for key in wrappers:
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors (expected the file {expected})")
    return sd

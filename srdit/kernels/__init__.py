"""Fused ops and their eager twins; `get_ops(cfg.model.kernels)` picks one set for the model.

The model calls only what `get_ops` returns (STYLE 7: the model does not know how it is run).
Every set has the same functions with the same signatures as srdit/kernels/reference.py.
"""
from __future__ import annotations

from types import ModuleType

from srdit.config import KERNELS, ConfigError


def get_ops(kind: str) -> ModuleType:
    """The op set for cfg.model.kernels (one of srdit.config.KERNELS)."""
    if kind == "eager":
        from srdit.kernels import reference

        return reference
    raise ConfigError(f"model.kernels={kind!r} is not one of {', '.join(map(repr, KERNELS))}")

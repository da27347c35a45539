"""Scaled dot-product attention behind one switch, cfg.model.attention_backend.

q, k, v [B,H,N,Dh] -> [B,H,N,Dh]; no mask, no dropout, scale Dh^-0.5 (as the release).
"sdpa" is torch's dispatcher (flash / cuDNN / memory-efficient / math, chosen by torch);
"eager" is the textbook softmax(q k^T / sqrt(Dh)) v, for tests and as the slowest baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from srdit.config import ATTENTION_BACKENDS, ConfigError


def eager_attention(q, k, v):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, N, N]
    return scores.softmax(dim=-1).to(v.dtype) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "eager":
        return eager_attention(q, k, v)
    raise ConfigError(f"attention_backend={backend!r} is not one of {', '.join(map(repr, ATTENTION_BACKENDS))}")

"""The sample grid a run draws every train.sample_every steps: the EMA model, fixed noise, one
row per class (up to 10 classes x 10), decoded and saved as samples/step_<step>.png."""
from __future__ import annotations

import functools
import os

import torch

from srdit.config import Config
from srdit.sample.generate import decode_uint8, generate, save_grid

GRID_SEED_OFFSET = 12345  # the grid's noise generator is seeded train.seed + this, the same all run long


def grid_labels(cfg: Config, device: torch.device) -> torch.Tensor:
    """The grid's labels: classes 0..9 (or fewer), ten of each, one class per row."""
    classes = min(cfg.model.num_classes, 10)
    return torch.arange(classes, device=device).repeat_interleave(10)


def can_decode(cfg: Config) -> bool:
    """Pixel-space models always; latent models when data.invae names the decoder."""
    return cfg.model.in_channels == 1 or bool(cfg.data.invae)


@torch.no_grad()
def write_sample_grid(ema_model, cfg: Config, device: torch.device, png: str) -> bool:
    """EMA samples with the run's fixed noise and labels, decoded and saved as a grid; False when
    there is nothing to decode latents with (no data.invae for a latent-space preset)."""
    if not can_decode(cfg):
        return False
    labels = grid_labels(cfg, device)
    generator = torch.Generator(device).manual_seed(cfg.train.seed + GRID_SEED_OFFSET)
    latents = generate(ema_model, cfg, labels, generator=generator)
    vae = _decoder(cfg.data.invae, device) if cfg.data.invae else None
    os.makedirs(os.path.dirname(png), exist_ok=True)
    save_grid(decode_uint8(latents, cfg, vae), png, nrow=10)
    return True


@functools.lru_cache(maxsize=1)
def _decoder(path: str, device: torch.device):
    from srdit.model.invae import load_invae

    return load_invae(path).to(device)

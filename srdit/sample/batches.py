"""Sample batches that do not depend on who draws them: batch b of a run holds the global samples
b * batch .. min((b + 1) * batch, num_samples) - 1, and everything random in it (labels when not
balanced, the initial noise, the SDE noise) comes from one generator seeded by (seed, b). Any
number of ranks taking batches round-robin, in any order, resumed or not, therefore produces
the same samples. What they do depend on: the seed, the batch size (it groups the noise) and the
device type (CPU and CUDA generators differ), all of which are stored with the samples.

Labels: balanced = global index mod num_classes (SPEC 5: exactly 50 per class in 50K), else
uniform draws from the batch's generator.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from srdit.config import Config
from srdit.sample.generate import decode_uint8, generate
from srdit.sample.samplers import balanced_labels


def num_batches(num_samples: int, batch: int) -> int:
    return -(-num_samples // batch)


def batch_range(b: int, num_samples: int, batch: int) -> tuple[int, int]:
    """Global indices [start, stop) of batch b."""
    start = b * batch
    if not 0 <= start < num_samples:
        raise IndexError(f"batch {b} is outside {num_batches(num_samples, batch)} batches")
    return start, min(start + batch, num_samples)


def batch_seed(seed: int, b: int) -> int:
    """A 63-bit seed for batch b of a run seeded `seed`: numpy's SeedSequence hashes the pair, so
    neighbouring (seed, b) give unrelated streams (seed + b would make run 1 batch 0 = run 0 batch 1)."""
    if seed < 0:
        raise ValueError(f"sample.seed must be >= 0, got {seed}")
    return int(np.random.SeedSequence([seed, b]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast for sample.precision=bf16 (the sampler state stays fp32); fp32 otherwise."""
    if cfg.sample.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def generate_batch(model, cfg: Config, b: int, *, device: torch.device, vae=None,
                 num_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch b of the run described by cfg.sample (num_samples overrides sample.num_samples):
    (uint8 images [n, 3, H, W], int64 labels [n]) on `device`, decoded (`decode_uint8`). Latents
    that are not finite are an error naming the batch (one host read per batch)."""
    s = cfg.sample
    start, stop = batch_range(b, num_samples or s.num_samples, s.batch)
    generator = torch.Generator(device).manual_seed(batch_seed(s.seed, b))
    num_classes = cfg.model.num_classes
    if s.balanced_labels:
        labels = balanced_labels(stop - start, num_classes, offset=start, device=device)
    else:
        labels = torch.randint(0, num_classes, (stop - start,), generator=generator, device=device)
    with autocast(cfg, device):
        latents = generate(model, cfg, labels, generator=generator)
        if not torch.isfinite(latents).all():  # uint8 conversion would turn NaN into black images
            raise ValueError(f"sample batch {b} (samples {start:,}-{stop - 1:,}) came out with NaN or Inf values: "
                             "the model produced them (weights, precision or sampler settings)")
        images = decode_uint8(latents.float(), cfg, vae)
    return images, labels

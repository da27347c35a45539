"""A fast evaluation for the training loop: FID on 10K samples (against the reference's mu/sigma)
and KDD, without writing images to disk.

    ref = QuickReference.load(cfg.eval.reference, inception=inc, kdd_teacher=dino)  # once
    record = quick_eval(ema.model, cfg, inception=inc, kdd_teacher=dino, ref=ref)   # every N steps
    # {"fid10k": ..., "kdd": ..., "quick_eval_s": ...}

`build_quick_eval(cfg, device)` loads the networks and the reference from cfg.eval (inception,
kdd_teacher, reference) and cfg.data.invae and returns a closure `evaluate(model) -> record`.

Samples are the batches `python -m srdit.sample` would make with cfg.sample (same seeds, labels,
sampler, precision), num_samples overriding sample.num_samples, so the numbers track the final
50K evaluation's settings. Under torch.distributed every rank samples its round-robin share of
batches and all ranks get the same record (call it on every rank); features are gathered, not
images. FID uses `frechet_distance_eigh` (seconds, not minutes, for the 2048-d square root) and
10K samples, so it is biased upwards against FID-50K: for tracking a run, not for reporting.
The networks run in fp32 with TF32 off; the model is sampled as the training loop left the
global flags. The caller's RNG states are untouched (every draw uses its own generators).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from srdit.config import Config, apply_overrides
from srdit.eval import metrics
from srdit.eval.features import ReferenceSet, inception_features, kdd_features, load_kdd_teacher
from srdit.io import check_finite_weights
from srdit.sample.batches import generate_batch, num_batches


def fid_key(num_samples: int) -> str:
    """Metric name: fid10k for 10,000 samples, fid50k for 50,000, fid<n> otherwise."""
    return f"fid{num_samples // 1000}k" if num_samples % 1000 == 0 else f"fid{num_samples}"


@dataclass
class QuickReference:
    mu: np.ndarray  # Inception pool statistics of the reference (ADM npz `mu`, `sigma`)
    sigma: np.ndarray
    kdd: np.ndarray | None  # DINOv2 class tokens of the real images, None without a KDD network

    @classmethod
    def load(cls, path: str, *, inception, kdd_teacher=None, batch: int = 250,
             cache_dir: str | None = "default") -> QuickReference:
        ref = ReferenceSet(path, batch=batch, cache_dir=cache_dir)
        stats, _ = ref.stats(inception)
        return cls(stats["mu"], stats["sigma"], ref.kdd(kdd_teacher) if kdd_teacher is not None else None)


def _gather(parts: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """Every rank's (batch index, features) pairs, sorted by batch (one rank: as is)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, parts)
        parts = [item for rank_parts in everyone for item in rank_parts]
    return sorted(parts, key=lambda item: item[0])


@torch.no_grad()
def quick_eval(model, cfg: Config, *, inception, ref: QuickReference, kdd_teacher=None, vae=None,
               num_samples: int = 10_000, batch: int | None = None, device: torch.device | None = None) -> dict:
    """{"fid10k" (fid_key(num_samples)): float, "kdd": float (with a KDD network), "kdd_std",
    "quick_eval_s"} for `model` (the EMA model) sampled with cfg.sample."""
    import torch.distributed as dist

    start = time.perf_counter()
    device = device or next(model.parameters()).device
    overrides = [f"sample.num_samples={num_samples}"] + ([f"sample.batch={batch}"] if batch else [])
    cfg = apply_overrides(cfg, overrides)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    try:
        parts = []
        for b in range(rank, num_batches(num_samples, cfg.sample.batch), world):
            images, _ = generate_batch(model, cfg, b, device=device, vae=vae)
            feats = {"pool": inception_features(inception, [images])["pool"]}
            if kdd_teacher is not None and ref.kdd is not None:
                feats["kdd"] = kdd_features(kdd_teacher, [images])
            parts.append((b, feats))
    finally:
        model.train(was_training)
    parts = _gather(parts)
    pool = np.concatenate([f["pool"] for _, f in parts])
    record = {fid_key(num_samples): metrics.frechet_distance_eigh(pool, ref.mu, ref.sigma, device=device)}
    if kdd_teacher is not None and ref.kdd is not None:
        fake = np.concatenate([f["kdd"] for _, f in parts])
        record["kdd"], record["kdd_std"] = metrics.kernel_distance(ref.kdd, fake)
    record["quick_eval_s"] = time.perf_counter() - start
    return record


def build_quick_eval(cfg: Config, device: torch.device, *, num_samples: int = 10_000, batch: int | None = None):
    """`evaluate(model) -> record` with the networks of cfg.eval (inception required, kdd_teacher
    optional), the reference cfg.eval.reference and the decoder data.invae, loaded once."""
    from srdit.eval.inception import load_inception

    e = cfg.eval
    if not e.reference or not e.inception:
        raise ValueError("the quick evaluation needs eval.reference (VIRTUAL_imagenet256_labeled.npz) and "
                         "eval.inception (pt_inception-2015-12-05-6726825d.pth)")
    inception = load_inception(e.inception, device)
    kdd_teacher = load_kdd_teacher(e.kdd_teacher, device) if e.kdd_teacher else None
    vae = None
    if cfg.model.in_channels != 1:
        if not cfg.data.invae:
            raise ValueError("the quick evaluation of a latent model needs data.invae (e2e-invae-400k.pt)")
        from srdit.model.invae import load_invae

        vae = load_invae(cfg.data.invae)
        check_finite_weights(vae.state_dict(), cfg.data.invae, "the decoded samples, and their FID, would be garbage")
        vae = vae.to(device)
    ref = QuickReference.load(e.reference, inception=inception, kdd_teacher=kdd_teacher, batch=e.batch)

    def evaluate(model) -> dict:
        return quick_eval(model, cfg, inception=inception, ref=ref, kdd_teacher=kdd_teacher, vae=vae,
                          num_samples=num_samples, batch=batch, device=device)

    return evaluate

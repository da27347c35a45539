"""Loaders with GlobalBatches' interface (`next_step() -> list of micro-batch dicts on the
device`, `.step`) over prepared shards, and `make_batches`, which picks one.

All of them take the sample order from `GlobalBatches.indices(step)` (global batch `step` is a
slice of a per-epoch permutation seeded by (seed, epoch); rank r takes its rows), so every
backend yields the same samples in the same order for a seed, and resuming at step s needs only
s (the training checkpoint's "data" entry already stores it).

  backend   where the work happens                                      when
  global    GlobalBatches: ShardDataset.batch in the training process    workers = 0 (tests, quickstart)
  torch     TorchBatches: DataLoader workers read + decode (PIL) the      no DALI, or no GPU, or data
            micro-batches ahead, pinned memory, async copy; decode="gpu"  in memory (the digits)
            decodes JPEGs on the GPU with torchvision.io.decode_jpeg
  dali      DaliBatches (srdit/data/dali.py): DALI reads through the      DALI installed and a GPU
            same ShardDataset.read, nvJPEG "mixed" decode on the GPU

Raw images (the default format) are read as uint8 [B, 3, r, r] by ShardDataset.read itself: no
backend decodes anything, every backend copies them as they are.

Worker processes (DataLoader's, DALI's) ignore the stop signals that reach a whole job, and end
only when the training process ends them (srdit/data/workers.py).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from srdit.data.order import GlobalBatches
from srdit.data.workers import shield_from_stop_signals

BACKENDS = ("auto", "global", "torch", "dali")


@functools.lru_cache(maxsize=1)
def dali_available() -> bool:
    """True when NVIDIA DALI imports (it is optional: `pip install nvidia-dali-cuda130`)."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


class _MicroBatchIndices:
    """The index arrays of this rank's micro-batches, step after step from `start_step`."""

    def __init__(self, plan: GlobalBatches, start_step: int):
        self.plan, self.start_step = plan, start_step

    def __iter__(self):
        step, micro = self.start_step, self.plan.micro
        while True:
            idx = self.plan.indices(step)
            for i in range(self.plan.accum):
                yield idx[i * micro:(i + 1) * micro]
            step += 1


class _MicroBatches:
    """DataLoader dataset whose item is a whole micro-batch: the sampler yields index arrays."""

    def __init__(self, dataset, encoded_images: bool):
        self.dataset, self.encoded_images = dataset, encoded_images

    def __getitem__(self, indices) -> dict:
        if not self.encoded_images:
            return self.dataset.batch(indices)
        raw = self.dataset.read(indices)  # JPEG bytes, decoded on the GPU by the main process
        return {"latent": torch.from_numpy(raw["latent"]), "label": torch.from_numpy(raw["label"]),
                "image_bytes": [torch.from_numpy(np.array(b)) for b in raw["image_bytes"]]}


class TorchBatches:
    """GlobalBatches' micro-batches, read by `workers` DataLoader processes ahead of use.

    decode="cpu": PIL in the workers (bit-identical to ShardDataset items); decode="gpu": the
    workers hand over JPEG bytes and torchvision.io.decode_jpeg decodes them on the GPU (nvJPEG;
    pixels may differ from PIL's by rounding). Raw shards need neither: the workers gather the
    uint8 crops.
    """

    def __init__(self, dataset, global_batch: int, *, rank: int = 0, world: int = 1, accum: int = 1, seed: int = 0,
                 start_step: int = 0, device="cpu", workers: int = 4, prefetch: int = 4, decode: str = "cpu"):
        self.plan = GlobalBatches(dataset, global_batch, rank=rank, world=world, accum=accum, seed=seed,
                                  start_step=start_step)
        self.dataset, self.accum, self.step, self.device = dataset, accum, start_step, torch.device(device)
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode={decode!r} is not 'cpu' or 'gpu'")
        self.gpu_decode = decode == "gpu" and getattr(dataset, "kind", None) == "image"
        if self.gpu_decode and (self.device.type != "cuda" or dataset.image_format != "jpeg"):
            raise ValueError(f"decode='gpu' needs a CUDA device and JPEG shards (device {self.device.type}, "
                             f"image format {dataset.image_format}; raw shards have nothing to decode)")
        self.loader = torch.utils.data.DataLoader(
            _MicroBatches(dataset, self.gpu_decode), sampler=_MicroBatchIndices(self.plan, start_step), batch_size=None,
            num_workers=workers, pin_memory=self.device.type == "cuda", prefetch_factor=prefetch if workers else None,
            persistent_workers=False, worker_init_fn=shield_from_stop_signals)
        self._it = None

    def _to_device(self, batch: dict) -> dict:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k != "image_bytes"}
        if "image_bytes" in batch:
            from torchvision.io import decode_jpeg

            out["image"] = torch.stack(decode_jpeg(batch["image_bytes"], device=self.device))  # [B, 3, r, r] uint8
        return out

    def next_step(self) -> list[dict]:
        """The micro-batches of the next optimizer step (a list of `accum` dicts)."""
        if self._it is None:
            self._it = iter(self.loader)
        micro = [self._to_device(next(self._it)) for _ in range(self.accum)]
        self.step += 1
        return micro

    def close(self) -> None:
        self._it = None  # the DataLoader iterator shuts its workers down when collected


def make_batches(dataset, global_batch: int, *, rank: int = 0, world: int = 1, accum: int = 1, seed: int = 0,
                 start_step: int = 0, device="cpu", backend: str = "auto", workers: int = 4, **options):
    """The loader for `backend` (see the module docstring); "auto" takes DALI on a GPU when it is
    installed and the dataset is prepared shards, else DataLoader workers when `workers` > 0,
    else in-process."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    device = torch.device(device)
    shards = hasattr(dataset, "read")
    if backend == "auto":
        backend = ("dali" if device.type == "cuda" and shards and dali_available()
                   else "torch" if workers > 0 else "global")
    common = {"rank": rank, "world": world, "accum": accum, "seed": seed, "start_step": start_step, "device": device}
    if backend == "global":
        return GlobalBatches(dataset, global_batch, **common)
    if backend == "torch":
        return TorchBatches(dataset, global_batch, workers=workers, **common, **options)
    from srdit.data.dali import DaliBatches

    return DaliBatches(dataset, global_batch, workers=workers, **common, **options)

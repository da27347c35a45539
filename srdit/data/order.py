"""Deterministic, resumable batching of a map-style dataset across ranks.

Global batch s (s = 0, 1, ...) is the s-th slice of G indices of a per-epoch permutation drawn
from (seed, epoch); rank r takes rows [r G/W, (r+1) G/W) of it and splits them into the
micro-batches of gradient accumulation. So the samples a step sees depend only on (seed, step),
not on the number of GPUs, and resuming at step s needs nothing but s.
"""
from __future__ import annotations

import numpy as np
import torch


class GlobalBatches:
    """Iterator over this rank's micro-batches of consecutive global batches, from `start_step`."""

    def __init__(self, dataset, global_batch: int, *, rank: int = 0, world: int = 1, accum: int = 1,
                 seed: int = 0, start_step: int = 0, device="cpu"):
        n = len(dataset)
        if n == 0:
            raise ValueError("the dataset is empty")
        if global_batch % (world * accum):
            raise ValueError(f"train.global_batch={global_batch} is not divisible by world size {world} x "
                             f"train.grad_accum={accum}")
        if global_batch > n:
            raise ValueError(f"train.global_batch={global_batch} exceeds the dataset's {n} samples")
        self.dataset, self.G, self.rank, self.world, self.accum = dataset, global_batch, rank, world, accum
        self.seed, self.step, self.device = seed, start_step, torch.device(device)
        self.per_epoch = n // global_batch  # the last partial batch of an epoch is dropped
        self.local = global_batch // world
        self.micro = self.local // accum
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        """This rank's G/W indices of global batch `step`."""
        epoch, b = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._perm_epoch = epoch
        batch = self._perm[b * self.G:(b + 1) * self.G]
        return batch[self.rank * self.local:(self.rank + 1) * self.local]

    def _fetch(self, idx) -> dict:
        if hasattr(self.dataset, "batch"):
            items = self.dataset.batch(idx)
        else:
            items = torch.utils.data.default_collate([self.dataset[int(i)] for i in idx])
        return {k: v.to(self.device, non_blocking=True) for k, v in items.items()}

    def next_step(self) -> list[dict]:
        """The micro-batches of the next optimizer step (a list of `accum` dicts)."""
        idx = self.indices(self.step)
        self.step += 1
        return [self._fetch(idx[i * self.micro:(i + 1) * self.micro]) for i in range(self.accum)]

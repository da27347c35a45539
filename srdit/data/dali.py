"""DALI loader over prepared shards (optional: importing this module does not import DALI).

Pipeline, one per rank, batch = one micro-batch:

    external_source (this rank's micro-batch m, from ShardDataset.read of GlobalBatches' indices)
      -> raw crops uint8 CHW (format "raw", no decoder) -> .gpu() -> "image" uint8 [B, 3, r, r]
      -> or PNG/JPEG bytes -> decoders.image(device="mixed": nvJPEG on the GPU) -> uint8 HWC
           -> transpose -> "image" uint8 [B, 3, r, r]         (default; the teacher resizes/normalises)
      -> either, with teacher_input=S: (HWC) resize (cubic) + normalise -> "teacher_input" float
           [B, 3, S, S]
      -> cached targets -> .gpu() -> "teacher" float16 [B, 1 + P, D]
      -> latents (scaled) / labels -> .gpu()

Why external_source rather than a DALI reader: the shards are memory-mapped, so a micro-batch
is a gather of slices (no parsing), and the sample order is GlobalBatches' exact global
permutation (not a shuffle buffer), which makes DALI and the PyTorch fallback yield the same
samples in the same order, and resume at step s exact with no reader state: the source is a
pure function of the micro-batch number, so prefetching ahead is harmless. Rank r reads only its
rows of each global batch (what shard_id/num_shards do for DALI's readers). `workers` > 0 runs
the source in that many DALI worker processes (parallel external source, spawn), which is
what the cached-teacher configuration needs (about 400 kB per sample to copy).

`teacher_input=S` resizes with DALI's cubic filter, which is Catmull-Rom (a = -0.5), while
torch's bicubic (DINOv2.preprocess, the release) uses a = -0.75: measured here, the two differ
by up to ~4/255 on smooth test images (more on sharp detail). The default output "image"
keeps the release math (DINOv2.forward resizes on the GPU in torch); a trainer that wants the
DALI resize calls `teacher.forward_features(batch["teacher_input"])` instead of
`teacher(batch["image"])`.
"""
from __future__ import annotations

import os

import torch

from srdit.config import IMAGENET_MEAN, IMAGENET_STD
from srdit.data.order import GlobalBatches
from srdit.data.workers import shield_from_stop_signals, stop_signals_blocked


class _Source:
    """Micro-batch m of this rank -> (images or teacher targets, latents, labels), numpy.
    Picklable (DALI's parallel workers receive a copy; ShardDataset reopens its maps)."""

    def __init__(self, plan: GlobalBatches, start_step: int):
        self.plan, self.start_step = plan, start_step
        self.owner = os.getpid()

    def __setstate__(self, state: dict) -> None:
        # a DALI worker unpickles its source as it starts (its stop signals blocked since it was
        # spawned: DaliBatches): the one place srdit's code runs there, where DataLoader has
        # worker_init_fn
        self.__dict__.update(state)
        if os.getpid() != self.owner:
            shield_from_stop_signals()

    def __call__(self, info):
        step, j = divmod(info.iteration, self.plan.accum)
        idx = self.plan.indices(self.start_step + step)[j * self.plan.micro:(j + 1) * self.plan.micro]
        raw = self.plan.dataset.read(idx)
        first = raw["teacher"] if "teacher" in raw else raw["image"] if "image" in raw else raw["image_bytes"]
        return first, raw["latent"], raw["label"]


class DaliBatches:
    """GlobalBatches' micro-batches through a DALI pipeline (module docstring).

    device: "cuda[:i]" (mixed decode, outputs on GPU i) or "cpu" (device_id=None: CPU decode,
    for tests). workers: DALI Python worker processes for the source (0 = in the pipeline thread).
    """

    def __init__(self, dataset, global_batch: int, *, rank: int = 0, world: int = 1, accum: int = 1, seed: int = 0,
                 start_step: int = 0, device="cuda", workers: int = 0, threads: int = 4, prefetch: int = 2,
                 teacher_input: int | None = None):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.plan = GlobalBatches(dataset, global_batch, rank=rank, world=world, accum=accum, seed=seed,
                                  start_step=start_step)
        self.accum, self.step, self.device = accum, start_step, torch.device(device)
        gpu = self.device.type == "cuda"
        kind = dataset.kind
        raw_images = kind == "image" and dataset.image_format == "raw"
        if teacher_input and kind != "image":
            raise ValueError("teacher_input needs shards with images (these hold cached teacher targets)")
        names = ["teacher" if kind == "teacher" else "teacher_input" if teacher_input else "image", "latent", "label"]

        @pipeline_def(batch_size=self.plan.micro, num_threads=threads, device_id=(self.device.index or 0) if gpu else None,
                      prefetch_queue_depth=prefetch, py_num_workers=max(workers, 1), py_start_method="spawn")
        def pipeline():
            first, latent, label = fn.external_source(
                source=_Source(self.plan, start_step), num_outputs=3, batch=True, batch_info=True,
                dtype=[types.FLOAT16 if kind == "teacher" else types.UINT8, types.FLOAT, types.INT64],
                # parallel: batches computed ahead by the workers, at least one per worker
                **({"parallel": True, "prefetch_queue_depth": 2 * workers} if workers > 0 else {}))
            if kind == "teacher":
                out = first.gpu() if gpu else first
            elif raw_images and not teacher_input:
                out = first.gpu() if gpu else first  # [3, r, r] uint8 as stored: no decoder
            else:
                if raw_images:  # [3, r, r] -> [r, r, 3] for the resize
                    out = fn.transpose(first.gpu() if gpu else first, perm=[1, 2, 0], output_layout="HWC")
                else:
                    out = fn.decoders.image(first, device="mixed" if gpu else "cpu", output_type=types.RGB)  # [r, r, 3]
                if teacher_input:
                    out = fn.resize(out, resize_x=teacher_input, resize_y=teacher_input, interp_type=types.INTERP_CUBIC,
                                    antialias=False, dtype=types.FLOAT)
                    out = fn.crop_mirror_normalize(out, dtype=types.FLOAT, output_layout="CHW",
                                                   mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD])
                else:
                    out = fn.transpose(out, perm=[2, 0, 1])  # [3, r, r] uint8
            if gpu:
                latent, label = latent.gpu(), label.gpu()
            return out, latent, label

        self.pipeline = pipeline()
        with stop_signals_blocked():  # the worker processes start here
            self.pipeline.build()
        self.names = names
        self._it = DALIGenericIterator([self.pipeline], names, auto_reset=False, prepare_first_batch=False)

    def next_step(self) -> list[dict]:
        """The micro-batches of the next optimizer step (a list of `accum` dicts)."""
        micro = []
        for _ in range(self.accum):
            out = next(self._it)[0]
            micro.append({k: v.to(self.device, non_blocking=True) for k, v in out.items()})
        self.step += 1
        return micro

    def close(self) -> None:
        self._it = None
        self.pipeline = None

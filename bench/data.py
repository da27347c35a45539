"""Samples per second of the data loaders alone (no model), per configuration and backend.

    python bench/data.py --device cuda [--data DIR] [--samples 2048] [--resolution 256] [--batch 256]
                         [--configs images cached] [--backends global torch torch-nvjpeg dali]
                         [--workers 8] [--steps 20] [--repeats 3] --json OUT

Configurations (issue 5's targets on an H100/H200, i.e. never the bottleneck of a step):
  cached  latents + labels + cached DINOv2 targets [1 + (r/16)^2, 768] fp16   target >= 10,000 samples/s
  images  latents + labels + the JPEG crop, decoded (+ copied to the device)   target >= 5,000 images/s
Backends: global (GlobalBatches, in-process PIL decode), torch (TorchBatches: DataLoader
workers, PIL), torch-nvjpeg (workers read, torchvision decodes on the GPU), dali (DaliBatches:
nvJPEG "mixed" decode on a GPU, CPU decode with device cpu). Unavailable ones are reported and
skipped.

Without --data, a synthetic prepared directory is written first (random latents and targets,
photo-like random JPEGs at the resolution: low-frequency noise, ~20-40 kB at 256 px) into a
temporary folder; the shards are then in the page cache, so this measures the loader, not
the disk. Each repeat times `steps` consecutive global batches after `--warmup` untimed
ones, wall clock with a device sync at the end; reported: median samples/s over repeats and
its spread (max - min) / median, bytes per sample on disk, and that x 1,281,167 (ImageNet).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from common import sync, table, write_json
from srdit.data import ShardDataset, TorchBatches, dali_available, make_batches
from srdit.data.prepare import ShardBuffer, finalize
from srdit.data.shards import FORMAT, PARTS, VERSION
from srdit.data.sources import encode_image
from srdit.runinfo import environment

IMAGENET = 1_281_167
TARGETS = {"cached": 10_000, "images": 5_000}
BACKENDS = ("global", "torch", "torch-nvjpeg", "dali")


# ------------------------------------------------------------------------------------------
# a synthetic prepared directory (the real format, written through srdit.data's own writer)
# ------------------------------------------------------------------------------------------
def photo_like(rng, r: int) -> np.ndarray:
    """uint8 [r, r, 3]: bicubic-upsampled coarse noise plus a little fine noise."""
    from PIL import Image

    coarse = (rng.random((r // 16, r // 16, 3)) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((r, r), Image.BICUBIC), np.int16)
    return np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)


def synthetic(out: str, config: str, samples: int, resolution: int, shard_size: int = 1024) -> str:
    """A prepared directory of random latents, labels and JPEGs or targets, written by prepare's
    own ShardBuffer and finalize."""
    grid, rng = resolution // 16, np.random.default_rng(0)
    teacher = {"arch": "vitb14", "shape": [1 + grid * grid, 768], "dtype": "float16"} if config == "cached" else None
    settings = {"format": FORMAT, "version": VERSION, "resolution": resolution, "latent_shape": [32, grid, grid],
                "shard_size": shard_size, "teacher": teacher, "classes": [str(c) for c in range(1000)],
                "image": None if teacher else {"format": "jpeg", "quality": 95, "subsampling": "4:4:4"},
                "source": {"layout": "synthetic (bench/data.py)"}}
    os.makedirs(os.path.join(out, PARTS), exist_ok=True)
    n_shards = -(-samples // shard_size)
    for k in range(n_shards):
        n = min(shard_size, samples - k * shard_size)
        shard = ShardBuffer(k, settings, samples)
        shard.index = [np.arange(k * shard_size, k * shard_size + n, dtype=np.int64)]
        shard.label = [rng.integers(0, 1000, n).astype(np.int64)]
        shard.latent = [rng.standard_normal((n, 32, grid, grid), np.float32)]
        if teacher:
            shard.teacher = [rng.standard_normal((n, *teacher["shape"]), np.float32).astype(np.float16)]
        else:
            shard.images = [encode_image(photo_like(rng, resolution), "jpeg") for _ in range(n)]
        shard.write(out)
    finalize(out, settings, n_shards, n_shards, samples, 1.0)
    return out


# ------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------
def build(backend: str, ds, batch: int, device: torch.device, workers: int):
    if backend == "torch-nvjpeg":
        if device.type != "cuda" or ds.kind != "image":
            raise RuntimeError("needs a CUDA device and image shards")
        return TorchBatches(ds, batch, device=device, workers=workers, decode="gpu")
    if backend == "dali" and not dali_available():
        raise RuntimeError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    return make_batches(ds, batch, device=device, backend=backend, workers=workers)


def measure(loader, device: torch.device, batch: int, steps: int, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        loader.next_step()
    sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            loader.next_step()
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - t0))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", nargs="*", default=None, help="prepared directories to read instead of synthetic ones")
    p.add_argument("--configs", nargs="+", default=["cached", "images"], choices=["cached", "images"])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=256, help="global batch = one rank's batch here")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    tmp = tempfile.mkdtemp(prefix="srdit-bench-data-")
    rows = []
    try:
        if args.data:
            dirs = {{"teacher": "cached", "image": "images"}[ShardDataset(d, verify="size").kind]: d for d in args.data}
        else:
            dirs = {}
            for config in args.configs:
                t0 = time.perf_counter()
                dirs[config] = synthetic(os.path.join(tmp, config), config, args.samples, args.resolution)
                print(f"synthetic {config} shards: {args.samples} samples in {time.perf_counter() - t0:.1f} s")
        for config, path in dirs.items():
            ds = ShardDataset(path, verify="size")
            per_sample = ds.index["bytes"] / len(ds)
            for backend in args.backends:
                row = {"config": config, "backend": backend, "device": str(device), "batch": args.batch,
                       "workers": args.workers, "bytes_per_sample": round(per_sample),
                       "imagenet_gb": round(per_sample * IMAGENET / 1e9, 1)}
                try:
                    loader = build(backend, ds, args.batch, device, args.workers)
                    rates = measure(loader, device, args.batch, args.steps, args.warmup, args.repeats)
                    median = statistics.median(rates)
                    row.update(samples_per_s=median, spread=(max(rates) - min(rates)) / median,
                               step_ms=1e3 * args.batch / median)
                    if device.type == "cuda":
                        row["meets_target"] = median >= TARGETS[config]
                    if hasattr(loader, "close"):
                        loader.close()
                except Exception as error:  # noqa: BLE001 - report and go on with the next backend
                    row["error"] = f"{type(error).__name__}: {error}"
                rows.append(row)
                print(table([row], list(row)), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(rows, ["config", "backend", "device", "batch", "workers", "samples_per_s", "spread", "step_ms",
                       "bytes_per_sample", "imagenet_gb", "error"]))
    write_json(args.json, {**environment(device), "args": vars(args), "targets_samples_per_s": TARGETS,
                           "synthetic": not args.data, "rows": rows})


if __name__ == "__main__":
    main()

"""Decode rate per image format on one CPU core, and samples per second of the data loaders
alone (no model), per configuration and backend.

    python bench/data.py --device cuda [--data DIR] [--samples 2048] [--resolution 256] [--batch 256]
                         [--configs cached raw png jpeg] [--backends global torch torch-nvjpeg dali]
                         [--workers 8] [--steps 20] [--repeats 3] [--decode-images 40] [--decode-only]
                         --json OUT

1. Decode (`--decode-images N` crops, 0 skips it; the "decode" rows of the JSON): images per
   second on ONE core (torch.set_num_threads(1); PIL is single-threaded) of turning a stored
   crop into the uint8 [3, r, r] batch row, per format and decoder:
     raw           none: copy the 3 r^2 bytes out of a memory-mapped file in the page cache
                   (what ShardDataset.read does)
     png           zlib level 6 (--image-format png): PIL (srdit's decode_image, the loaders'
                   path) and torchvision.io.decode_png
     png-stored    zlib level 0, "uncompressed PNG", what the release's images/ hold and its
                   loader decodes (PIL or pyspng): PIL and torchvision
     jpeg          q95 4:4:4 (--image-format jpeg): PIL and torchvision.io.decode_jpeg (CPU)
   plus the stored bytes per image (mean over the crops) and x 1,281,167 (ImageNet). The crops
   are ADM centre crops of random boxes of scikit-learn's two sample photos (photo-like noise
   if scikit-learn is missing); every crop is decoded once per repeat; median over repeats.
2. Loaders, configurations (issue 5's targets on an H100/H200, i.e. never the bottleneck of a step):
     cached        latents + labels + cached DINOv2 targets [1 + (r/16)^2, 768] fp16   target >= 10,000 samples/s
     raw/png/jpeg  latents + labels + the crop in that format, decoded (+ copied to the device)
                   target >= 5,000 images/s
   Backends: global (GlobalBatches, in-process PIL decode), torch (TorchBatches: DataLoader
   workers, PIL), torch-nvjpeg (workers read, torchvision decodes on the GPU; jpeg only), dali
   (DaliBatches: nvJPEG "mixed" decode on a GPU, CPU decode with device cpu, no decoder for
   raw). Unavailable ones are reported and skipped.

   Without --data, a synthetic prepared directory is written first (random latents and targets,
   the crops of step 1 cycled) into a temporary folder; the shards are then in the page cache,
   so this measures the loader, not the disk. Each repeat times `steps` consecutive global
   batches after `--warmup` untimed ones, wall clock with a device sync at the end; reported:
   median samples/s over repeats and its spread (max - min) / median, bytes per sample on disk,
   and that x 1,281,167 (ImageNet).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script: bench.*
from bench.common import sync, table, write_json  # noqa: E402
from srdit.data import ShardDataset, TorchBatches, dali_available, make_batches  # noqa: E402
from srdit.data.prepare import ShardBuffer, finalize  # noqa: E402
from srdit.data.crop import center_crop_dhariwal  # noqa: E402
from srdit.data.shards import FORMAT, PARTS, VERSION, decode_image  # noqa: E402
from srdit.data.sources import JPEG_QUALITY, encode_image  # noqa: E402
from srdit.runinfo import environment  # noqa: E402

IMAGENET = 1_281_167
TARGETS = {"cached": 10_000, "raw": 5_000, "png": 5_000, "jpeg": 5_000}
CONFIGS = tuple(TARGETS)
BACKENDS = ("global", "torch", "torch-nvjpeg", "dali")
POOL = 64  # distinct crops cycled through a synthetic directory


# ------------------------------------------------------------------------------------------
# a synthetic prepared directory (the real format, written through srdit.data's own writer)
# ------------------------------------------------------------------------------------------
def photo_like(rng, r: int) -> np.ndarray:
    """uint8 [r, r, 3]: bicubic-upsampled coarse noise plus a little fine noise."""
    from PIL import Image

    coarse = (rng.random((r // 16, r // 16, 3)) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((r, r), Image.BICUBIC), np.int16)
    return np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)


def photo_crops(count: int, r: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """`count` uint8 [r, r, 3] crops: the ADM centre crop of random square-ish boxes (side 60-100%
    of the short side) of scikit-learn's two sample photos (427 x 640 JPEGs, bundled with the
    package), or photo-like noise without scikit-learn. Returns (crops, what they are)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_sample_images

        photos = [Image.fromarray(p) for p in load_sample_images().images]
    except ImportError:
        return [photo_like(rng, r) for _ in range(count)], "photo-like noise (scikit-learn is not installed)"
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(min(w, h) * rng.uniform(0.6, 1.0))
        bw, bh = min(w, int(side * rng.uniform(1.0, 1.33))), side
        left, top = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        crops.append(center_crop_dhariwal(photo.crop((left, top, left + bw, top + bh)), r))
    return crops, "ADM crops of random boxes of scikit-learn's sample photos (china.jpg, flower.jpg)"


def synthetic(out: str, config: str, samples: int, resolution: int, crops: list[np.ndarray],
              shard_size: int = 1024) -> str:
    """A prepared directory of random latents, labels and the crops (cycled) in the config's
    format, or random targets, written by prepare's own ShardBuffer and finalize."""
    grid, rng = resolution // 16, np.random.default_rng(0)
    teacher = {"arch": "vitb14", "shape": [1 + grid * grid, 768], "dtype": "float16"} if config == "cached" else None
    image = None if teacher else {"raw": {"format": "raw", "dtype": "uint8", "shape": [3, resolution, resolution]},
                                  "png": {"format": "png"},
                                  "jpeg": {"format": "jpeg", "quality": JPEG_QUALITY, "subsampling": "4:4:4"}}[config]
    settings = {"format": FORMAT, "version": VERSION, "resolution": resolution, "latent_shape": [32, grid, grid],
                "shard_size": shard_size, "teacher": teacher, "classes": [str(c) for c in range(1000)],
                "image": image, "source": {"layout": "synthetic (bench/data.py)"}}
    stored = [encode_image(c, config) for c in crops] if image else []
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
            shard.images = [stored[(k * shard_size + i) % len(stored)] for i in range(n)]
        shard.write(out)
    finalize(out, settings, n_shards, n_shards, samples, 1.0)
    return out


# ------------------------------------------------------------------------------------------
# decode rate per format, one core
# ------------------------------------------------------------------------------------------
def _png(crop: np.ndarray, level: int) -> np.ndarray:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="png", compress_level=level, optimize=False)
    return np.frombuffer(buffer.getvalue(), np.uint8)


def _torchvision(kind: str):
    import torchvision.io

    decode = torchvision.io.decode_jpeg if kind == "jpeg" else torchvision.io.decode_png
    return lambda data: decode(torch.from_numpy(np.array(data)))  # [3, r, r] uint8


@contextlib.contextmanager
def one_core():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def decode_rates(crops: list[np.ndarray], tmp: str, repeats: int) -> list[dict]:
    """Rows {format, decoder, bytes_per_image, imagenet_gb, images_per_s (one core), spread,
    exact}: each crop turned into its uint8 [3, r, r] batch row, once per repeat."""
    r = crops[0].shape[0]
    raw = np.stack([encode_image(c, "raw") for c in crops])  # [N, 3, r, r]
    path = os.path.join(tmp, "raw.bin")
    raw.tofile(path)
    mapped = np.memmap(path, np.uint8, mode="r", shape=raw.shape)
    stored = {"raw": list(mapped), "png": [encode_image(c, "png") for c in crops],
              "png-stored": [_png(c, 0) for c in crops], "jpeg": [encode_image(c, "jpeg") for c in crops]}
    out = np.empty((3, r, r), np.uint8)
    decoders = {"raw": {"none": lambda row: row},
                "png": {"pil": decode_image, "torchvision": _torchvision("png")},
                "png-stored": {"pil": decode_image, "torchvision": _torchvision("png")},
                "jpeg": {"pil": decode_image, "torchvision": _torchvision("jpeg")}}
    rows = []
    for fmt, by_name in decoders.items():
        items = stored[fmt]
        size = float(np.mean([x.nbytes for x in items]))
        for name, decode in by_name.items():
            row = {"format": fmt, "decoder": name, "resolution": r, "images": len(items), "bytes_per_image": round(size),
                   "imagenet_gb": round(size * IMAGENET / 1e9, 1), "exact": fmt != "jpeg"}
            try:
                with one_core():
                    for data in items[:4]:  # warm-up, untimed
                        out[...] = np.asarray(decode(data))
                    rates = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        for data in items:
                            out[...] = np.asarray(decode(data))
                        rates.append(len(items) / (time.perf_counter() - t0))
                median = statistics.median(rates)
                row.update(images_per_s=median, spread=(max(rates) - min(rates)) / median,
                           mb_per_s=median * size / 1e6)
                if fmt != "jpeg":
                    assert np.array_equal(out, encode_image(crops[-1], "raw")), f"{fmt}/{name} is not lossless"
            except ImportError as error:
                row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
    del mapped
    return rows


# ------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------
def build(backend: str, ds, batch: int, device: torch.device, workers: int):
    if backend == "torch-nvjpeg":
        if device.type != "cuda" or ds.image_format != "jpeg":
            raise RuntimeError("needs a CUDA device and JPEG shards")
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
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=256, help="global batch = one rank's batch here")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-images", type=int, default=40, help="crops for the per-core decode table (0: skip it)")
    p.add_argument("--decode-only", action="store_true", help="measure the decode table only, no loaders")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    tmp = tempfile.mkdtemp(prefix="srdit-bench-data-")
    rows, decode = [], []
    crops, crops_are = photo_crops(max(args.decode_images, 0 if args.data or args.decode_only else POOL),
                                   args.resolution)
    try:
        if args.decode_images > 0:
            decode = decode_rates(crops[:args.decode_images], tmp, args.repeats)
            print(f"decode, one core ({os.cpu_count()} on this machine), {args.decode_images} crops of "
                  f"{args.resolution} px: {crops_are}")
            print(table(decode, ["format", "decoder", "bytes_per_image", "imagenet_gb", "images_per_s", "spread",
                                 "mb_per_s", "exact", "error"]), flush=True)
        if args.decode_only:
            dirs = {}
        elif args.data:
            dirs = {}
            for d in args.data:
                ds = ShardDataset(d, verify="size")
                dirs[ds.image_format or "cached"] = d
        else:
            dirs = {}
            for config in args.configs:
                t0 = time.perf_counter()
                dirs[config] = synthetic(os.path.join(tmp, config), config, args.samples, args.resolution, crops[:POOL])
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
    if rows:
        print()
        print(table(rows, ["config", "backend", "device", "batch", "workers", "samples_per_s", "spread", "step_ms",
                           "bytes_per_sample", "imagenet_gb", "error"]))
    write_json(args.json, {**environment(device), "args": vars(args), "targets_samples_per_s": TARGETS,
                           "synthetic": not args.data, "rows": rows, "decode": decode, "decode_images": crops_are,
                           "cpu_count": os.cpu_count()})


if __name__ == "__main__":
    main()

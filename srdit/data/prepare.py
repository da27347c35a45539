"""`python -m srdit.data.prepare --src DIR --out DIR --resolution 256|512 --vae INVAE.pt
[--teacher DINOV2.pt --cache-teacher] [--batch N]`; also under torchrun (one shard range per rank).

Turns an ImageNet-style folder (or the release's preprocessed layout, see srdit/data/sources.py)
into shards (srdit/data/shards.py) holding per sample: label, one INVAE posterior sample of the
ADM centre crop (unscaled; 0.3099 is applied when loading), and either the crop for the online
teacher (--image-format raw, the default: uint8 as it is, the exact pixels the release's teacher
reads from its lossless PNGs; png: the same pixels, smaller, decoded on the CPU; jpeg: q95 4:4:4,
the smallest, lossy) or the cached DINOv2 targets [1 + (r/16)^2, 768] in fp16.

- Order: samples are the source listing in order; shard k holds source indices
  [k S, (k+1) S) (S = --shard-size) minus unreadable files, which are skipped, counted and
  listed in OUT/skipped.txt.
- Posterior noise: sample i's eps is drawn on the CPU from its own generator seeded by
  `image_seed(seed, i)`, so a latent depends on (seed, source index, weights) only, not on the
  batch, the rank or the device. From the release layout, its vae-in/ sample is stored as it is.
- Resumable: a shard is written under a temporary name, fsynced, renamed, then recorded in
  OUT/parts/; a rerun of the same command skips recorded shards. The index is written last.
- torchrun: rank r prepares shards [r K / W, (r+1) K / W); rank 0 writes the index at the end.
- Nothing non-finite is written: weights holding NaN or Inf are refused when loaded, and an
  encoder batch whose latents or teacher targets are not finite stops the run naming its files.
- File names that are not UTF-8 are prepared like any other; the index, parts/ and skipped.txt
  store them, and messages print them, with the undecodable bytes as \\xNN (sources.printable).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time

import numpy as np
import torch

from srdit.data.crop import CROP_NAME
from srdit.data.shards import (
    FORMAT,
    IMAGE_FORMATS,
    INDEX,
    PARTS,
    VERIFIED,
    VERSION,
    ShardError,
    shard_name,
    write_shard,
)
from srdit.data.sources import JPEG_QUALITY, Source, SourceError, SourceSamples, as_list, list_source, printable
from srdit.distributed import Dist, locked_output, teardown
from srdit.io import (TEMP_MARK, OutputInUse, check_finite_weights, check_same_settings, describe_error, sha256_file,
                      write_json, write_text)
from srdit.progress import Progress

SETTINGS = "prepare.json"
SKIPPED = "skipped.txt"
SHARD_BYTES = 1 << 30  # default shard size: at most 4,096 samples and about 1 GiB


class PrepareError(RuntimeError):
    """A clear, one-line reason the preparation stopped."""


# ------------------------------------------------------------------------------------------
# per-image posterior noise
# ------------------------------------------------------------------------------------------
def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of source sample `index`'s posterior noise: numpy's SeedSequence of
    (seed, index), so neighbouring indices give unrelated streams."""
    hi, lo = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return int(hi) << 32 | int(lo)


def posterior_sample(mean: torch.Tensor, std: torch.Tensor, seed: int, indices) -> torch.Tensor:
    """mean + std * eps on the CPU in float32 ([B, C, h, w]), eps_i ~ N(0, I) from image_seed(seed, i)."""
    eps = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(image_seed(seed, int(i))))
                       for i in indices])
    return mean.float().cpu() + std.float().cpu() * eps


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m srdit.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="ImageNet-style folder (CLASS/IMAGE) or the release layout (images/, vae-in/)")
    p.add_argument("--out", required=True, help="output directory (created; rerun the same command to resume)")
    p.add_argument("--resolution", type=int, required=True, help="256 or 512 (any multiple of 16 works, e.g. 64 for tests)")
    p.add_argument("--vae", default=None, help="e2e-invae-400k.pt (needed unless --src has the release's vae-in/ latents)")
    p.add_argument("--teacher", default=None, help="dinov2_vitb14_pretrain.pth, for --cache-teacher")
    p.add_argument("--cache-teacher", action="store_true", help="store DINOv2 targets (fp16) instead of the images")
    p.add_argument("--teacher-arch", default="vitb14", choices=("vitb14", "vitl14"))
    p.add_argument("--teacher-pos-interp", default="timm", choices=("timm", "dinov2"),
                   help="position-table resampling (timm = the release's REPA teacher; data.teacher_pos_interp)")
    p.add_argument("--latents", default="auto", choices=("auto", "encode", "release"),
                   help="auto: the release's vae-in/ sampled latents when present (release: required), else encode with --vae")
    p.add_argument("--image-format", default="raw", choices=IMAGE_FORMATS,
                   help="stored crops: raw uint8 (exact, nothing to decode, 3 r^2 bytes), png (exact, ~57%% of raw's "
                        "bytes, slowest to decode) or jpeg (q95 4:4:4, ~21%%, lossy); see docs/data.md")
    p.add_argument("--batch", type=int, default=64, help="images per encoder batch")
    p.add_argument("--shard-size", type=int, default=0, help="samples per shard (default: <= 4096 and ~1 GiB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image posterior noise")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="INVAE encode precision (bf16: CUDA autocast)")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    p.add_argument("--workers", type=int, default=None, help="decode/crop processes per rank (default: CPUs / ranks, <= 16)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    clean = False
    try:
        status = prepare(args)
        clean = True
        return status
    except (PrepareError, ShardError, SourceError, ValueError, OSError, OutputInUse) as error:
        print(f"srdit.data.prepare: error: {printable(describe_error(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("srdit.data.prepare: interrupted; finished shards are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        teardown(wait=clean)  # rank 0 writes the index after the others are done: wait for it


# ------------------------------------------------------------------------------------------
# settings: what the output depends on; a resumed run must match them
# ------------------------------------------------------------------------------------------
# stored bytes per pixel of a crop: raw exactly 3; PNG and JPEG the mean over photo crops (docs/data.md)
IMAGE_BYTES_PER_PIXEL = {"raw": 3.0, "png": 1.75, "jpeg": 0.65}


def default_shard_size(resolution: int, cache_teacher: bool, teacher_dim: int, image_format: str = "raw") -> int:
    """Samples per shard: a power of two, <= 4096, about SHARD_BYTES per shard (raw: 4,096 at
    256 px, 1,024 at 512 px)."""
    grid = resolution // 16
    image = 2 * (1 + grid * grid) * teacher_dim if cache_teacher else IMAGE_BYTES_PER_PIXEL[image_format] * resolution ** 2
    per_sample = 32 * grid * grid * 4 + 24 + image  # latent, label, source index, image offset
    return int(min(4096, 2 ** math.floor(math.log2(max(1, SHARD_BYTES // per_sample)))))


def build_settings(args, source: Source, use_release_latents: bool) -> dict:
    from srdit.config import LATENT_SCALE
    from srdit.model.dinov2 import ARCHS

    r = args.resolution
    if r < 16 or r % 16:
        raise PrepareError(f"--resolution {r} is not a multiple of 16 (the INVAE downsamples 16x); use 256 or 512")
    if args.cache_teacher and not args.teacher:
        raise PrepareError("--cache-teacher needs --teacher DINOV2.pt (dinov2_vitb14_pretrain.pth)")
    if args.teacher and not args.cache_teacher:
        raise PrepareError("--teacher is only used with --cache-teacher (without it the images are stored and the "
                           "trainer runs the teacher); add --cache-teacher or drop --teacher")
    if not use_release_latents and not args.vae:
        raise PrepareError(f"--vae INVAE.pt is required to encode {args.src} (e2e-invae-400k.pt)"
                           + (" (--latents encode ignores its vae-in/)" if args.latents == "encode" else ""))
    grid = r // 16
    if use_release_latents:
        tokenizer = {"name": "E2E-INVAE (REPA-E VAE_F16D32)", "source": "release vae-in sampled latents",
                     "file": None, "sha256": None, "precision": None}
    else:
        tokenizer = {"name": "E2E-INVAE (REPA-E VAE_F16D32)", "source": "encoded", "file": os.path.basename(args.vae),
                     "sha256": _file_sha(args.vae), "precision": args.precision}
    teacher = None
    if args.cache_teacher:
        dim = ARCHS[args.teacher_arch].embed_dim
        teacher = {"arch": args.teacher_arch, "file": os.path.basename(args.teacher), "sha256": _file_sha(args.teacher),
                   "img_size": grid * 14, "pos_interp": args.teacher_pos_interp,
                   "precision": "bf16 autocast on CUDA, fp32 on CPU", "shape": [1 + grid * grid, dim], "dtype": "float16"}
    image = None if args.cache_teacher else {
        "raw": {"format": "raw", "dtype": "uint8", "shape": [3, r, r], "exact": True},
        "png": {"format": "png", "exact": True},
        "jpeg": {"format": "jpeg", "quality": JPEG_QUALITY, "subsampling": "4:4:4", "exact": False}}[args.image_format]
    shard_size = args.shard_size or default_shard_size(r, args.cache_teacher, teacher["shape"][1] if teacher else 0,
                                                       args.image_format)
    posterior = ("one sample per image, drawn by the release's preprocessing (vae-in/), stored as it is"
                 if use_release_latents else "one sample per image, eps from image_seed(seed, i)")
    return {"format": FORMAT, "version": VERSION, "resolution": r, "crop": CROP_NAME,
            "latent_shape": [32, grid, grid], "latent_dtype": "float32", "latent_scale": LATENT_SCALE,
            "latent_scale_applied": "at load time", "posterior": posterior,
            "seed": args.seed, "shard_size": shard_size, "image": image, "teacher": teacher, "tokenizer": tokenizer,
            "source": source.describe(), "classes": source.classes}


def _file_sha(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights not found: {path}")
    return sha256_file(path)


def check_settings(out: str, settings: dict) -> None:
    """A preparation that recorded a shard must be resumed with its own settings (prepare.json);
    one that recorded none (a first launch that failed) blocks nothing."""
    path = os.path.join(out, SETTINGS)
    recorded = os.path.isdir(os.path.join(out, PARTS)) and any(
        n.endswith(".json") for n in os.listdir(os.path.join(out, PARTS)))
    if os.path.isfile(path) and recorded:
        with open(path) as f:
            old = json.load(f)
        check_same_settings(old, settings, what=f"{out} holds a preparation with other settings",
                            fix="use a new --out or the same arguments", error=PrepareError)


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------
def part_path(out: str, k: int) -> str:
    return os.path.join(out, PARTS, shard_name(k)[:-12] + ".json")


def load_part(out: str, k: int) -> dict | None:
    """The completion record of shard k, if the shard is finished and still has its size."""
    try:
        with open(part_path(out, k)) as f:
            part = json.load(f)
        return part if os.path.getsize(os.path.join(out, part["file"])) == part["bytes"] else None
    except (OSError, ValueError, KeyError):
        return None


class ShardBuffer:
    """Samples of one shard, collected batch by batch, then written at once."""

    def __init__(self, k: int, settings: dict, n_source: int):
        self.k, self.settings = k, settings
        start = k * settings["shard_size"]
        self.source_range = [start, min(start + settings["shard_size"], n_source)]
        self.index, self.label, self.latent, self.teacher, self.images, self.skipped = [], [], [], [], [], []
        self.t0 = time.time()

    def write(self, out: str) -> dict:
        s = self.settings

        def cat(parts, shape, dtype):  # [n, *shape] of dtype, also for a shard of unreadable files only
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros((0, *shape), dtype)

        arrays = {}
        raw = s["image"] is not None and s["image"]["format"] == "raw"
        if s["image"] and not raw:
            sizes = [len(b) for b in self.images]
            arrays["image_offsets"] = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        arrays["source_index"] = cat(self.index, (), np.int64)
        arrays["label"] = cat(self.label, (), np.int64)
        arrays["latent"] = cat(self.latent, s["latent_shape"], np.float32)
        if s["teacher"]:
            arrays["teacher"] = cat(self.teacher, s["teacher"]["shape"], np.float16)
        if raw:  # [n, 3, r, r]
            r = s["resolution"]
            arrays["image"] = np.stack(self.images) if self.images else np.zeros((0, 3, r, r), np.uint8)
        elif s["image"]:
            arrays["image_bytes"] = cat(self.images, (), np.uint8)
        path = os.path.join(out, shard_name(self.k))
        nbytes, digest = write_shard(path, arrays, {"format": FORMAT, "version": VERSION, "shard": self.k,
                                                    "resolution": s["resolution"]})
        part = {"file": shard_name(self.k), "samples": len(arrays["label"]), "bytes": nbytes, "sha256": digest,
                "mtime_ns": os.stat(path).st_mtime_ns, "source_range": self.source_range,
                "skipped": sorted(self.skipped), "seconds": round(time.time() - self.t0, 3)}
        write_json(part_path(out, self.k), part)
        return part


def pick_device(args, local_rank: int) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def check_output_folder(src: str, out: str) -> None:
    """--out names a folder outside --src: an empty one would put the shards in the current
    folder, and one inside --src would be listed as part of the source when the command is rerun
    (an ImageNet-style folder would gain a class)."""
    if not out.strip():
        raise PrepareError("--out is empty: give the folder to write the shards to, e.g. --out /data/in256")
    source, target = os.path.realpath(src), os.path.realpath(out)
    if os.path.commonpath([source, target]) == source:
        raise PrepareError(f"--out {out} is inside --src {src}: a rerun would read the prepared folder as part of "
                           "the source; choose an --out outside --src")


def prepare(args) -> int:
    t_start = time.time()
    check_output_folder(args.src, args.out)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(args, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:  # the barrier before the index; gloo works for CPU and GPU runs alike
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    source = list_source(args.src, use_latents=args.latents != "encode")
    use_release_latents = source.latents is not None
    if args.latents == "release" and not use_release_latents:
        raise PrepareError(f"--latents release: {args.src} has no release vae-in/ folder (vae-in/dataset.json and "
                           f"vae-in/*/img-latents-*.npy)")
    if args.batch < 1 or args.shard_size < 0:
        raise PrepareError(f"--batch {args.batch} must be >= 1 and --shard-size {args.shard_size} >= 0 (0: default)")
    settings = build_settings(args, source, use_release_latents)
    out = args.out
    dist = Dist(rank, world, int(os.environ.get("LOCAL_RANK", "0")), device)
    with locked_output(os.path.join(out, ".lock"), f"the prepared folder {out}", dist):
        check_settings(out, settings)
        n_shards = math.ceil(len(source) / settings["shard_size"])
        mine = range(rank * n_shards // world, (rank + 1) * n_shards // world)  # this rank's shards
        pending, batches = plan(out, settings, len(source), mine, args.batch)
        # every network is loaded (and can fail) before anything is written
        vae = load_invae_for(args, device) if pending and not use_release_latents else None
        teacher = load_teacher_for(args, settings, device) if pending and args.cache_teacher else None
        if rank == 0:
            os.makedirs(os.path.join(out, PARTS), exist_ok=True)
            write_json(os.path.join(out, SETTINGS), settings)
        if world > 1:
            torch.distributed.barrier()
        desc = f"{len(pending)} of {len(mine)} shards" + (f", rank 0 of {world}" if world > 1 else "")
        written = encode_shards(args, source, settings, batches, vae, teacher, device, show=rank == 0, desc=desc)

        # the index: rank 0, after all ranks
        todo = sum(len(b) for b in batches)
        counts = torch.tensor([len(written), todo], dtype=torch.int64)
        if world > 1:
            torch.distributed.all_reduce(counts)  # also the barrier: every rank has finished its shards
        if rank == 0:
            finalize(out, settings, n_shards, *counts.tolist(), time.time() - t_start)
    return 0


def plan(out: str, settings: dict, n_source: int, mine: range, batch: int) -> tuple[list[int], list[list[int]]]:
    """(unfinished shards of `mine`, their encoder batches of source indices); an interrupted
    run's temporary files of these shards are removed."""
    leftovers = {shard_name(k) for k in mine}
    for name in os.listdir(out) if os.path.isdir(out) else []:
        if TEMP_MARK in name and name.split(TEMP_MARK)[0] in leftovers:
            os.remove(os.path.join(out, name))
    size = settings["shard_size"]
    pending = [k for k in mine if load_part(out, k) is None]
    batches = [list(range(lo, min(lo + batch, hi)))
               for k in pending for hi in [min((k + 1) * size, n_source)] for lo in range(k * size, hi, batch)]
    return pending, batches


def load_invae_for(args, device: torch.device):
    from srdit.model.invae import load_invae

    vae = load_invae(args.vae)
    check_finite_weights(vae.state_dict(), args.vae, "the latents would be NaN or garbage")
    return vae.to(device)


def load_teacher_for(args, settings: dict, device: torch.device):
    from srdit.model.dinov2 import load_dinov2

    teacher = load_dinov2(args.teacher_arch, args.teacher, settings["teacher"]["img_size"], args.teacher_pos_interp)
    check_finite_weights(teacher.state_dict(), args.teacher, "the cached targets would be NaN or garbage")
    return teacher.to(device)


def encode_shards(args, source: Source, settings: dict, batches: list[list[int]], vae, teacher,
                  device: torch.device, *, show: bool, desc: str) -> list[dict]:
    """Crop (in DataLoader workers), encode and write every shard the batches cover, in order;
    returns the parts written."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    workers = args.workers if args.workers is not None else max(1, min(16, (os.cpu_count() or 2) // world))
    samples = SourceSamples(source, args.resolution, None if args.cache_teacher else args.image_format)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=batches, num_workers=workers, collate_fn=as_list,
                                         prefetch_factor=4 if workers else None)
    todo = sum(len(b) for b in batches)
    bar = Progress(f"prepare ({desc})", todo, unit="img", enabled=show and todo > 0)
    buffer, written, skipped_now = None, [], 0
    latent_cause = ("the release's vae-in/ files hold them (--latents encode --vae INVAE.pt encodes the images "
                    "instead)" if vae is None else f"the INVAE ({args.vae}) computed them"
                    + (" in bf16: try --precision fp32" if args.precision == "bf16" else ""))
    for items in loader:
        k = items[0]["index"] // settings["shard_size"]
        if buffer is None or buffer.k != k:
            if buffer is not None:
                written.append(buffer.write(args.out))
            buffer = ShardBuffer(k, settings, len(source))
        good = [it for it in items if it["error"] is None]
        for it in items:
            if it["error"] is not None:
                buffer.skipped.append([it["index"], printable(source.files[it["index"]]), it["error"]])
        skipped_now += len(items) - len(good)
        if good:
            idx = np.array([it["index"] for it in good], np.int64)
            buffer.index.append(idx)
            buffer.label.append(source.labels[idx])
            latents = encode_latents(good, idx, vae, args, device, source)
            check_finite(latents, "latents", good, source, k, latent_cause)
            buffer.latent.append(latents.numpy())
            if teacher is not None:
                targets = teacher_targets(teacher, good, device)
                check_finite(targets, "teacher targets", good, source, k, f"the teacher ({args.teacher}) computed them")
                buffer.teacher.append(targets.numpy())
            if settings["image"]:
                buffer.images += [it["encoded"] for it in good]
        bar.update(len(items), skipped=skipped_now)
    if buffer is not None:
        written.append(buffer.write(args.out))
    bar.close()
    return written


def check_finite(values: torch.Tensor, what: str, items: list[dict], source: Source, k: int, cause: str) -> None:
    """Stop at an encoder batch whose `what` (CPU, one row per item) holds NaN or Inf, naming the
    batch, its shard and the files: such values would be written, and trained on, silently."""
    bad = (~torch.isfinite(values.reshape(len(values), -1))).any(1).nonzero().flatten().tolist()
    if bad:
        files = [f"vae-in/{source.latents[i]}" if source.latents is not None else source.files[i]
                 for i in (items[j]["index"] for j in bad)]
        raise PrepareError(f"the {what} of {len(bad)} of the {len(items)} images of the encoder batch of source "
                           f"images {items[0]['index']}-{items[-1]['index']} ({shard_name(k)}) are NaN or Inf: "
                           f"{', '.join(map(printable, files[:3]))}{' ...' if len(files) > 3 else ''}; {cause}; "
                           f"nothing of this shard was written, finished shards are kept")


def release_latents(items: list[dict], source: Source, resolution: int) -> torch.Tensor:
    """The release's stored samples as they are, float32 [B, 32, r/16, r/16] (each file holds
    float32 [1, 32, r/16, r/16], already a posterior sample, unscaled); a file of another shape or
    dtype is an error naming it."""
    want = (32, resolution // 16, resolution // 16)
    out = []
    for it in items:
        z = it["latent"]
        if z.shape[:1] == (1,):
            z = z[0]  # the release's dataset.py squeezes this dim
        if tuple(z.shape) != want or not np.issubdtype(z.dtype, np.floating):
            path = os.path.join(source.root, "vae-in", source.latents[it["index"]])
            raise PrepareError(f"{path} holds {it['latent'].dtype} {tuple(it['latent'].shape)}, expected float32 "
                               f"(1, {', '.join(map(str, want))}) at --resolution {resolution} (a sampled INVAE latent)")
        out.append(z)
    return torch.from_numpy(np.stack(out).astype(np.float32, copy=False))


@torch.no_grad()
def encode_latents(items: list[dict], idx: np.ndarray, vae, args, device: torch.device, source: Source) -> torch.Tensor:
    """One posterior sample per item, float32 [B, 32, r/16, r/16] on the CPU, unscaled."""
    if vae is None:  # release layout: its vae-in/ samples
        return release_latents(items, source, args.resolution)
    from srdit.model.invae import pixels_from_uint8

    pixels = torch.from_numpy(np.stack([it["crop"] for it in items])).to(device).permute(0, 3, 1, 2)  # [B,3,r,r] u8
    bf16 = args.precision == "bf16" and device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        mean, logvar = vae.encode_moments(pixels_from_uint8(pixels))
    std = torch.exp(0.5 * logvar.float())  # as INVAE.encode
    return posterior_sample(mean, std, args.seed, idx)


@torch.no_grad()
def teacher_targets(teacher, items: list[dict], device: torch.device) -> torch.Tensor:
    """DINOv2 class + patch tokens [B, 1 + P, D] in fp16 on the CPU, computed as the trainer's
    online teacher does (srdit.train.step: bf16 autocast on CUDA)."""
    from srdit.model.dinov2 import repa_targets

    images = torch.from_numpy(np.stack([it["crop"] for it in items])).to(device).permute(0, 3, 1, 2)  # [B,3,r,r]
    with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext():
        cls, patches = teacher(images)
    return repa_targets(cls, patches).float().half().cpu()


def finalize(out: str, settings: dict, n_shards: int, written: int, todo: int, seconds: float) -> None:
    """index.json, skipped.txt and the checksum stat cache from the parts of all shards; summary."""
    parts = [load_part(out, k) for k in range(n_shards)]
    missing = [shard_name(k) for k, p in enumerate(parts) if p is None]
    if missing:
        raise PrepareError(f"{len(missing)} shard(s) are unfinished ({', '.join(missing[:3])}...): a rank failed? "
                           f"rerun the same command to finish them")
    skipped = sorted(s for p in parts for s in p["skipped"])
    write_text(os.path.join(out, SKIPPED), "# source_index\tpath\terror\n"
               + "".join(f"{i}\t{path}\t{error}\n" for i, path, error in skipped))
    shards = [{k: p[k] for k in ("file", "samples", "bytes", "sha256", "source_range")} for p in parts]
    total = sum(s["samples"] for s in shards)
    index = {**settings, "samples": total, "skipped": len(skipped), "skipped_log": SKIPPED, "shards": shards,
             "bytes": sum(s["bytes"] for s in shards), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    stamp = {}  # shards whose file is unchanged since it was hashed while being written
    for p in parts:
        st = os.stat(os.path.join(out, p["file"]))
        if (st.st_size, st.st_mtime_ns) == (p["bytes"], p["mtime_ns"]):
            stamp[p["file"]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": p["sha256"]}
    write_json(os.path.join(out, VERIFIED), stamp)
    write_json(os.path.join(out, INDEX), index)
    rate = todo / seconds if seconds > 0 else 0.0
    print(f"srdit.data.prepare: {total:,} samples in {n_shards} shards ({index['bytes'] / 1e9:.3f} GB, "
          f"{index['bytes'] / max(1, total):,.0f} B/sample) in {out}; {len(skipped)} unreadable image(s) skipped"
          f"{f' (listed in {os.path.join(out, SKIPPED)})' if skipped else ''}; this run: {written} shard(s), "
          f"{todo:,} images in {seconds:.1f} s ({rate:.1f} images/s), {n_shards - written} shard(s) were done before",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m srdit.eval SAMPLES.npz --ref VIRTUAL_imagenet256_labeled.npz --inception PATH
[--kdd-teacher dinov2_vitl14_pretrain.pth] [--kdd-real REAL.npz] [--json OUT] [--batch N]`

The ADM evaluator's numbers (SPEC 5) for a samples .npz (`arr_0` uint8 [N, H, W, 3], as
`python -m srdit.sample` writes):
  FID / sFID  against the reference npz's stored mu/sigma and mu_s/sigma_s;
  IS          10 consecutive splits of 5,000 (order matters: samples must be interleaved);
  P / R       k = 3 against the reference's images (`arr_0`, 10K);
  KDD         DINOv2 ViT-L/14 class tokens against a real set (default: the reference's images),
              100 subsets of 1,000 (only with --kdd-teacher).
On the GPU when there is one (fp32, TF32 off). The samples are streamed in batches of --batch
images (only features stay in RAM: ~1 GB for 50K); the reference's features are cached on first
use (srdit.eval.features). One line per metric; --json writes them with the settings the samples
were made with. The reference's images are checked before any network runs, and a reference of
another resolution than the samples is warned about.

FID's matrix square root: `--fid-method sqrtm` (default) is ADM's scipy.linalg.sqrtm; `eigh`
(metrics.frechet_distance_eigh) is the same number up to rounding and much faster, for quick looks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from srdit.eval import metrics
from srdit.eval.features import (
    ReferenceSet,
    inception_features,
    kdd_features,
    load_kdd_teacher,
    npz_image_shape,
    npz_images,
    strict_fp32,
)
from srdit.eval.inception import load_inception
from srdit.io import describe_error, write_json
from srdit.progress import Progress

FID_METHODS = ("sqrtm", "eigh")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m srdit.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", help="samples .npz (arr_0 uint8 [N, H, W, 3])")
    parser.add_argument("--ref", required=True, help="ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("--inception", required=True, help="pt_inception-2015-12-05-6726825d.pth (or its folder)")
    parser.add_argument("--kdd-teacher", default=None, help="dinov2_vitl14_pretrain.pth; without it KDD is skipped")
    parser.add_argument("--kdd-real", default=None, help="real images for KDD (.npz arr_0; default: --ref)")
    parser.add_argument("--json", default=None, help="write the metrics here")
    parser.add_argument("--batch", type=int, default=250, help="images per network call")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--cache-dir", default=None,
                        help="reference feature cache (default: .srdit_eval_cache beside the reference file)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    parser.add_argument("--fid-method", default="sqrtm", choices=FID_METHODS)
    return parser.parse_args(argv)


def frechet(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, method: str, device=None) -> float:
    """FID of sample features against reference statistics (sample statistics first, as ADM)."""
    if method == "eigh":
        return metrics.frechet_distance_eigh(features, mu, sigma, device=device)
    return metrics.fid_from_features(features, mu, sigma)


def _require(path: str | None, what: str) -> None:
    if path is not None and not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def pick_device(name: str | None) -> torch.device:
    """--device as torch names it (cpu, cuda, cuda:1), checked; default cuda when present."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name torch knows (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


def check_real_images(ref: str, kdd_real: str | None, sample_size: tuple[int, int]) -> None:
    """Before any network runs: the reference (and the KDD real set) hold images arr_0 (precision
    and recall read the reference's, KDD the real set's), and a reference whose images differ
    from the samples in resolution is warned about (the metrics would compare unlike sets)."""
    for path, what in ((ref, "the reference"), (kdd_real, "the KDD real set")):
        if path is None:
            continue
        try:
            shape = npz_image_shape(path)
        except KeyError as error:
            raise ValueError(f"{error.args[0]}: {what} needs its images as arr_0, uint8 [N, H, W, 3] (the ADM "
                             "reference batch, e.g. VIRTUAL_imagenet256_labeled.npz, holds them)") from None
        if path == ref and shape[1:3] != sample_size:
            print(f"srdit.eval: warning: the samples are {sample_size[0]}x{sample_size[1]} px but the reference's "
                  f"images {shape[1]}x{shape[2]} px ({ref}): the metrics compare sets of different resolutions; "
                  "use the reference of the samples' resolution (VIRTUAL_imagenet256_labeled.npz for 256 px)",
                  file=sys.stderr, flush=True)


def evaluate(args) -> dict:
    for path, what in ((args.samples, "samples file"), (args.ref, "reference batch"),
                       (args.inception, "Inception weights (pt_inception-2015-12-05-6726825d.pth)"),
                       (args.kdd_teacher, "KDD network weights (dinov2_vitl14_pretrain.pth)"),
                       (args.kdd_real, "KDD real images")):
        _require(path, what)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    device = pick_device(args.device)
    start = time.perf_counter()
    cache_dir = None if args.no_cache else (args.cache_dir or "default")
    ref = ReferenceSet(args.ref, batch=args.batch, cache_dir=cache_dir)
    n, height, width, _ = npz_image_shape(args.samples)
    if n < 4:
        raise ValueError(f"{args.samples} holds {n} images; the metrics need at least 4 (k = 3 neighbours)")
    check_real_images(args.ref, args.kdd_real if args.kdd_teacher else None, (height, width))
    inception = load_inception(args.inception, device)
    teacher = load_kdd_teacher(args.kdd_teacher, device) if args.kdd_teacher else None

    # one pass over the samples feeds both networks; only features stay
    parts, kdd_parts = [], []
    progress = Progress("eval", n, unit="img")
    for i, images in enumerate(npz_images(args.samples, args.batch)):
        name = f"{args.samples}, images {i * args.batch:,}-{i * args.batch + len(images) - 1:,}"
        parts.append(inception_features(inception, [images], name=name))
        if teacher is not None:
            kdd_parts.append(kdd_features(teacher, [images], name=name))
        progress.update(len(images))
    progress.close()
    feats = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    del parts
    stats, stats_source = ref.stats(inception)
    ref_pool = ref.inception(inception)["pool"]
    result = {
        "fid": frechet(feats["pool"], stats["mu"], stats["sigma"], args.fid_method, device),
        "sfid": frechet(feats["spatial"], stats["mu_s"], stats["sigma_s"], args.fid_method, device),
    }
    result["is"], result["is_std"] = metrics.inception_score(feats["logits"])
    with strict_fp32():  # the fp32 fallback blocks of the distances must really be fp32
        result["precision"], result["recall"] = metrics.precision_recall(ref_pool, feats["pool"], device=device)
    del feats
    kdd_real = args.kdd_real or args.ref
    if teacher is not None:
        real_set = ref if kdd_real == args.ref else ReferenceSet(kdd_real, batch=args.batch, cache_dir=cache_dir)
        real = real_set.kdd(teacher)
        result["kdd"], result["kdd_std"] = metrics.kernel_distance(real, np.concatenate(kdd_parts))
        result["kdd_real_images"] = len(real)
    with np.load(args.samples) as f:
        sample_settings = json.loads(str(f["settings"])) if "settings" in f.files else None
    result.update({
        "num_samples": n, "reference_images": len(ref_pool), "samples": os.path.abspath(args.samples),
        "reference": os.path.abspath(args.ref), "reference_stats": stats_source,
        "kdd_real": os.path.abspath(kdd_real) if args.kdd_teacher else None,
        "fid_method": args.fid_method, "device": str(device), "seconds": time.perf_counter() - start,
        "sample_settings": sample_settings,
    })
    return result


def report(result: dict) -> list[str]:
    lines = [
        (f"FID        {result['fid']:.4f}   ({result['num_samples']:,} samples vs reference mu/sigma, "
         f"{result['reference_stats']}; {result['fid_method']})"),
        f"sFID       {result['sfid']:.4f}",
        f"IS         {result['is']:.4f} +- {result['is_std']:.4f}   (consecutive splits of 5,000)",
        f"Precision  {result['precision']:.4f}   (k = 3, {result['reference_images']:,} reference images)",
        f"Recall     {result['recall']:.4f}",
    ]
    if "kdd" in result:
        lines.append(f"KDD        {result['kdd']:.4f} +- {result['kdd_std']:.4f}   (DINOv2-L/14, 100 subsets of "
                     f"<= 1,000, vs {result['kdd_real_images']:,} real images)")
    else:
        lines.append("KDD        skipped (no --kdd-teacher)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except (ValueError, KeyError, OSError) as error:
        print(f"srdit.eval: error: {describe_error(error)}", file=sys.stderr)
        return 2
    settings = result["sample_settings"]
    if settings:
        print(f"samples: {settings.get('sampler')} NFE {settings.get('nfe')}, guidance {settings.get('guidance')}, "
              f"labels {settings.get('labels')}, seed {settings.get('seed')}, {settings.get('precision')}, "
              f"checkpoint {settings.get('checkpoint')}")
    for line in report(result):
        print(line)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0

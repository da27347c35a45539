"""Sampling throughput: samples/s per NFE, and the other stages of a 50K evaluation.

    python bench/sample.py --device cuda --preset sr-dit-b1-256 --json OUT   # the GPU figure
    python bench/sample.py --device cpu --preset quickstart --json OUT       # CPU

Stages, each on one batch through the code the commands run (random weights: the cost does not
depend on them):
  sample     srdit.sample.generate.generate (SDE/ODE sampler + model, no decode), for each NFE of
             --nfe and each precision of --precision: ms per batch, samples/s, ms per model call,
             model TFLOP/s. FLOPs per image per NFE: the sampling forward runs every block on all
             T tokens (no routing): srdit.model.flops' forward with the routed blocks counted at T
             tokens, i.e. forward_path_drop + routed_depth x block(T).
  decode     INVAE decode (latent presets only)
  inception  FID Inception-v3 features (srdit.eval.features.inception_features, fp32, TF32 off)
  kdd        DINOv2-L/14 class tokens incl. the PIL bicubic resize (srdit.eval.features.kdd_features)
  frechet    2048-d FID square root: ADM's scipy sqrtm and the eigh variant
Projection (the issue's target: a 50K-sample, 250-NFE unguided evaluation in under 1 GPU-hour):
  50,000 x (1 / sample rate at the largest NFE + 1 / decode + 1 / inception + 1 / kdd) + 2 frechet
  (FID, sFID); the reference's features are cached, so they are not counted.
Timing: bench/common.time_ms (warm-up untimed, median and IQR).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script: bench.*
from bench.common import table, time_ms, write_json  # noqa: E402
from srdit.config import apply_overrides, preset  # noqa: E402
from srdit.model import build_model  # noqa: E402
from srdit.model.flops import sampling_flops  # noqa: E402
from srdit.runinfo import environment  # noqa: E402
from srdit.sample.generate import generate  # noqa: E402

EVAL_SAMPLES = 50_000


def bench_sample(cfg, device, batch, nfe, precision, warmup, iters) -> dict:
    cfg = apply_overrides(cfg, [f"sample.num_steps={nfe}", f"sample.precision={precision}", "sample.guidance=none"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval().requires_grad_(False)
    labels = torch.arange(batch, device=device) % cfg.model.num_classes
    generator = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def run():
        with autocast:
            generate(model, cfg, labels, generator=generator)

    ms, iqr = time_ms(run, device, warmup=warmup, iters=iters)
    calls = {"sde": nfe, "euler": nfe, "heun": 2 * nfe - 1}[cfg.sample.sampler]
    rate = batch / (ms * 1e-3)
    return {"stage": "sample", "precision": precision, "nfe": calls, "batch": batch, "ms": ms, "iqr_ms": iqr,
            "samples_per_s": rate, "ms_per_nfe": ms / calls,
            "model_tflops": rate * calls * float(sampling_flops(cfg.model)) / 1e12}


def bench_decode(cfg, device, batch, warmup, iters) -> dict | None:
    if cfg.model.in_channels == 1:
        return None  # pixel space: nothing to decode
    from srdit.model.invae import build_invae

    vae = build_invae().to(device).freeze()
    m = cfg.model
    z = torch.randn(batch, m.in_channels, m.input_size, m.input_size, device=device)
    ms, iqr = time_ms(lambda: vae.decode_scaled(z), device, warmup=warmup, iters=iters)
    return {"stage": "decode", "precision": "fp32", "batch": batch, "ms": ms, "iqr_ms": iqr,
            "samples_per_s": batch / (ms * 1e-3)}


def bench_inception(resolution, device, batch, warmup, iters) -> dict:
    from srdit.eval.features import inception_features
    from srdit.eval.inception import build_inception

    model = build_inception().to(device)
    images = torch.randint(0, 256, (batch, resolution, resolution, 3), dtype=torch.uint8)
    ms, iqr = time_ms(lambda: inception_features(model, [images]), device, warmup=warmup, iters=iters)
    return {"stage": "inception", "precision": "fp32", "batch": batch, "ms": ms, "iqr_ms": iqr,
            "samples_per_s": batch / (ms * 1e-3)}


def bench_kdd(resolution, device, batch, warmup, iters) -> dict:
    from srdit.eval.features import KDD_ARCH, KDD_SIZE, kdd_features
    from srdit.model.dinov2 import build_dinov2

    teacher = build_dinov2(KDD_ARCH, KDD_SIZE, "dinov2").freeze().to(device)
    images = np.random.default_rng(0).integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    ms, iqr = time_ms(lambda: kdd_features(teacher, [images]), device, warmup=warmup, iters=iters)
    return {"stage": "kdd", "precision": "fp32", "batch": batch, "ms": ms, "iqr_ms": iqr,
            "samples_per_s": batch / (ms * 1e-3)}


def bench_frechet(dim: int = 2048) -> list[dict]:
    import time

    from srdit.eval import metrics

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((4 * dim, dim)).astype(np.float32)
    mu, sigma = metrics.feature_stats(rng.standard_normal((4 * dim, dim)))
    rows = []
    for name, fn in (("sqrtm", lambda: metrics.fid_from_features(feats, mu, sigma)),
                     ("eigh", lambda: metrics.frechet_distance_eigh(feats, mu, sigma))):
        t0 = time.perf_counter()
        fn()
        rows.append({"stage": "frechet", "precision": name, "ms": (time.perf_counter() - t0) * 1e3})
    return rows


def projection(rows: list[dict]) -> dict:
    """Hours of a 50K evaluation at the largest benchmarked NFE, per sampling precision."""
    out = {}
    per_image = {r["stage"]: 1.0 / r["samples_per_s"] for r in rows if r["stage"] in ("decode", "inception", "kdd")}
    frechet = 2 * next((r["ms"] for r in rows if r["stage"] == "frechet" and r["precision"] == "sqrtm"), 0.0) / 1e3
    for precision in {r["precision"] for r in rows if r["stage"] == "sample"}:
        runs = [r for r in rows if r["stage"] == "sample" and r["precision"] == precision]
        sample = max(runs, key=lambda r: r["nfe"])
        seconds = EVAL_SAMPLES * (1.0 / sample["samples_per_s"] + sum(per_image.values())) + frechet
        out[precision] = {"nfe": sample["nfe"], "hours": seconds / 3600,
                          "stages_counted": ["sample", *sorted(per_image), *(["frechet"] if frechet else [])]}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="default: sr-dit-b1-256 on GPU, quickstart on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 125 on GPU, 100 on CPU")
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help="sampler steps (default: 25 50 100 250)")
    parser.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16"],
                        help="default: fp32 bf16 on GPU, fp32 on CPU")
    parser.add_argument("--stages", nargs="+", default=None,
                        choices=["sample", "decode", "inception", "kdd", "frechet"],
                        help="default: all on GPU; sample and inception on CPU")
    parser.add_argument("--no-tf32", action="store_true", help="fp32 sampling without TF32 matmuls")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    name = args.preset or ("sr-dit-b1-256" if gpu else "quickstart")
    cfg = preset(name)
    batch = args.batch or (125 if gpu else 100)
    nfes = args.nfe or [25, 50, 100, 250]
    precisions = args.precision or (["fp32", "bf16"] if gpu else ["fp32"])
    stages = args.stages or (["sample", "decode", "inception", "kdd", "frechet"] if gpu else ["sample", "inception"])
    if gpu:  # as `python -m srdit.sample` does for sample.precision=fp32 (the release sampler's default)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
    env = environment(device)
    print(f"{env['device_name']}  torch {env['torch']}  commit {env['commit']}  preset {name}  batch {batch}  "
          f"sampler {cfg.sample.sampler}  {float(sampling_flops(cfg.model)) / 1e9:.2f} GFLOP per image per NFE")
    rows = []

    def attempt(fn, *a):
        try:
            out = fn(*a)
        except Exception as error:  # a stage that cannot run here is reported, the rest still run
            rows.append({"stage": fn.__name__.replace("bench_", ""), "error": f"{type(error).__name__}: {error}"[:300]})
            return
        rows.extend(out if isinstance(out, list) else [out] if out else [])

    if "sample" in stages:
        for precision in precisions:
            for nfe in nfes:
                attempt(bench_sample, cfg, device, batch, nfe, precision, args.warmup, args.iters)
    resolution = cfg.data.resolution
    if "decode" in stages:
        attempt(bench_decode, cfg, device, batch, args.warmup, args.iters)
    if "inception" in stages:
        attempt(bench_inception, resolution, device, batch, args.warmup, args.iters)
    if "kdd" in stages:
        attempt(bench_kdd, resolution, device, batch, args.warmup, args.iters)
    if "frechet" in stages:
        attempt(bench_frechet)
    print(table(rows, ["stage", "precision", "nfe", "batch", "ms", "iqr_ms", "samples_per_s", "ms_per_nfe",
                       "model_tflops", "error"]))
    ok = [r for r in rows if "error" not in r]
    proj = projection(ok) if any(r["stage"] == "sample" for r in ok) else {}
    for precision, p in proj.items():
        print(f"50K evaluation at NFE {p['nfe']}, sampling in {precision}: {p['hours']:.2f} h "
              f"(counted: {', '.join(p['stages_counted'])})")
    write_json(args.json, {**env, "preset": name, "batch": batch, "sampler": cfg.sample.sampler,
                           "tf32": gpu and not args.no_tf32, "sample_gflop_per_nfe": float(sampling_flops(cfg.model)) / 1e9,
                           "rows": rows, "projection_50k": proj})


if __name__ == "__main__":
    main()

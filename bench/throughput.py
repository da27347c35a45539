"""Full training steps per second: forward, losses, backward, clip, optimizer, EMA, with the
teacher online (uint8 images in) or cached (targets in), on synthetic inputs already on the
device, through the training loop's own step (srdit.train.assemble.build_step).

    python bench/throughput.py --preset sr-dit-b1-256 --device cuda [--batch 256 | --world 8] [--steps 20]
                               [--variants eager kernels ...] --json OUT

Variants, all in one run on one device (ratios are the result):
  eager           kernels=eager, no compile: the release-style baseline
  kernels         kernels=triton and batched_adaln (every fused op)
  kernels-cublas-mlp  the same with model.fused_mlp=false: the MLPs on cuBLAS + separate GELU
                  passes (against `kernels`: srdit's Triton GEMM against cuBLAS, in the step)
  compile         torch.compile of the model
  kernels+compile both
  graphs          the whole step replayed as CUDA graphs (srdit.train.graphs; GPU only)
  kernels+graphs  both: the per-rank step the 8 x 32 target is counted for (--world 8)
  cached-teacher  eager, teacher targets given instead of images
  best            kernels + compile + graphs + cached teacher
FLOPs per image are analytic (srdit.model.flops; checked against torch's flop counter in the
tests); MFU is against the bf16 matmul rate measured in the same run, reported twice: counting
the student only, and student + online teacher (when the variant runs the teacher).
Every variant takes the same number of steps from the same start on the same inputs, so the last
step's loss is comparable: loss_rel_diff is its distance to the eager variant with the same
teacher (the GPU check that the fast step computes the same thing, up to bf16 rounding).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script: bench.*
from bench.common import matmul_tflops, sync, table, time_ms, write_json  # noqa: E402
from srdit.config import apply_overrides, preset  # noqa: E402
from srdit.model import build_model  # noqa: E402
from srdit.model.flops import model_flops, teacher_flops  # noqa: E402
from srdit.runinfo import environment  # noqa: E402
from srdit.train.assemble import build_step  # noqa: E402
from srdit.train.flat import ShardLayout, flatten_for_training  # noqa: E402
from srdit.train.inputs import build_teacher, synthetic_batch  # noqa: E402
from srdit.train.loss import draw_step_noise  # noqa: E402
from srdit.train.optim import EMA, Optimizers  # noqa: E402
from srdit.train.reduce import CHUNKS  # noqa: E402

# "kernels" means the fused ops: Triton kernels and the batched adaLN GEMM
VARIANTS = {
    "eager": dict(kernels="eager", compile=False, cached=False, graphs=False),
    "kernels": dict(kernels="triton", compile=False, cached=False, graphs=False),
    "kernels-cublas-mlp": dict(kernels="triton", compile=False, cached=False, graphs=False, fused_mlp=False),
    "compile": dict(kernels="eager", compile=True, cached=False, graphs=False),
    "kernels+compile": dict(kernels="triton", compile=True, cached=False, graphs=False),
    "graphs": dict(kernels="eager", compile=False, cached=False, graphs=True),
    "kernels+graphs": dict(kernels="triton", compile=False, cached=False, graphs=True),
    "cached-teacher": dict(kernels="eager", compile=False, cached=True, graphs=False),
    "best": dict(kernels="triton", compile=True, cached=True, graphs=True),
}


def build_variant_step(preset_name: str, spec: dict, batch: int, device, *, autocast=None, reduce=None,
                       overrides=(), world: int = 1, shard: bool = False):
    """(cfg, model, step runner, one synthetic micro-batch) of the variant `spec` (a value of
    VARIANTS) at `batch`, built through srdit.train.assemble.build_step, seed 0. autocast, reduce:
    as build_step's (bench/traffic.py gives CUDA's policy on the CPU, and a rank's reduction);
    overrides: more config settings; world: the flat buffers laid out for that many ranks (as
    srdit.train lays them out: the unsharded update of a rank of `world` covers that layout);
    shard: the update sharded as rank 0 of them (AdamW and the EMA over its pieces;
    bench/traffic.py counts its collectives, not runs them)."""
    fused = spec["kernels"] == "triton"
    cfg = apply_overrides(preset(preset_name), [
        f"model.kernels={spec['kernels']}", f"model.batched_adaln={fused}", f"train.global_batch={batch}",
        f"data.cached_teacher={spec['cached']}", f"train.compile={spec['compile']}", f"train.cuda_graphs={spec['graphs']}",
        f"model.fused_mlp={spec.get('fused_mlp', True)}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    teacher, _ = build_teacher(cfg, device, random_init=True)  # the real teacher's cost, without its file
    optimizers = ema = None
    flatten_for_training(model, cfg, world)
    if shard:
        layout = ShardLayout(model, 0, world, CHUNKS)
        optimizers, ema = Optimizers(model, cfg.train, device, layout), EMA(model, cfg.train.ema_decay,
                                                                             cfg.train.ema_update, layout)
    runner = build_step(cfg, model, teacher, device=device, autocast=autocast, reduce=reduce, optimizers=optimizers,
                        ema=ema)
    data = synthetic_batch(cfg, batch, device, spec["cached"])
    return cfg, model, runner, data


def build_variant(preset_name, variant, batch, device):
    """(cfg, step): `step()` runs one full training step of `variant` on fixed synthetic data.
    A graph variant's first step captures its graphs (srdit.train.graphs: warm-up, capture, state
    restored), so its steps compute what the others' do, from the same start. (The same step on
    the CPU, with stand-ins for inductor and CUDA graphs: tests/train/test_fast_step.py.)"""
    cfg, _, runner, data = build_variant_step(preset_name, VARIANTS[variant], batch, device)
    gen = torch.Generator(device).manual_seed(0)
    host = torch.Generator().manual_seed(1)

    def step():
        noise = draw_step_noise(batch, data["latent"].shape[1:], cfg.model, cfg.train, generator=gen,
                                host_generator=host, device=device)
        return runner.run([data], noise)

    return cfg, step


def run_variant(preset_name, variant, batch, steps, device):
    cfg, step = build_variant(preset_name, variant, batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms, iqr = time_ms(step, device, warmup=3, iters=steps)
    sync(device)
    loss = step()["loss"].item()
    flops = model_flops(cfg.model, cfg.train.path_drop_prob).train
    teacher = 0 if VARIANTS[variant]["cached"] else teacher_flops(cfg.data.teacher_arch, cfg.data.teacher_resolution)
    return {"variant": variant, "batch": batch, "step_ms": ms, "iqr_ms": iqr, "images_per_s": batch / (ms * 1e-3),
            "model_flops_per_image": flops, "teacher_flops_per_image": teacher, "loss": loss,
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sr-dit-b1-256")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--batch", type=int, default=None, help="per-device batch (default: 32 on GPU, 8 on CPU)")
    shape.add_argument("--world", type=int, default=None,
                       help="the per-rank step of an N-GPU run of the preset: its global batch / N per device "
                            "(--world 8: the paper's 8 x 32; the reduction itself is modelled by bench/traffic.py)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    batch = args.batch or (32 if device.type == "cuda" else 8)
    if args.world:
        global_batch = preset(args.preset).train.global_batch
        if global_batch % args.world:
            raise SystemExit(f"--world {args.world} does not divide {args.preset}'s global batch {global_batch}")
        batch = global_batch // args.world
        print(f"per-rank step of a {args.world}-GPU run of {args.preset}: batch {batch} of {global_batch}")
    # Triton on a CPU runs only under the interpreter: a correctness tool, not a speed one
    variants = args.variants or (list(VARIANTS) if device.type == "cuda" else ["eager", "cached-teacher"])
    env = environment(device)
    peak = matmul_tflops(device)
    print(f"{env['device_name']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}  "
          f"preset {args.preset}  batch {batch}  measured matmul {peak:.1f} TFLOP/s")
    rows = []
    columns = ["variant", "batch", "step_ms", "iqr_ms", "images_per_s", "model_tflops", "mfu", "mfu_with_teacher",
               "peak_mem_gb", "speedup", "loss", "loss_rel_diff", "error"]
    for variant in variants:
        try:
            row = run_variant(args.preset, variant, batch, args.steps, device)
        except Exception as error:  # a variant that cannot run here is reported, the rest still run
            traceback.print_exc()  # the whole story for the log; the table and JSON get one line
            row = {"variant": variant, "error": f"{type(error).__name__}: {error}"[:300]}
        release_memory(device)
        rows.append(row)
        compare(rows, peak)
        print(table([row], columns).splitlines()[-1], flush=True)
        # after every variant: a run cut short by a time limit keeps what it measured
        write_json(args.json, {**env, "preset": args.preset, "batch": batch, "world": args.world, "steps": args.steps,
                               "matmul_tflops": peak, "rows": rows}, quiet=True)
    print(table(rows, columns))
    if args.json:
        print(f"wrote {args.json}")


def release_memory(device) -> None:
    """Let the next variant start from an empty card: the last one's model, optimizer, graphs
    (their memory pool goes with them) and compiled code are dropped."""
    import gc

    torch._dynamo.reset()  # compiled code holds its model's tensors
    gc.collect()  # closures and graphs form cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare(rows: list[dict], peak: float) -> None:
    """The derived columns: TFLOP/s and MFU both ways, speed-up over eager, and the loss check."""
    done = {r["variant"]: r for r in rows if "images_per_s" in r}
    for r in done.values():
        r["model_tflops"] = r["images_per_s"] * r["model_flops_per_image"] / 1e12
        r["mfu"] = r["model_tflops"] / peak
        flops = r["model_flops_per_image"] + r["teacher_flops_per_image"]
        r["mfu_with_teacher"] = r["images_per_s"] * flops / 1e12 / peak
        if "eager" in done:
            r["speedup"] = r["images_per_s"] / done["eager"]["images_per_s"]
        # the math must not change: after the same steps from the same start, the loss equals
        # that of the eager variant with the same teacher (online: eager; cached: cached-teacher)
        reference = done.get("cached-teacher" if VARIANTS[r["variant"]]["cached"] else "eager")
        if reference is not None:
            r["loss_rel_diff"] = abs(r["loss"] - reference["loss"]) / max(abs(reference["loss"]), 1e-12)


if __name__ == "__main__":
    main()

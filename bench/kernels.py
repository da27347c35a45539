"""Per-op forward+backward time of the Triton kernels vs their eager twins vs torch.compile of the
eager twins, at SR-DiT-B/1 shapes (D = 768, T = 257 tokens, K = 64 routed, H = 12, Dh = 64).

    python bench/kernels.py [--device cuda] [--batch 32 256] [--json OUT]
    python bench/kernels.py --sweep [--batch 256] [--ops OP ...] [--json OUT]
    python bench/kernels.py --attention ...   (also every attention backend at the step's shapes)

--sweep times the Triton ops with each candidate launch setting of SWEEP (elements per program
and warps, per kernel of srdit.kernels.triton_utils.GPU_TILES, forward and backward apart) and
of GEMM_SWEEP (the MLP GEMM's block, warps and stages, GEMM_TILES; timed through gelu_mlp; every
candidate meets bench/compile_check.py's budget) and reports each against the default. The
defaults in GPU_TILES stay until a GPU sweep is recorded in bench/RESULTS.md; a winner is then
set there (and bench/compile_check.py rerun). On the CPU the Triton ops run under the
interpreter: the sweep runs, its times mean nothing.

Memory-bound ops are scored by achieved GB/s against the card's measured copy bandwidth (target:
>= 70%); the bytes are the minimum an op must move, forward + backward, with bf16 activations (2
bytes), written next to each case; the teacher's residual_layer_norm is forward only (the
teacher is frozen); repa_cosine reads fp32 targets. sprint_fuse and the MLP (gelu_mlp: the
student's, GELU in fc1's GEMM and its derivative in the backward's; linear_gelu: the teacher's
fc1 + GELU, forward only) are GEMM-bound and scored by TFLOP/s against the measured bf16 matmul
rate; their vs_eager is srdit's Triton GEMMs against cuBLAS plus the separate GELU passes.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script: bench.*
from bench.common import copy_bandwidth_gbps, matmul_tflops, table, time_ms, write_json  # noqa: E402
from srdit.kernels import get_ops  # noqa: E402
from srdit.kernels.triton_utils import GEMM_TILES, GPU_TILES, GemmTile, Tile  # noqa: E402
from srdit.runinfo import environment  # noqa: E402

D, T, K, H, DH = 768, 257, 64, 12, 64


@dataclass
class Case:
    name: str
    make: Callable  # (B, dtype, device) -> (args, kwargs-free positional inputs)
    bytes_fn: Callable[[int], float]  # B -> bytes moved forward + backward (0: compute-bound)
    flops_fn: Callable[[int], float] = lambda B: 0.0  # B -> matmul FLOPs forward + backward


def _leaf(t):
    return t.detach().requires_grad_(t.is_floating_point())


def rmsnorm_inputs(B, dtype, device):
    x = torch.randn(B, T, D, device=device, dtype=dtype)
    shift, scale = (torch.randn(B, D, device=device, dtype=dtype) * 0.1 for _ in range(2))
    return [_leaf(x), _leaf(shift), _leaf(scale)]


def residual_inputs(B, dtype, device):
    x, f = (torch.randn(B, T, D, device=device, dtype=dtype) for _ in range(2))
    gate, shift, scale = (torch.randn(B, D, device=device, dtype=dtype) * 0.1 for _ in range(3))
    return [_leaf(x), _leaf(gate), _leaf(f), _leaf(shift), _leaf(scale)]


def _rope_tables(device):
    from srdit.model.sit import VisionRoPE

    rope = VisionRoPE(DH, 16).to(device)
    return rope.freqs_cos, rope.freqs_sin


def rope_inputs(B, dtype, device):
    cos, sin = _rope_tables(device)
    x = torch.randn(B, T, H, DH, device=device, dtype=dtype)
    ids = torch.arange(-1, T - 1, device=device).expand(B, -1)
    return [_leaf(x), cos, sin, ids]


def prologue_inputs(B, dtype, device, routed=False):
    cos, sin = _rope_tables(device)
    n = K if routed else T
    qkv = torch.randn(B, n, 3 * D, device=device, dtype=dtype)
    w_q, w_k = (1 + 0.1 * torch.randn(DH, device=device) for _ in range(2))
    v0 = torch.randn(B, T, H, DH, device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(T, device=device)[:K] for _ in range(B)]) if routed else None
    rope_ids = (ids - 1).clamp(min=0) if routed else torch.arange(-1, T - 1, device=device).expand(B, -1)
    lam = torch.tensor(0.5, device=device)
    return [_leaf(qkv), H, _leaf(w_q), _leaf(w_k), cos, sin, rope_ids, _leaf(v0), ids, _leaf(lam)]


def gather_inputs(B, dtype, device):
    x = torch.randn(B, T, D, device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(T, device=device)[:K] for _ in range(B)])
    return [_leaf(x), ids]


def fuse_inputs(B, dtype, device):
    x_enc = torch.randn(B, T, D, device=device, dtype=dtype)
    g = torch.randn(B, K, D, device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(T, device=device)[:K] for _ in range(B)])
    mask = torch.randn(1, 1, D, device=device, dtype=dtype)
    w = torch.randn(D, 2 * D, device=device, dtype=dtype) * D**-0.5
    b = torch.zeros(D, device=device, dtype=dtype)
    return [_leaf(x_enc), _leaf(g), ids, _leaf(mask), _leaf(w), _leaf(b)]


def teacher_norm_inputs(B, dtype, device):
    """The DINOv2-B teacher's residual + LayerNorm at 224 px (257 tokens of width 768): fp32
    stream, bf16 branch, output in bf16 (forward only: the teacher is frozen)."""
    x = torch.randn(B, T, D, device=device)
    f = torch.randn(B, T, D, device=device, dtype=dtype)
    gamma, weight, bias = torch.rand(D, device=device), 1 + 0.1 * torch.randn(D, device=device), torch.randn(D, device=device)
    return [x, f, gamma, weight, bias, 1e-6, dtype]


def mlp_inputs(B, dtype, device, teacher=False):
    """The MLP at D = 768, hidden 4D, on B x 257 tokens: the student's (GELU tanh, forward +
    backward) or the teacher's fc1 + exact GELU (forward only)."""
    x = torch.randn(B, T, D, device=device, dtype=dtype)
    w1, b1 = torch.randn(4 * D, D, device=device, dtype=dtype) / D**0.5, torch.randn(4 * D, device=device, dtype=dtype)
    if teacher:
        return [x, w1, b1, "none"]
    w2 = torch.randn(D, 4 * D, device=device, dtype=dtype) / (4 * D)**0.5
    b2 = torch.randn(D, device=device, dtype=dtype)
    return [_leaf(x), _leaf(w1), _leaf(b1), _leaf(w2), _leaf(b2), "tanh"]


def repa_inputs(B, dtype, device):
    """The REPA cosine: the projector's bf16 output [B, T, D] and the online teacher's fp32 targets."""
    return [_leaf(torch.randn(B, T, D, device=device, dtype=dtype)), torch.randn(B, T, D, device=device)]


ACT = 2  # bytes per bf16 activation element
CASES = {
    # fwd: read x, write y; bwd: read dy and x, write dx  -> 5 passes over [B, T, D]
    "rmsnorm_modulate": Case("rmsnorm_modulate", rmsnorm_inputs, lambda B: 5 * B * T * D * ACT),
    # fwd: read x, f, write x_new, y; bwd: read dx_new, dy, x_new, f, write dx, df -> 10 passes
    "residual_rmsnorm_modulate": Case("residual_rmsnorm_modulate", residual_inputs, lambda B: 10 * B * T * D * ACT),
    # fwd: read x, write out; bwd: read dout, write dx -> 4 passes over [B, T, H, Dh]
    "apply_rope": Case("apply_rope", rope_inputs, lambda B: 4 * B * T * D * ACT),
    # fwd: read qkv (3) + v0 (1), write q, k, v (3); bwd: read dq, dk, dv, qkv, v0 (7), write dqkv, dv0 (4)
    "attention_prologue": Case("attention_prologue", prologue_inputs, lambda B: 18 * B * T * D * ACT),
    # routed: the same on K tokens, v0 gathered (read K rows) and d v0 over all T rows (zeroed + K written)
    "attention_prologue_routed": Case("attention_prologue_routed", lambda B, d, dev: prologue_inputs(B, d, dev, True),
                                      lambda B: (16 * B * K * D + B * T * D) * ACT),
    # fwd: read K rows, write K rows; bwd: zero T rows, write K rows, read K rows
    "gather_tokens": Case("gather_tokens", gather_inputs, lambda B: (4 * K + T) * B * D * ACT),
    # GEMMs: fwd x_enc W1 (T rows) + g W2 (K rows); bwd twice that
    "sprint_fuse": Case("sprint_fuse", fuse_inputs, lambda B: 0.0, lambda B: 3 * 2 * B * (T + K) * D * D),
    # the teacher's, forward only: read x (fp32) and f, write x_new (fp32) and y -> 12 bytes per element
    "residual_layer_norm": Case("residual_layer_norm", teacher_norm_inputs, lambda B: 12 * B * T * D),
    # fwd: read pred (bf16) and target (fp32); bwd: read both, write dpred -> 14 bytes per element
    "repa_cosine": Case("repa_cosine", repa_inputs, lambda B: 14 * B * T * D),
    # GEMM-bound: fc1 with GELU in its epilogue, fc2; backward: fc2's dgrad with GELU's derivative
    # and db1 in its epilogue, the three other GEMMs (6 GEMMs of 2 * B*T * D * 4D FLOPs)
    "gelu_mlp": Case("gelu_mlp", mlp_inputs, lambda B: 0.0, lambda B: 6 * 2 * B * T * D * 4 * D),
    # the teacher's fc1 + exact GELU, forward only
    "linear_gelu": Case("linear_gelu", lambda B, d, dev: mlp_inputs(B, d, dev, teacher=True), lambda B: 0.0,
                        lambda B: 2 * B * T * D * 4 * D),
}
# ops outside srdit.kernels.get_ops's set (the teacher's, the loss's): (eager twin's module, Triton's)
OTHER_OPS = {"residual_layer_norm": ("srdit.kernels.reference", "srdit.kernels.layernorm"),
             "linear_gelu": ("srdit.kernels.reference", "srdit.kernels.mlp"),
             "repa_cosine": ("srdit.kernels.reference", "srdit.kernels.repa_loss")}


def op_fn(kind: str, name: str):
    """The eager or Triton function an op of CASES times."""
    if name in OTHER_OPS:
        eager, fused = OTHER_OPS[name]
        return getattr(importlib.import_module(eager if kind == "eager" else fused), name)
    return getattr(get_ops(kind), "attention_prologue" if name.startswith("attention_prologue") else name)


# candidate GPU settings per kernel (a key of GPU_TILES), the default first; all within the register
# budget at D = 768 / Dh = 64 (bench/compile_check.py --tiles checks any of them)
SWEEP = {
    "rmsnorm_fwd": [Tile(2048), Tile(4096), Tile(4096, 8), Tile(8192, 8)],
    "rmsnorm_bwd": [Tile(1024), Tile(1024, 8), Tile(2048, 8)],
    "apply_rope": [Tile(4096), Tile(2048), Tile(8192, 8)],
    "attention_prologue_fwd": [Tile(1024), Tile(2048, 8), Tile(512)],
    "attention_prologue_bwd": [Tile(1024), Tile(2048, 8), Tile(512)],
    "gather_tokens": [Tile(4096), Tile(2048), Tile(8192, 8)],
    "sprint_fuse_fwd": [Tile(4096), Tile(2048), Tile(8192, 8)],
    "sprint_fuse_bwd": [Tile(2048), Tile(1024), Tile(4096, 8)],
    "layer_norm_fwd": [Tile(2048), Tile(1024), Tile(4096, 8)],
    "repa_cosine_fwd": [Tile(2048), Tile(4096)],  # 4096: <= 64 registers forward, <= 104 backward
    "repa_cosine_bwd": [Tile(2048), Tile(4096)],
}
SWEPT_BY = {  # the op of CASES whose forward + backward times a kernel
    "rmsnorm_fwd": "residual_rmsnorm_modulate", "rmsnorm_bwd": "residual_rmsnorm_modulate", "apply_rope": "apply_rope",
    "attention_prologue_fwd": "attention_prologue", "attention_prologue_bwd": "attention_prologue",
    "gather_tokens": "gather_tokens", "sprint_fuse_fwd": "sprint_fuse", "sprint_fuse_bwd": "sprint_fuse",
    "layer_norm_fwd": "residual_layer_norm", "repa_cosine_fwd": "repa_cosine", "repa_cosine_bwd": "repa_cosine",
}
# the GEMM's candidates (bf16; GEMM_TILES, the default first), timed through the student's MLP; each
# within compile_check's GEMM budget (--tiles gemm_act_fwd=BMxBNxBK:WARPS:STAGES checks one): at
# most 158 registers, no spills, 96-128 KiB of shared memory on sm_90a and sm_100a
GEMM_SWEEP = {
    "gemm_act_fwd": [GEMM_TILES["gemm_act_fwd"], GemmTile(128, 128, 64, warps=8, stages=4),
                     GemmTile(64, 128, 64, warps=4, stages=4), GemmTile(128, 64, 64, warps=4, stages=4)],
    "gemm_act_bwd": [GEMM_TILES["gemm_act_bwd"], GemmTile(128, 128, 64, warps=8, stages=4),
                     GemmTile(64, 128, 64, warps=4, stages=4), GemmTile(128, 64, 64, warps=4, stages=4)],
}
GEMM_SWEPT_BY = {"gemm_act_fwd": "gelu_mlp", "gemm_act_bwd": "gelu_mlp"}


def _tile_name(tile) -> int | str:
    """A row tile's elements, or a GEMM tile as BMxBNxBK/STAGES (sweep rows, RESULTS.md)."""
    if isinstance(tile, GemmTile):
        return f"{tile.block_m}x{tile.block_n}x{tile.block_k}/{tile.stages}"
    return tile.elements


def sweep(ops, batches, dtype, device, iters) -> list[dict]:
    """Forward + backward ms of the Triton op of each kernel with every candidate of SWEEP (and
    GEMM_SWEEP) in turn (the other kernels at their defaults), against the default."""
    rows = []
    plans = [(kernel, candidates, SWEPT_BY[kernel], GPU_TILES) for kernel, candidates in SWEEP.items()]
    plans += [(kernel, candidates, GEMM_SWEPT_BY[kernel], GEMM_TILES) for kernel, candidates in GEMM_SWEEP.items()]
    for kernel, candidates, name, tiles in plans:
        if name not in ops:
            continue
        case = CASES[name]
        fn = op_fn("triton", name)
        default = tiles[kernel]
        for B in batches:
            inputs = case.make(B, dtype, device)
            base = None
            for tile in candidates:
                tiles[kernel] = tile
                row = {"kernel": kernel, "op": name, "batch": B, "elements": _tile_name(tile), "warps": tile.warps}
                try:
                    ms, iqr = time_ms(fwd_bwd(fn, inputs), device, iters=iters)
                except Exception as error:  # report, keep sweeping
                    rows.append({**row, "error": f"{type(error).__name__}: {error}"[:200]})
                    continue
                finally:
                    tiles[kernel] = default
                base = ms if tile == default else base
                rows.append({**row, "default": tile == default, "ms": ms, "iqr_ms": iqr,
                             "vs_default": base / ms if base else float("nan")})
    return rows


def fwd_bwd(fn, inputs):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        out = fn(*inputs)
        if not leaves:  # a forward-only op (the frozen teacher's)
            return
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
        torch.autograd.grad(loss, leaves, allow_unused=True)

    return run


ATTENTION_BACKENDS = ("sdpa", "cudnn", "flash", "fa3", "fa4", "xformers")


def attention_rows(batches, dtype, device, iters: int, peak_tflops: float) -> list[dict]:
    """Forward + backward of each attention backend at the step's shapes, [B, 12, 257, 64] (dense
    blocks) and [B, 12, 64, 64] (routed): what model.attention_backend=auto chooses between. A
    backend that is not installed (or not usable here) is a row with its error."""
    from srdit.kernels.attention import backend_fn

    rows = []
    for B in batches:
        for tokens in (T, K):
            flops = 3.5 * 4 * B * H * tokens * tokens * DH  # fwd 2 GEMMs, bwd 5 (FlashAttention's count)
            inputs = [torch.randn(B, H, tokens, DH, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]
            for backend in ATTENTION_BACKENDS:
                row = {"op": f"attention_{tokens}", "batch": B, "variant": backend}
                try:
                    ms, iqr = time_ms(fwd_bwd(backend_fn(backend), inputs), device, iters=iters)
                except Exception as error:  # missing package, unsupported shape: reported, not fatal
                    rows.append({**row, "error": f"{type(error).__name__}: {error}"[:200]})
                    continue
                rows.append({**row, "ms": ms, "iqr_ms": iqr, "tflops": flops / (ms * 1e-3) / 1e12,
                             "of_matmul_peak": flops / (ms * 1e-3) / 1e12 / peak_tflops})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--ops", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--variants", nargs="+", default=["eager", "triton", "compile"],
                        choices=["eager", "triton", "compile"], help="triton runs on a GPU only")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time SWEEP's candidate launch settings")
    parser.add_argument("--sweep-batch", type=int, nargs="+", default=None, help="batches of the sweep (default --batch)")
    parser.add_argument("--attention", action="store_true",
                        help="also time every attention backend at the step's shapes (rows attention_257/_64)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kinds = ["eager"] + (["triton"] if device.type == "cuda" and "triton" in args.variants else [])
    env = environment(device)
    copy_gbps, peak_tflops = copy_bandwidth_gbps(device), matmul_tflops(device)
    print(f"{env['device_name']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    print(f"measured copy bandwidth {copy_gbps:.0f} GB/s, bf16 matmul {peak_tflops:.0f} TFLOP/s")
    rows, sweep_rows = [], []

    def save(quiet=True):  # after every op: a run cut short (gpu_check.sh's timeout) keeps what it measured
        write_json(args.json, {**env, "copy_gbps": copy_gbps, "matmul_tflops": peak_tflops, "dtype": str(dtype),
                               "rows": rows, "sweep": sweep_rows}, quiet=quiet)

    for B in args.batch:
        for name in args.ops:
            case = CASES[name]
            timings = {}
            fns = {kind: op_fn(kind, name) for kind in kinds if kind in args.variants}
            if "compile" in args.variants:
                fns["compile"] = torch.compile(op_fn("eager", name))
            for variant, fn in fns.items():
                inputs = case.make(B, dtype, device)
                try:
                    ms, iqr = time_ms(fwd_bwd(fn, inputs), device, iters=args.iters)
                except Exception as error:  # report, keep benchmarking the others
                    rows.append({"op": name, "batch": B, "variant": variant, "error": f"{type(error).__name__}: {error}"[:200]})
                    continue
                timings[variant] = ms
                row = {"op": name, "batch": B, "variant": variant, "ms": ms, "iqr_ms": iqr}
                if case.bytes_fn(B):
                    row["gb_per_s"] = case.bytes_fn(B) / (ms * 1e-3) / 1e9
                    row["of_copy_bw"] = row["gb_per_s"] / copy_gbps
                if case.flops_fn(B):
                    row["tflops"] = case.flops_fn(B) / (ms * 1e-3) / 1e12
                    row["of_matmul_peak"] = row["tflops"] / peak_tflops
                rows.append(row)
            for row in rows[-len(fns):]:
                if "ms" in row:
                    row["vs_eager"] = timings.get("eager", float("nan")) / row["ms"]
                    row["vs_compile"] = timings.get("compile", float("nan")) / row["ms"]
            save()
    if args.attention:
        rows += attention_rows(args.batch, dtype, device, args.iters, peak_tflops)
        save()
    print(table(rows, ["op", "batch", "variant", "ms", "iqr_ms", "gb_per_s", "of_copy_bw", "tflops",
                       "vs_eager", "vs_compile", "error"]))
    if args.sweep:
        sweep_rows += sweep(args.ops, args.sweep_batch or args.batch, dtype, device, args.iters)
        print(table(sweep_rows, ["kernel", "op", "batch", "elements", "warps", "default", "ms", "iqr_ms", "vs_default",
                                 "error"]))
    save(quiet=False)


if __name__ == "__main__":
    main()

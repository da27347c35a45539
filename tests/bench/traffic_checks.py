"""Checks of bench/traffic.py's counter, run as a script by tests/bench/test_traffic.py: the
counter intercepts compiled Triton launches, so it needs a process without TRITON_INTERPRET.
Prints one JSON object: check name -> what was counted and what it should be."""
import json
import math
import os
import sys

assert "TRITON_INTERPRET" not in os.environ, "run without TRITON_INTERPRET (compiled kernels are intercepted)"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # run as a script (test_traffic.py): the repository root, for bench.traffic

import torch  # noqa: E402

from bench import traffic  # noqa: E402

out = {}


def counted(fn, model=None):
    counter = traffic.Counter()
    with counter.counting(model or torch.nn.Identity()):
        fn()
    return counter.ops


def by_name(ops, name):
    found = [o for o in ops if o.name == name]
    assert found, (name, [o.name for o in ops])
    return found


# ---------------------------------------------------------------- aten ops: bytes, launches, FLOPs
a, b = torch.randn(64, 32), torch.randn(32, 16)
ops = counted(lambda: (a + 1, a.t(), a.view(32, 64), a[:, :8], a @ b))
out["add"] = [by_name(ops, "add.Tensor")[0].bytes, 2 * 64 * 32 * 4]
out["views_free"] = [sum(o.launches for o in ops if o.name in ("t", "view", "slice.Tensor")), 0]
out["mm"] = [[by_name(ops, "mm")[0].bytes, by_name(ops, "mm")[0].flops],
             [(64 * 32 + 32 * 16 + 64 * 16) * 4, 2 * 64 * 32 * 16]]
dst, src = torch.empty(64, 32, dtype=torch.bfloat16), torch.randn(64, 32)
ops = counted(lambda: (dst.copy_(src), a.add_(1.0), a + torch.ones(32).expand(64, 32)))
out["copy_"] = [by_name(ops, "copy_")[0].bytes, 64 * 32 * (4 + 2)]  # the destination is not read
out["in_place"] = [by_name(ops, "add_.Tensor")[0].bytes, 2 * 64 * 32 * 4]
out["broadcast_read_once"] = [by_name(ops, "add.Tensor")[0].bytes, (64 * 32 * 2 + 32) * 4]

# ---------------------------------------------------------------- multi-tensor ops
params = [torch.randn(n) for n in (10, 70_000, 3)]
scale = torch.tensor(0.5)
ops = counted(lambda: (torch._foreach_mul_(params, scale), torch._foreach_mul_(params, [scale] * 3),
                       torch._foreach_norm(params)))
out["foreach_fast"] = [by_name(ops, "_foreach_mul_.Tensor")[0].launches, 1]
out["foreach_per_tensor"] = [by_name(ops, "_foreach_mul_.List")[0].launches, 3]  # 0-dim weights: slow route
out["foreach_norm"] = [by_name(ops, "_foreach_norm.Scalar")[0].launches, 2]  # + the finishing kernel
out["launches_closed_form"] = [
    [traffic.multi_tensor_launches([1] * 110, 1), traffic.multi_tensor_launches([1] * 111, 1),
     traffic.multi_tensor_launches([65536 * 320], 1), traffic.multi_tensor_launches([65536 * 320 + 1], 1),
     traffic.multi_tensor_launches([1] * 37, 4)],
    [1, 2, 1, 2, 2]]

# ---------------------------------------------------------------- fused ops: the docstrings' formulas
from srdit.kernels import sprint  # noqa: E402
from srdit.kernels.attention_prologue import attention_prologue  # noqa: E402
from srdit.kernels.rmsnorm import residual_rmsnorm_modulate, rmsnorm_modulate  # noqa: E402
from srdit.kernels.rope import apply_rope  # noqa: E402

bf, f32 = torch.bfloat16, torch.float32
B, N, T, H, Dh = 3, 10, 17, 4, 16
D = H * Dh
R = B * N
s, c = 2, 4  # bf16 activations, fp32 compute
x, f = torch.randn(B, N, D, dtype=bf), torch.randn(B, N, D, dtype=bf)
shift, scale_, gate = (torch.randn(B, D, dtype=bf) for _ in range(3))
w = torch.randn(D)
ops = counted(lambda: rmsnorm_modulate(x, shift, scale_, w))
# rmsnorm.py: fwd read R*D*s + 2*B*D*sm + D*sw; write R*D*s + R*c
out["rmsnorm_modulate_fwd"] = [by_name(ops, "_rmsnorm_modulate_fwd_kernel")[0].bytes,
                               R * D * s + 2 * B * D * s + D * 4 + R * D * s + R * c]
ops = counted(lambda: residual_rmsnorm_modulate(x, gate, f, shift, scale_, w))
# fwd read 2*R*D*s + 3*B*D*sm + D*sw; write 2*R*D*s + R*c
out["residual_rmsnorm_modulate_fwd"] = [by_name(ops, "_rmsnorm_modulate_fwd_kernel")[0].bytes,
                                        2 * R * D * s + 3 * B * D * s + D * 4 + 2 * R * D * s + R * c]
x32 = x.float()
with torch.autocast("cpu", dtype=bf):  # fp32 stream: x_new in fp32 (4 bytes), y in the GEMM's bf16 (sy = 2)
    ops = counted(lambda: residual_rmsnorm_modulate(x32, gate, f, shift, scale_, w))
out["residual_rmsnorm_modulate_fwd_autocast"] = [by_name(ops, "_rmsnorm_modulate_fwd_kernel")[0].bytes,
                                                 R * D * (4 + s) + 3 * B * D * s + D * 4 + R * D * (4 + s) + R * c]

P = 8
cos, sin = torch.randn(P, Dh), torch.randn(P, Dh)
ids = torch.randint(-1, P, (B, N))
xr = torch.randn(B, N, H, Dh, dtype=bf, requires_grad=True)
ops = counted(lambda: apply_rope(xr, cos, sin, ids).sum().backward())
# rope.py: read x M*e, write M*e, ids 8T, the tables (counted once: their rows are shared)
M, tables = B * N * H * Dh, 2 * P * Dh * 4
out["apply_rope_fwd"] = [by_name(ops, "_apply_rope_fwd_kernel")[0].bytes, 2 * M * 2 + 8 * R + tables]
out["apply_rope_bwd"] = [by_name(ops, "_apply_rope_bwd_kernel")[0].bytes, 2 * M * 2 + 8 * R + tables]

K = 5
xt = torch.randn(B, T, D, dtype=bf, requires_grad=True)
keep = torch.stack([torch.randperm(T)[:K] for _ in range(B)])
ops = counted(lambda: sprint.gather_tokens(xt, keep).sum().backward())
# sprint.py: fwd read M*F + write M*F (+ 8 bytes per id); bwd (after its memset) read M*F, write M*F
out["gather_tokens_fwd"] = [by_name(ops, "_gather_tokens_fwd_kernel")[0].bytes, 2 * B * K * D * s + 8 * B * K]
out["gather_tokens_bwd"] = [by_name(ops, "_gather_tokens_bwd_kernel")[0].bytes, 2 * B * K * D * s + 8 * B * K]

qkv = torch.randn(B, K, 3 * D, dtype=bf)
v0 = torch.randn(B, T, H, Dh, dtype=bf)
qw, kw, lam = torch.randn(Dh), torch.randn(Dh), torch.tensor(0.5)
rope_ids = torch.randint(0, P, (B, K))
ops = counted(lambda: attention_prologue(qkv, H, qw, kw, cos, sin, rope_ids, v0, keep, lam))
# attention_prologue.py, forward: reads qkv 6, v0 2 (at the kept rows), writes q, k, v 6 bytes per
# token per D; plus the ids, the norm weights, lambda and the tables
tokens = B * K
out["attention_prologue_fwd"] = [by_name(ops, "_attention_prologue_fwd_kernel")[0].bytes,
                                 tokens * D * (6 + 2 + 6) + 2 * 8 * tokens + 2 * Dh * 4 + 4 + tables]

from srdit.kernels.layernorm import layer_norm, residual_layer_norm  # noqa: E402

xs, gamma, bias = torch.randn(B, N, D), torch.randn(D), torch.randn(D)  # the teacher's fp32 stream and params
with torch.no_grad():  # forward only; f and y in the GEMMs' bf16
    ops = counted(lambda: (layer_norm(xs, w, bias, 1e-6, bf), residual_layer_norm(xs, f, gamma, w, bias, 1e-6, bf)))
plain, residual = by_name(ops, "_layer_norm_fwd_kernel")
# layernorm.py: layer_norm read R*D*s + 2*D*4, write R*D*so; residual_layer_norm read R*D*(s + sf) + 3*D*4,
# write R*D*(s + so); here s = 4, sf = so = 2
out["layer_norm_fwd"] = [plain.bytes, R * D * 4 + 2 * D * 4 + R * D * s]
out["residual_layer_norm_fwd"] = [residual.bytes, R * D * (4 + s) + 3 * D * 4 + R * D * (4 + s)]

from srdit.kernels.mlp import gelu_mlp, linear_gelu  # noqa: E402
from srdit.kernels.triton_utils import GEMM_TILES  # noqa: E402

Hd, Do = 4 * D, D  # the MLP's hidden and output widths
w1, b1 = torch.randn(Hd, D, dtype=bf), torch.randn(Hd, dtype=bf)
w2, b2 = torch.randn(Do, Hd, dtype=bf), torch.randn(Do, dtype=bf)
with torch.no_grad():
    ops = counted(lambda: linear_gelu(x, w1, b1))
# mlp.py: forward GEMM read (M*K + Hd*K + Hd)*s, write M*Hd*s (g), + M*Hd*s (h, for autograd);
# backward GEMM read (M*D + D*Hd + M*Hd)*s, write M*Hd*s + P*Hd*c
gemm_in = (R * D + Hd * D + Hd) * s
out["linear_gelu_fwd"] = [by_name(ops, "_gemm_act_kernel")[0].bytes, gemm_in + R * Hd * s]
xg = x.clone().requires_grad_()
ops = counted(lambda: gelu_mlp(xg, w1, b1, w2, b2).sum().backward())
forward_gemm, backward_gemm = by_name(ops, "_gemm_act_kernel")
P = -(-R // GEMM_TILES["gemm_act_bwd"].block_m)
out["gelu_mlp_fwd_gemm"] = [forward_gemm.bytes, gemm_in + 2 * R * Hd * s]
out["gelu_mlp_bwd_gemm"] = [backward_gemm.bytes, (R * Do + Do * Hd + R * Hd) * s + R * Hd * s + P * Hd * c]
out["gelu_mlp_gemm_flops"] = [[forward_gemm.flops, backward_gemm.flops], [2 * R * D * Hd, 2 * R * Do * Hd]]

from srdit.kernels.repa_loss import repa_cosine  # noqa: E402

pred, target = torch.randn(B, N, D, dtype=bf, requires_grad=True), torch.randn(B, N, D)
ops = counted(lambda: repa_cosine(pred, target).sum().backward())
# repa_loss.py: forward read R*d*(sp + sq), write R*c; backward read R*d*(sp + sq) + R*c, write R*d*sp
out["repa_cosine_fwd"] = [by_name(ops, "_repa_cosine_fwd_kernel")[0].bytes, R * D * (s + 4) + R * c]
out["repa_cosine_bwd"] = [by_name(ops, "_repa_cosine_bwd_kernel")[0].bytes, R * D * (s + 4) + R * c + R * D * s]
ops = counted(lambda: torch.promote_types(torch.bfloat16, torch.float32))
out["no_tensor_no_launch"] = [sum(o.launches for o in ops), 0]

# ---------------------------------------------------------------- split launches at the counted batch
# The norm backward's partial-sum rows saturate with the batch (split_launch: about 4 programs per
# SM in all): counted at small batches with the target's launch, they extrapolate to the target.
from srdit.kernels.rmsnorm import _launch_bwd  # noqa: E402


def norm_bwd_bytes(batch, launch_batch=None):
    n, d = 512, 64  # 16 rows per tile at the GPU settings: 32 tiles per sample, 8 programs at batch 64
    x, dy, scale_ = torch.randn(batch, n, d), torch.randn(batch, n, d, dtype=bf), torch.randn(batch, d)
    rstd = torch.ones(batch * n)
    with traffic.split_launches_of(batch, launch_batch or batch):
        return sum(o.bytes for o in counted(lambda: _launch_bwd(dy, x, rstd, scale_, None)))


def on_the_line(b1, b2, target, launch_batch):
    y1, y2 = norm_bwd_bytes(b1, launch_batch), norm_bwd_bytes(b2, launch_batch)
    return y1 + (y2 - y1) * (target - b1) / (b2 - b1)


out["split_launch_at_the_counted_batch"] = [on_the_line(2, 4, 64, 64), norm_bwd_bytes(64)]
out["split_launch_saturates"] = [on_the_line(2, 4, 64, None) > 1.05 * norm_bwd_bytes(64), True]

print(json.dumps(out))

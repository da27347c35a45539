"""The GELU MLP with GELU and the first bias inside GEMM epilogues: one Triton GEMM computes the
first Linear and its GELU, and in backward one computes the second Linear's input gradient, GELU's
derivative and the first bias's gradient; the other GEMMs stay cuBLAS's.

Math (rows m of x [M, K]; w1 [Hd, K], b1 [Hd]; w2 [D, Hd], b2 [D]; act = GELU, exact (erf) or
its tanh approximation, `approximate` as torch's):
    h  = x @ w1^T + b1          stored in the GEMM dtype, as addmm stores it
    g  = act(h)                 computed from the stored h, stored (as the unfused gelu does)
    y  = g @ w2^T + b2          cuBLAS (addmm)
Backward, dy [M, D]:
    dg  = dy @ w2               rounded to the GEMM dtype, as mm stores it
    dh  = dg * act'(h)          stored; act' as torch's gelu_backward
    db1 = sum_m dh              per-block partial sums [M / block_m, Hd] in the compute dtype,
                                summed by torch (deterministic)
    dw1 = dh^T @ x,  dx = dh @ w1,  dw2 = dy^T @ g,  db2 = sum_m dy     cuBLAS / torch
linear_gelu(x, w, b) is the forward's first half alone (the frozen DINOv2 teacher's fc1, exact
GELU, no autograd: it refuses a call that needs a gradient).

Precision: the GEMMs accumulate in the compute dtype (fp32; fp64 for fp64 inputs, so gradcheck
runs the same kernel), fp32 operands exactly (input_precision "ieee", torch's default without
TF32; under the interpreter, whose bf16 dot is wrong, bf16 operands too, upcast: their products
are exact in fp32, so this is the GPU's bf16 dot up to summation order); h, g, dg and dh are
rounded once each from the compute dtype, to nearest (round_to), at the points where the unfused
ops store them, so the fused op differs from the eager one only in the GEMMs' summation order.
Under autocast every operand is cast to the autocast dtype first (what F.linear does), so y, h,
g come out in it.

Bytes per call (M rows, s bytes per element of the GEMM dtype, c = 4 of the compute dtype, P =
ceil(M / block_m) partial rows; the operand tiles are read once per output block, from L2 after
the first: counted once):
    linear_gelu / forward GEMM  read (M*K + Hd*K + Hd)*s;  write M*Hd*s (g), + M*Hd*s (h, for autograd)
    backward GEMM               read (M*D + D*Hd + M*Hd)*s;  write M*Hd*s + P*Hd*c
against the unfused addmm + gelu (gelu reads and writes M*Hd*s more) and mm + gelu_backward +
the bias's sum (3*M*Hd*s more). The cuBLAS GEMMs and torch's sums around them count as themselves.

Design notes (why these epilogues, why cuBLAS for the rest): docs/kernels.md "The GELU MLP".
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from srdit.kernels.autocast import gemm_operands
from srdit.kernels.triton_utils import compute_dtype, empty_output, forward_only, gemm_launch, index_dtype, \
    interpreting, round_to, tl_compute_dtype

Tensor = torch.Tensor

APPROXIMATIONS = ("none", "tanh")  # torch's F.gelu(approximate=...)
# GELU's constants, as torch's kernels spell them (constexpr: a jitted function reads no other global)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
TANH_CUBIC = tl.constexpr(0.044715)
SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _tanh(u):
    """tanh from exp (libdevice's tanh is not in the interpreter), as (1 - t) / (1 + t) with
    t = exp(-2|u|) in (0, 1]: no overflow, +-1 in the limits, within a few ulps elsewhere."""
    t = tl.exp(-2.0 * tl.abs(u))
    magnitude = (1.0 - t) / (1.0 + t)
    return tl.where(u < 0, -magnitude, magnitude)


@triton.jit
def _gelu(h, TANH: tl.constexpr):
    """torch's gelu of h in its compute dtype (TANH: approximate="tanh"). The module's constants
    stand right of a tensor: the interpreter cannot multiply constexpr * tensor."""
    if TANH:
        return h * 0.5 * (1.0 + _tanh((h + h * h * h * TANH_CUBIC) * SQRT_2_OVER_PI))
    else:
        return h * 0.5 * (1.0 + tl.math.erf(h * SQRT1_2))


@triton.jit
def _gelu_grad(h, TANH: tl.constexpr):
    """d gelu / dh, as torch's gelu_backward computes it."""
    if TANH:
        h2 = h * h
        t = _tanh((h + h2 * h * TANH_CUBIC) * SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + h * 0.5 * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + h2 * (3.0 * TANH_CUBIC))
    else:
        return 0.5 * (1.0 + tl.math.erf(h * SQRT1_2)) + h * INV_SQRT_2PI * tl.exp(h * h * -0.5)


@triton.jit(do_not_specialize=["M"])  # batch-dependent: one compile for every batch
def _gemm_act_kernel(
    a_ptr, b_ptr, bias_ptr, h_ptr,  # inputs: a [M,K]; b [K,N] (strided: w^T or w); bias [N]; h [M,N] (backward)
    out_ptr, h_out_ptr, dbias_part_ptr,  # outputs: out [M,N]; h [M,N] (forward, WRITE_H); partial sums [P,N]
    M, N, K, stride_a_m, stride_b_k, stride_b_n,
    BACKWARD: tl.constexpr, TANH: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # output blocks in groups of GROUP_M block rows, column by column: a group's operand tiles
    # stay in L2 while it runs
    pid = tl.program_id(0)
    m_blocks = tl.cdiv(M, BLOCK_M)
    n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_blocks
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = pid_m.to(INDEX) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    ks = tl.arange(0, BLOCK_K)
    # out-of-range rows and columns read a valid row (the modulo) and are never stored: no mask
    # in the K loop but K's own
    a_ptrs = a_ptr + (rows % M)[:, None] * stride_a_m + ks[None, :]
    b_ptrs = b_ptr + ks[:, None] * stride_b_k + (cols % N)[None, :] * stride_b_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_mask = ks < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=COMPUTE)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=COMPUTE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_b_k
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    offs = rows[:, None] * N + cols[None, :]  # [BLOCK_M, BLOCK_N] of the contiguous [M, N] outputs
    if BACKWARD:
        dg = round_to(acc, out_ptr.dtype.element_ty).to(COMPUTE)  # as mm stores dy @ w2
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        dh = round_to(dg * _gelu_grad(h, TANH), out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, dh, mask=mask)
        part = tl.sum(tl.where(mask, dh.to(COMPUTE), 0.0), axis=0)  # [BLOCK_N]: this block's rows of db1
        tl.store(dbias_part_ptr + pid_m.to(INDEX) * N + cols, part, mask=col_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)[None, :]
        h = round_to(acc, out_ptr.dtype.element_ty)  # as addmm stores x @ w^T + b
        if WRITE_H:
            tl.store(h_out_ptr + offs, h, mask=mask)
        tl.store(out_ptr + offs, round_to(_gelu(h.to(COMPUTE), TANH), out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host launchers


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands multiplied exactly (torch's default matmul, no TF32); low precision as is."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _check_approximate(approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate={approximate!r} is not one of {APPROXIMATIONS} (torch's F.gelu)")


def _launch(a, b, stride_b_k, stride_b_n, N, K, *, bias=None, h=None, write_h=False, approximate="none",
            alloc=empty_output):
    """out = act(a @ b + bias) (forward; with h_out when write_h) or, with h given, the backward
    epilogue: out = round(a @ b) * act'(h) and the bias-gradient partials. a [M, K] contiguous,
    b [K, N] given by its pointer tensor and strides. Returns (out, h_out or None, partials or None)."""
    _check_approximate(approximate)
    backward = h is not None
    M = a.shape[0]
    dtype = a.dtype
    out = alloc((M, N), dtype, a.device)
    h_out = alloc((M, N), dtype, a.device) if write_h else None
    if M == 0:
        return out, h_out, alloc((0, N), compute_dtype(dtype), a.device) if backward else None
    launch = gemm_launch(M, N, "gemm_act_bwd" if backward else "gemm_act_fwd", dtype)
    parts = alloc((launch.m_blocks, N), compute_dtype(dtype), a.device) if backward else None
    tile = launch.tile
    _gemm_act_kernel[launch.grid](
        a, b, bias if bias is not None else a, h if backward else a,
        out, h_out if write_h else out, parts if backward else out,
        M, N, K, a.stride(0), stride_b_k, stride_b_n,
        BACKWARD=backward, TANH=approximate == "tanh", HAS_BIAS=bias is not None, WRITE_H=write_h,
        EVEN_K=K % tile.block_k == 0, PRECISION=_dot_precision(dtype),
        UPCAST=interpreting() and dtype == torch.bfloat16, COMPUTE=tl_compute_dtype(dtype),
        INDEX=index_dtype(a, b, out, h), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        GROUP_M=tile.group_m, num_warps=tile.warps, num_stages=tile.stages,
    )
    return out, h_out, parts


def _check(x, w1, b1, w2=None, b2=None) -> None:
    """Shapes and dtypes the kernels assume (one dtype: the caller casts); launchers and fakes."""
    K = x.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != K:
        raise ValueError(f"gelu mlp: w1 must be [hidden, {K}], got {tuple(w1.shape)}")
    if b1 is not None and tuple(b1.shape) != (w1.shape[0],):
        raise ValueError(f"gelu mlp: b1 must be [{w1.shape[0]}], got {tuple(b1.shape)}")
    if w2 is not None and (w2.dim() != 2 or w2.shape[1] != w1.shape[0]):
        raise ValueError(f"gelu mlp: w2 must be [out, {w1.shape[0]}], got {tuple(w2.shape)}")
    if b2 is not None and tuple(b2.shape) != (w2.shape[0],):
        raise ValueError(f"gelu mlp: b2 must be [{w2.shape[0]}], got {tuple(b2.shape)}")
    dtypes = {t.dtype for t in (x, w1, b1, w2, b2) if t is not None}
    if len(dtypes) != 1:
        raise ValueError(f"gelu mlp: operands in one dtype (cast first), got {sorted(map(str, dtypes))}")


def _forward_gemm(x, w1, b1, approximate, write_h, alloc=empty_output):
    """(g, h or None) for x [..., K]: the first Linear and its GELU, one Triton GEMM."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w1 = w1.contiguous()
    # b = w1^T: [K, Hd] with strides (1, K)
    g, h, _ = _launch(x2, w1, 1, w1.stride(0), w1.shape[0], x2.shape[1], bias=b1, write_h=write_h,
                      approximate=approximate, alloc=alloc)
    shape = (*x.shape[:-1], w1.shape[0])
    return g.view(shape), (h.view(shape) if h is not None else None)


def _backward_gemm(dy, w2, h, approximate, alloc=empty_output):
    """(dh [M, Hd], db1 partials [P, Hd]) for dy [M, D] and h [M, Hd]: dy @ w2 with GELU's
    derivative at h in its epilogue."""
    w2 = w2.contiguous()
    dh, _, parts = _launch(dy, w2, w2.stride(0), 1, w2.shape[1], dy.shape[1], h=h, approximate=approximate,
                           alloc=alloc)
    return dh, parts


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("srdit::linear_gelu", mutates_args=())
def _linear_gelu_op(x: Tensor, weight: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    _check(x, weight, bias)
    return _forward_gemm(x, weight, bias, approximate, write_h=False)[0]


@_linear_gelu_op.register_fake
def _(x, weight, bias, approximate):
    _check(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("srdit::gelu_mlp", mutates_args=())
def _gelu_mlp_op(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, approximate: str
                 ) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, w1, b1, w2, b2)
    g, h = _forward_gemm(x, w1, b1, approximate, write_h=True)
    y = torch.addmm(b2, g.reshape(-1, g.shape[-1]), w2.t()).view(*x.shape[:-1], w2.shape[0])
    return y, h, g


@_gelu_mlp_op.register_fake
def _(x, w1, b1, w2, b2, approximate):
    _check(x, w1, b1, w2, b2)
    hidden = x.new_empty((*x.shape[:-1], w1.shape[0]))
    return x.new_empty((*x.shape[:-1], w2.shape[0])), hidden, torch.empty_like(hidden)


@torch.library.custom_op("srdit::gelu_mlp_bwd", mutates_args=())
def _gelu_mlp_bwd_op(dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, h: Tensor, g: Tensor, approximate: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
    x2, h2, g2 = (t.reshape(-1, t.shape[-1]) for t in (x, h, g))
    dh, parts = _backward_gemm(dy2, w2, h2.contiguous(), approximate)
    db1 = parts.sum(0).to(dh.dtype)
    dw2 = torch.mm(dy2.t(), g2)  # [D, Hd]
    db2 = dy2.sum(0)  # [D], in dy's dtype, as addmm's backward sums it
    dw1 = torch.mm(dh.t(), x2)  # [Hd, K]
    dx = torch.mm(dh, w1).view(x.shape)  # [..., K]
    return dx, dw1, db1, dw2, db2


@_gelu_mlp_bwd_op.register_fake
def _(dy, x, w1, w2, h, g, approximate):
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty(w1.shape[:1]), w2.new_empty(w2.shape),
            w2.new_empty(w2.shape[:1]))


def _setup(ctx, inputs, output):
    x, w1, _, w2, _, approximate = inputs
    _, h, g = output
    ctx.approximate = approximate
    ctx.save_for_backward(x, w1, w2, h, g)
    ctx.set_materialize_grads(False)  # h and g are outputs only to be saved: no zero gradients for them


def _backward(ctx, dy, _dh, _dg):
    x, w1, w2, h, g = ctx.saved_tensors
    if dy is None:  # y unused (not materialised as zeros: see _setup)
        return None, None, None, None, None, None
    dx, dw1, db1, dw2, db2 = torch.ops.srdit.gelu_mlp_bwd(dy, x, w1, w2, h, g, ctx.approximate)
    return dx, dw1, db1, dw2, db2, None


_gelu_mlp_op.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------- public functions


def gelu_mlp(x, w1, b1, w2, b2, approximate="tanh"):
    """fc2(gelu(fc1(x))) for x [..., K] with fc1 = (w1 [Hd, K], b1), fc2 = (w2 [D, Hd], b2):
    the student's MLP (SiT's GELU(tanh)), in autocast's dtype under autocast, else x's."""
    _check_approximate(approximate)
    x, w1, b1, w2, b2 = gemm_operands(x, w1, b1, w2, b2)
    return torch.ops.srdit.gelu_mlp(x, w1, b1, w2, b2, approximate)[0]


def linear_gelu(x, weight, bias, approximate="none"):
    """gelu(x @ weight^T + bias), forward only (the frozen teacher's fc1, exact GELU): a call that
    would need a gradient is refused, since the op has no backward."""
    _check_approximate(approximate)
    forward_only("linear_gelu", x, weight, bias)
    x, weight, bias = gemm_operands(x, weight, bias)
    return torch.ops.srdit.linear_gelu(x, weight, bias, approximate)

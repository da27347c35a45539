"""Attention prologue: qkv projection output -> q, k, v for SDPA, in one Triton kernel per direction.

Math (SPEC.md section 2, the release's order; the eager twin is reference.attention_prologue):
    q, k, v = split(qkv)                                  each [B,N,H,Dh]
    q = q * rsqrt(mean(q^2) + eps) * q_weight             QK-norm per head (if q_weight is given;
    k = k * rsqrt(mean(k^2) + eps) * k_weight             k_weight=None then means no k scale)
    v = lam * v0[b, v0_ids[b, n]] + (1 - lam) * v         value residual (if v0 is given)
    q, k = rope(q, rope_ids), rope(k, rope_ids)           2D RoPE (if cos is given; id < 0: none)
eps = reference.default_rms_eps(qkv.dtype) (torch's RMSNorm default). v0_ids=None means v0 is
indexed by the token itself (T == N). Backward, with g = gradient arriving on the output:
    dk, dq: transposed RoPE, then RMSNorm backward: xh = x * r, gw = g * w,
            dx = r * (gw - xh * mean(gw * xh)), dw = sum over rows and heads of g * xh
    dv:     d qkv_v = (1 - lam) g;  d v0[b, v0_ids] += lam * g;  dlam = sum g * (v0g - v_raw)

Shapes: qkv [B,N,3D] (unit last stride; D = H*Dh); weights [Dh]; cos/sin [P,Dh] fp32; rope_ids,
v0_ids [B,N] int (any strides); v0 [B,T,H,Dh] (any strides with a unit last stride, e.g. block
0's v_raw, a view of its qkv); lam a 0-dim tensor (read by the kernel: no host sync). v0_ids must
be unique within a sample (SPRINT's select_tokens guarantees it): each d v0 row is stored by one
writer, so duplicates would keep one contribution instead of their sum.
Returns q, k, v as [B,H,N,Dh] *views* of contiguous [B,N,H,Dh] tensors, like the reference, and
v_raw [B,N,H,Dh], the un-mixed v: with v0 given, a view of qkv exactly as in the reference; with
v0 None, v_raw is the kernel's v tensor itself and v its transposed view (v == v_raw), and
autograd adds the two incoming gradients before the backward kernel folds them into d qkv.
One kernel row is one (token, head) pair; a program handles the q, k and v parts of its rows.

Precision: loads are upcast to fp32 (fp64 for fp64 qkv) right after the load; norm statistics,
RoPE, the value mix and all reductions run there (RoPE's products each rounded before their
sum: no FMA, as the twin); q, k are rounded once to qkv's dtype. The value mix rounds as the
reference's under torch promotion: a 0-dim fp32 lam does not promote a bf16 v, so under bf16
(autocast or not) lam is rounded to v0's dtype, 1 - lam (computed in lam's) to v's, and
lam*v0, (1-lam)*v and their sum are each rounded to bf16 (docs/kernels.md "Rounding where the
twin rounds"). Backward: q/k weight gradients reduced in fp32 (fp64) per-program partials
[programs, Dh], summed by torch (deterministic); dlam likewise from [programs] partials.
d v0 = lam * g and d v = (1 - lam) * g with the rounded lam and 1 - lam of the forward, computed
in fp32 and stored once in v0's (qkv's) dtype: without v0_ids every element is written; with
v0_ids it is stored at the kept rows of a zeroed buffer. Saved for backward: the inputs only
(qkv, weights, tables, ids, v0, lam); rstd is recomputed from qkv, which the backward reads anyway.

Bytes per call, bf16 activations, in bytes per token per D (D = H*Dh; tables add 8*Dh/D ~ 0.7
per token if every head missed the cache, ids 16/D): forward reads qkv 6, v0 2, writes q, k, v
6: 12 (14 with the value residual). Backward reads dq, dk, dv 6 and the qkv parts it needs (q, k
4 with QK-norm, v 2 with the residual), v0 2, writes d qkv 6 and d v0 2: 16 without the
residual, 22 dense, 22 + 2T/N routed (zeroing d v0 [B,T,...]; 30 at 64 of 257 tokens). Block 0
(v0 None) also pays autograd's sum of the v and v_raw gradients (6).

Design notes (the output layout, stores instead of atomics, the tile, the eager twin's bytes):
docs/kernels.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from srdit.kernels.reference import default_rms_eps
from srdit.kernels.triton_utils import (absent_grad, compute_dtype, empty_output, head_rows, index_dtype,
                                        load_rope_tables, rms_normalize, rms_normalize_bwd, rotate_pairs, round_to,
                                        row_launch, tl_compute_dtype, unit_last_stride)

# --------------------------------------------------------------------------- kernels


@triton.jit
def _qk_norm_fwd(x, w_ptr, d, d_mask, Dh, eps, HAS_W: tl.constexpr):
    """QK-norm of rows x [ROWS, BLOCK_D]: rms_normalize(x) * w (padded lanes hold 0 and stay 0)."""
    y, _ = rms_normalize(x, Dh, eps)
    if HAS_W:
        y = y * tl.load(w_ptr + d, mask=d_mask, other=0.0).to(x.dtype)[None, :]
    return y


@triton.jit
def _qk_norm_bwd(x, g, w_ptr, d, d_mask, Dh, eps, HAS_W: tl.constexpr):
    """QK-norm backward of rows x [ROWS, BLOCK_D] given dL/dy g: returns (dx, dw partial [BLOCK_D]);
    rstd is recomputed from x."""
    xh, rstd = rms_normalize(x, Dh, eps)
    dw = tl.sum(g * xh, axis=0)
    if HAS_W:
        g = g * tl.load(w_ptr + d, mask=d_mask, other=0.0).to(x.dtype)[None, :]
    return rms_normalize_bwd(g, xh, rstd, Dh), dw


@triton.jit
def _load_v0(v0_ptr, v0_ids_ptr, lam_ptr, b, n, h, d, row_mask, mask, stride_v0_ids_b, stride_v0_ids_n,
             stride_v0_b, stride_v0_t, stride_v0_h, HAS_V0_IDS: tl.constexpr, COMPUTE: tl.constexpr):
    """lam, the v0 token index t of each row (v0_ids[b, n] when routed, else n) and v0 at it."""
    lam = tl.load(lam_ptr).to(COMPUTE)
    if HAS_V0_IDS:
        t = tl.load(v0_ids_ptr + b * stride_v0_ids_b + n * stride_v0_ids_n, mask=row_mask, other=0).to(n.dtype)
    else:
        t = n
    v0 = tl.load(v0_ptr + (b * stride_v0_b + t * stride_v0_t + h * stride_v0_h)[:, None] + d[None, :],
                 mask=mask, other=0.0).to(COMPUTE)
    return lam, t, v0


@triton.jit
def _mix_weights(lam, LAM: tl.constexpr, V0: tl.constexpr, V: tl.constexpr):
    """The value mix's weights as the eager `lam * v0 + (1.0 - lam) * v` applies them: a 0-dim lam
    takes the dtype of the tensor it multiplies, so it is rounded to v0's dtype V0 (bf16 under
    autocast), and 1 - lam, computed in lam's dtype LAM, to v's V; returned in lam's compute dtype."""
    return round_to(lam, V0).to(lam.dtype), round_to(round_to(1.0 - lam, LAM).to(lam.dtype), V).to(lam.dtype)


@triton.jit(do_not_specialize=["n_rows"])  # batch-dependent: one compile for every batch
def _attention_prologue_fwd_kernel(
    qkv_ptr, q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, ids_ptr, v0_ptr, v0_ids_ptr, lam_ptr,
    n_rows, N, H, Dh, eps,
    stride_qkv_b, stride_qkv_n, stride_ids_b, stride_ids_n, stride_cos_p,
    stride_v0_b, stride_v0_t, stride_v0_h, stride_v0_ids_b, stride_v0_ids_n,
    HAS_NORM: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, HAS_ROPE: tl.constexpr,
    HAS_V0: tl.constexpr, HAS_V0_IDS: tl.constexpr,
    COMPUTE: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r, d, row_mask, d_mask, mask, b, n, h = head_rows(n_rows, N, H, Dh, INDEX, ROWS, BLOCK_D)
    D = H * Dh
    x_offs = (b * stride_qkv_b + n * stride_qkv_n + h * Dh)[:, None] + d[None, :]  # q part of qkv
    out_offs = r[:, None] * Dh + d[None, :]  # contiguous [B,N,H,Dh]
    out_ty = q_ptr.dtype.element_ty

    q = tl.load(qkv_ptr + x_offs, mask=mask, other=0.0).to(COMPUTE)
    k = tl.load(qkv_ptr + x_offs + D, mask=mask, other=0.0).to(COMPUTE)
    if HAS_NORM:
        q = _qk_norm_fwd(q, qw_ptr, d, d_mask, Dh, eps, HAS_QW)
        k = _qk_norm_fwd(k, kw_ptr, d, d_mask, Dh, eps, HAS_KW)
    if HAS_ROPE:
        c, s = load_rope_tables(cos_ptr, sin_ptr, ids_ptr, b, n, stride_ids_b, stride_ids_n, stride_cos_p, d,
                                row_mask, d_mask, COMPUTE)
        q = rotate_pairs(q, c, s, ROWS, BLOCK_D, False)
        k = rotate_pairs(k, c, s, ROWS, BLOCK_D, False)
    tl.store(q_ptr + out_offs, round_to(q, out_ty), mask=mask)
    tl.store(k_ptr + out_offs, round_to(k, out_ty), mask=mask)

    v = tl.load(qkv_ptr + x_offs + 2 * D, mask=mask, other=0.0).to(COMPUTE)
    if HAS_V0:
        lam, t, v0 = _load_v0(v0_ptr, v0_ids_ptr, lam_ptr, b, n, h, d, row_mask, mask, stride_v0_ids_b,
                              stride_v0_ids_n, stride_v0_b, stride_v0_t, stride_v0_h, HAS_V0_IDS, COMPUTE)
        v0_ty = v0_ptr.dtype.element_ty
        lam_v0, lam_v = _mix_weights(lam, lam_ptr.dtype.element_ty, v0_ty, out_ty)
        # each product rounded to its tensor's dtype, the sum once (in fp32, then to the output)
        v = round_to(lam_v0 * v0, v0_ty).to(COMPUTE) + round_to(lam_v * v, out_ty).to(COMPUTE)
    tl.store(v_ptr + out_offs, round_to(v, out_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _attention_prologue_bwd_kernel(
    dq_ptr, dk_ptr, dv_ptr, qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, ids_ptr, v0_ptr, v0_ids_ptr, lam_ptr,
    dqkv_ptr, dqw_part_ptr, dkw_part_ptr, dv0_ptr, dlam_part_ptr,
    n_rows, N, H, Dh, eps,
    stride_dq_b, stride_dq_n, stride_dq_h, stride_dk_b, stride_dk_n, stride_dk_h, stride_dv_b, stride_dv_n, stride_dv_h,
    stride_qkv_b, stride_qkv_n, stride_ids_b, stride_ids_n, stride_cos_p,
    stride_v0_b, stride_v0_t, stride_v0_h, stride_v0_ids_b, stride_v0_ids_n, stride_dv0_b, stride_dv0_t, stride_dv0_h,
    HAS_NORM: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, HAS_ROPE: tl.constexpr,
    HAS_V0: tl.constexpr, HAS_V0_IDS: tl.constexpr,
    COMPUTE: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r, d, row_mask, d_mask, mask, b, n, h = head_rows(n_rows, N, H, Dh, INDEX, ROWS, BLOCK_D)
    token = b * N + n
    D = H * Dh
    x_offs = (b * stride_qkv_b + n * stride_qkv_n + h * Dh)[:, None] + d[None, :]
    dx_offs = (token * 3 * D + h * Dh)[:, None] + d[None, :]  # contiguous [B,N,3D]
    dx_ty = dqkv_ptr.dtype.element_ty

    gq = tl.load(dq_ptr + (b * stride_dq_b + n * stride_dq_n + h * stride_dq_h)[:, None] + d[None, :],
                 mask=mask, other=0.0).to(COMPUTE)
    gk = tl.load(dk_ptr + (b * stride_dk_b + n * stride_dk_n + h * stride_dk_h)[:, None] + d[None, :],
                 mask=mask, other=0.0).to(COMPUTE)
    if HAS_ROPE:
        c, s = load_rope_tables(cos_ptr, sin_ptr, ids_ptr, b, n, stride_ids_b, stride_ids_n, stride_cos_p, d,
                                row_mask, d_mask, COMPUTE)
        gq = rotate_pairs(gq, c, s, ROWS, BLOCK_D, True)
        gk = rotate_pairs(gk, c, s, ROWS, BLOCK_D, True)
    if HAS_NORM:
        xq = tl.load(qkv_ptr + x_offs, mask=mask, other=0.0).to(COMPUTE)
        gq, dqw = _qk_norm_bwd(xq, gq, qw_ptr, d, d_mask, Dh, eps, HAS_QW)
        xk = tl.load(qkv_ptr + x_offs + D, mask=mask, other=0.0).to(COMPUTE)
        gk, dkw = _qk_norm_bwd(xk, gk, kw_ptr, d, d_mask, Dh, eps, HAS_KW)
        if HAS_QW:
            tl.store(dqw_part_ptr + pid * Dh + d, dqw, mask=d_mask)
        if HAS_KW:
            tl.store(dkw_part_ptr + pid * Dh + d, dkw, mask=d_mask)
    tl.store(dqkv_ptr + dx_offs, gq.to(dx_ty), mask=mask)
    tl.store(dqkv_ptr + dx_offs + D, gk.to(dx_ty), mask=mask)

    gv = tl.load(dv_ptr + (b * stride_dv_b + n * stride_dv_n + h * stride_dv_h)[:, None] + d[None, :],
                 mask=mask, other=0.0).to(COMPUTE)
    if HAS_V0:
        lam, t, v0 = _load_v0(v0_ptr, v0_ids_ptr, lam_ptr, b, n, h, d, row_mask, mask, stride_v0_ids_b,
                              stride_v0_ids_n, stride_v0_b, stride_v0_t, stride_v0_h, HAS_V0_IDS, COMPUTE)
        v = tl.load(qkv_ptr + x_offs + 2 * D, mask=mask, other=0.0).to(COMPUTE)
        tl.store(dlam_part_ptr + pid, tl.sum(tl.sum(gv * (v0 - v), axis=1), axis=0))
        lam_v0, lam_v = _mix_weights(lam, lam_ptr.dtype.element_ty, v0_ptr.dtype.element_ty, qkv_ptr.dtype.element_ty)
        # one writer per element: v0_ids are unique within a sample (module docstring, Shapes)
        dv0_offs = (b * stride_dv0_b + t * stride_dv0_t + h * stride_dv0_h)[:, None] + d[None, :]
        tl.store(dv0_ptr + dv0_offs, round_to(lam_v0 * gv, dv0_ptr.dtype.element_ty), mask=mask)
        gv = lam_v * gv
    tl.store(dqkv_ptr + dx_offs + 2 * D, round_to(gv, dx_ty), mask=mask)


# --------------------------------------------------------------------------- host launchers


def _flags(q_weight, k_weight, cos, v0, v0_ids) -> dict:
    return dict(HAS_NORM=q_weight is not None, HAS_QW=q_weight is not None, HAS_KW=q_weight is not None and
                k_weight is not None, HAS_ROPE=cos is not None, HAS_V0=v0 is not None,
                HAS_V0_IDS=v0 is not None and v0_ids is not None)


def _strides2(t: torch.Tensor | None) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


def _launch_fwd(qkv, heads, q_weight=None, k_weight=None, cos=None, sin=None, rope_ids=None, v0=None,
                v0_ids=None, lam=None, alloc=empty_output):
    """q, k, v as contiguous [B,N,H,Dh] tensors in qkv's dtype, each made by `alloc` (shape, dtype,
    device) and written whole."""
    B, N, three_d = qkv.shape
    Dh = three_d // 3 // heads
    qkv, v0, q_weight, k_weight = (unit_last_stride(t) for t in (qkv, v0, q_weight, k_weight))
    out = tuple(alloc((B, N, heads, Dh), qkv.dtype, qkv.device) for _ in range(3))
    n_rows = B * N * heads
    if n_rows == 0:
        return out
    if cos is not None:
        cos, sin = cos.contiguous(), sin.contiguous()
    launch = row_launch(n_rows, Dh, "attention_prologue_fwd")
    q, k, v = out
    _attention_prologue_fwd_kernel[launch.grid](
        qkv, q, k, v, q_weight, k_weight, cos, sin, rope_ids, v0, v0_ids, lam,
        n_rows, N, heads, Dh, default_rms_eps(qkv.dtype),
        qkv.stride(0), qkv.stride(1), *_strides2(rope_ids), cos.stride(0) if cos is not None else 0,
        *_strides3(v0), *_strides2(v0_ids),
        **_flags(q_weight, k_weight, cos, v0, v0_ids),
        COMPUTE=tl_compute_dtype(qkv.dtype), INDEX=index_dtype(qkv, v0, q), ROWS=launch.rows, BLOCK_D=launch.block_d,
        num_warps=launch.num_warps,
        enable_fp_fusion=False,  # RoPE's and the value mix's products are rounded before their sums, as eager's
    )
    return out


def _launch_bwd(dq, dk, dv, qkv, heads, q_weight=None, k_weight=None, cos=None, sin=None, rope_ids=None,
                v0=None, v0_ids=None, lam=None, alloc=empty_output):
    """Gradients (d qkv, d q_weight, d k_weight, d v0, d lam) from dq, dk, dv [B,N,H,Dh].

    Absent inputs get absent_grad (custom ops cannot return None). d qkv [B,N,3D], d v0
    [B,T,H,Dh] (contiguous, in v0's dtype; zeroed first with v0_ids) and the partial-sum buffers
    are made by `alloc` (shape, dtype, device)."""
    B, N, three_d = qkv.shape
    Dh = three_d // 3 // heads
    qkv, v0, q_weight, k_weight = (unit_last_stride(t) for t in (qkv, v0, q_weight, k_weight))
    dq, dk, dv = (unit_last_stride(g) for g in (dq, dk, dv))  # any layout: SDPA's, or autograd's sums
    flags = _flags(q_weight, k_weight, cos, v0, v0_ids)
    accum = compute_dtype(qkv.dtype)
    n_rows = B * N * heads
    launch = row_launch(max(n_rows, 1), Dh, "attention_prologue_bwd")
    programs = launch.grid[0]
    dqkv = alloc((B, N, three_d), qkv.dtype, qkv.device)

    def partial(shape):  # every program writes its partials; with no rows there is no program
        return alloc(shape, accum, qkv.device) if n_rows > 0 else torch.zeros(shape, dtype=accum, device=qkv.device)

    dqw = partial((programs, Dh)) if flags["HAS_QW"] else absent_grad(qkv)
    dkw = partial((programs, Dh)) if flags["HAS_KW"] else absent_grad(qkv)
    dlam = partial((programs,)) if flags["HAS_V0"] else absent_grad(qkv)
    if not flags["HAS_V0"]:
        dv0 = absent_grad(qkv)
    else:  # routed: tokens not kept get no gradient, so zero first; dense: every element written
        dv0 = alloc(v0.shape, v0.dtype, v0.device)
        if flags["HAS_V0_IDS"]:
            dv0.zero_()
    if n_rows > 0:
        if cos is not None:
            cos, sin = cos.contiguous(), sin.contiguous()
        _attention_prologue_bwd_kernel[launch.grid](
            dq, dk, dv, qkv, q_weight, k_weight, cos, sin, rope_ids, v0, v0_ids, lam,
            dqkv, dqw, dkw, dv0, dlam,
            n_rows, N, heads, Dh, default_rms_eps(qkv.dtype),
            *_strides3(dq), *_strides3(dk), *_strides3(dv), qkv.stride(0), qkv.stride(1), *_strides2(rope_ids),
            cos.stride(0) if cos is not None else 0,
            *_strides3(v0), *_strides2(v0_ids), *_strides3(dv0 if flags["HAS_V0"] else None),
            **flags,
            COMPUTE=tl_compute_dtype(qkv.dtype), INDEX=index_dtype(qkv, v0, dv0, dq, dk, dv), ROWS=launch.rows,
            BLOCK_D=launch.block_d, num_warps=launch.num_warps,
        )
    if flags["HAS_QW"]:
        dqw = dqw.sum(0).to(q_weight.dtype)
    if flags["HAS_KW"]:
        dkw = dkw.sum(0).to(k_weight.dtype)
    if flags["HAS_V0"]:
        dlam = dlam.sum().to(lam.dtype).reshape(lam.shape)
    return dqkv, dqw, dkw, dv0, dlam


# --------------------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("srdit::attention_prologue", mutates_args=())
def _attention_prologue_op(
    qkv: torch.Tensor, heads: int, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
    cos: torch.Tensor | None, sin: torch.Tensor | None, rope_ids: torch.Tensor | None,
    v0: torch.Tensor | None, v0_ids: torch.Tensor | None, lam: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_fwd(qkv, heads, q_weight, k_weight, cos, sin, rope_ids, v0, v0_ids, lam)


@_attention_prologue_op.register_fake
def _(qkv, heads, q_weight, k_weight, cos, sin, rope_ids, v0, v0_ids, lam):
    B, N, three_d = qkv.shape
    shape = (B, N, heads, three_d // 3 // heads)
    return tuple(torch.empty(shape, dtype=qkv.dtype, device=qkv.device) for _ in range(3))


@torch.library.custom_op("srdit::attention_prologue_bwd", mutates_args=())
def _attention_prologue_bwd_op(
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor, heads: int,
    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, cos: torch.Tensor | None,
    sin: torch.Tensor | None, rope_ids: torch.Tensor | None, v0: torch.Tensor | None,
    v0_ids: torch.Tensor | None, lam: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(dq, dk, dv, qkv, heads, q_weight, k_weight, cos, sin, rope_ids, v0, v0_ids, lam)


@_attention_prologue_bwd_op.register_fake
def _(dq, dk, dv, qkv, heads, q_weight, k_weight, cos, sin, rope_ids, v0, v0_ids, lam):
    flags = _flags(q_weight, k_weight, cos, v0, v0_ids)
    return (
        qkv.new_empty(qkv.shape),
        q_weight.new_empty(q_weight.shape) if flags["HAS_QW"] else absent_grad(qkv),
        k_weight.new_empty(k_weight.shape) if flags["HAS_KW"] else absent_grad(qkv),
        v0.new_empty(v0.shape) if flags["HAS_V0"] else absent_grad(qkv),
        lam.new_empty(lam.shape) if flags["HAS_V0"] else absent_grad(qkv),
    )


def _setup_context(ctx, inputs, output):
    qkv, heads, *rest = inputs
    ctx.heads = heads
    ctx.save_for_backward(qkv, *rest)


def _backward(ctx, dq, dk, dv):
    qkv, q_weight, k_weight, cos, sin, rope_ids, v0, v0_ids, lam = ctx.saved_tensors
    dqkv, dqw, dkw, dv0, dlam = _attention_prologue_bwd_op(
        dq, dk, dv, qkv, ctx.heads, q_weight, k_weight, cos, sin, rope_ids, v0, v0_ids, lam)
    flags = _flags(q_weight, k_weight, cos, v0, v0_ids)
    return (dqkv, None, dqw if flags["HAS_QW"] else None, dkw if flags["HAS_KW"] else None, None, None, None,
            dv0 if flags["HAS_V0"] else None, None, dlam if flags["HAS_V0"] else None)


_attention_prologue_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public op


def _check(qkv, heads, q_weight, k_weight, cos, sin, rope_ids, v0, v0_ids, lam) -> None:
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"attention_prologue: qkv must be [B,N,3*H*Dh] with H={heads}, got {tuple(qkv.shape)}")
    B, N, three_d = qkv.shape
    Dh = three_d // 3 // heads
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None and tuple(w.shape) != (Dh,):
            raise ValueError(f"attention_prologue: {name} must be [{Dh}], got {tuple(w.shape)}")
    if cos is not None:
        if sin is None or rope_ids is None:
            raise ValueError("attention_prologue: cos needs sin and rope_ids")
        if Dh % 2:
            raise ValueError(f"attention_prologue: head dim {Dh} must be even for RoPE")
        if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != Dh:
            raise ValueError(f"attention_prologue: cos/sin must be [P,{Dh}], got {tuple(cos.shape)} and "
                             f"{tuple(sin.shape)}")
        if tuple(rope_ids.shape) != (B, N):
            raise ValueError(f"attention_prologue: rope_ids must be [{B},{N}], got {tuple(rope_ids.shape)}")
    if v0 is not None:
        if lam is None or lam.dim() != 0:
            raise ValueError("attention_prologue: v0 needs lam, a 0-dim tensor")
        if v0.dim() != 4 or v0.shape[0] != B or tuple(v0.shape[2:]) != (heads, Dh):
            raise ValueError(f"attention_prologue: v0 must be [{B},T,{heads},{Dh}], got {tuple(v0.shape)}")
        if v0_ids is None and v0.shape[1] != N:
            raise ValueError(f"attention_prologue: v0 has T={v0.shape[1]} tokens but v0_ids=None needs T == N={N}")
        if v0_ids is not None and tuple(v0_ids.shape) != (B, N):
            raise ValueError(f"attention_prologue: v0_ids must be [{B},{N}], got {tuple(v0_ids.shape)}")


def attention_prologue(qkv, heads, q_weight=None, k_weight=None, cos=None, sin=None, rope_ids=None,
                       v0=None, v0_ids=None, lam=None):
    """From the qkv projection to what attention consumes, in the release's order.

    qkv [B,N,3D] -> q, k, v [B,H,N,Dh] (transposed views of contiguous [B,N,H,Dh] tensors in
    qkv's dtype) and v_raw [B,N,H,Dh], the un-mixed v. Same contract as
    srdit.kernels.reference.attention_prologue; rope ids must be < P and v0_ids in [0, T) (not
    checked: a host sync).
    """
    _check(qkv, heads, q_weight, k_weight, cos, sin, rope_ids, v0, v0_ids, lam)
    if v0 is None:
        v0_ids = lam = None  # unused by the reference either; keep them out of the graph
    if cos is None:
        sin = rope_ids = None
    q, k, v = _attention_prologue_op(qkv, heads, q_weight, k_weight, cos, sin, rope_ids, v0, v0_ids, lam)
    if v0 is None:
        v_raw = v  # identical values: one tensor, autograd sums the two gradients
    else:
        B, N, _ = qkv.shape
        v_raw = qkv.view(B, N, 3, heads, -1)[:, :, 2]  # a view of qkv, as in the reference
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), v_raw

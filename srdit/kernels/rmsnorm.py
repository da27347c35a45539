"""RMSNorm + adaLN modulation, and the same fused with the gated residual add before it.

Math (rows r = (b, n) of x [B,N,D]; shift, scale, gate [B,D]; weight w [D]):
    rstd_r = 1 / sqrt(mean_d(x_r^2) + eps)
    xhat_r = x_r * rstd_r
    y_r    = xhat_r * w * (1 + scale_b) + shift_b                 (rmsnorm_modulate)
With shift = scale = None it is a plain RMSNorm (optional w) over the last dim of x [..., D]
(the REG token's wg_norm on x [B,D]). The residual variant first forms the block's residual
stream x_new = x + gate_b * f_r (rounded to x's dtype, as the unfused code stores it) and
normalises that: residual_rmsnorm_modulate(x, gate, f, ...) -> (x_new, y).

Backward, with g_r = dy_r * (1 + scale_b) (the modulated upstream gradient) and gw_r = g_r * w:
    dx_r     = rstd_r * (gw_r - xhat_r * mean_d(gw_r * xhat_r))
    dshift_b = sum_n dy_r;   dscale_b = sum_n dy_r * xhat_r * w;   dw = sum_r g_r * xhat_r
residual:  d_r = dx_new_r + dx_r (the gradient of x_new),  dx = d,  df_r = gate_b * d_r,
           dgate_b = sum_n d_r * f_r.

Precision: every load is upcast to the compute dtype (fp32 for fp16/bf16/fp32 inputs; fp64
for fp64 inputs, so gradcheck works); rstd, the row sums and all reductions over rows are in
that dtype; x_new, dx, df are stored in their input's dtype, y in the dtype the next GEMM
consumes: the autocast dtype under autocast (for fp32/fp16/bf16 x; the Linear after the norm
would cast it there anyway), else x's; rms_norm's y in what torch's rms_norm gives (fp32 under
autocast, else x's: the REG token joins the fp32 stream). The forward rounds where the eager
ops round under autocast (docs/kernels.md "Rounding where the twin rounds"): 1 + scale to
scale's dtype, gate * f to the dtype of their product, each product before its sum (no FMA),
and y once, to nearest, ties to even: the bits of the cast it replaces (all by
triton_utils.round_to, bf16 by integer arithmetic). The backward multiplies by the same rounded
1 + scale. The reductions over rows
(dshift, dscale, dweight, dgate) are per-program partial rows [G, S, D] in the compute dtype (G
batch groups, S programs per group from split_launch; no program's rows cross a batch), summed
by torch: deterministic, the same bits run to run. Saved for backward: x (or x_new), rstd
[rows] in the compute dtype, scale, weight (and f, gate for the residual variant); all but rstd
are tensors the graph holds anyway.

Bytes per call (R = B*N rows, s = bytes per element of x, sy = of y and dy (2 under bf16
autocast, else s), sm = of shift/scale/gate, sw = of w, c = 4 bytes of the compute dtype, S
programs per group):
    rmsnorm_modulate            fwd: read R*D*s + 2*B*D*sm + D*sw;  write R*D*sy + R*c
                                bwd: read R*D*(s + sy) + R*c + B*D*sm + D*sw;  write R*D*s
                                     + partials 2 * (3*B*S*D*c) (written, then read by the sum)
    residual_rmsnorm_modulate   fwd: read 2*R*D*s + 3*B*D*sm + D*sw;  write R*D*(s + sy) + R*c
                                bwd: read R*D*(3*s + sy) + R*c + 2*B*D*sm + D*sw;  write 2*R*D*s
                                     + partials 2 * (4*B*S*D*c)
So ~2 and ~3 passes over [R,D] for the plain op, ~4 and ~6 for the residual one (fp32 x, bf16 y:
1.5 and 2.5, 3.5 and 5.5), and no cast pass of y forward or of dy backward under autocast.

Design notes (why partial sums and not atomics, why the residual add is fused): docs/kernels.md.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from srdit.kernels.autocast import fp32_op_dtype, gemm_dtype
from srdit.kernels.reference import default_rms_eps
from srdit.kernels.triton_utils import (absent_grad, compute_dtype, empty_output, index_dtype, rms_normalize,
                                        rms_normalize_bwd, round_to, row_launch, split_launch, tl_compute_dtype,
                                        tl_dtype, unit_last_stride)

Tensor = torch.Tensor


@triton.jit
def _one_plus_scale(scale, SCALE: tl.constexpr):
    """1 + scale rounded to scale's dtype SCALE, as the eager `1 + scale` stores it (bf16 under
    autocast: a scale in [-2^-9, 2^-8] gives exactly 1), back in scale's compute dtype."""
    return round_to(1.0 + scale, SCALE).to(scale.dtype)


@triton.jit(do_not_specialize=["n_rows"])  # batch-dependent: one compile for every batch
def _rmsnorm_modulate_fwd_kernel(
    x_ptr, f_ptr, gate_ptr, shift_ptr, scale_ptr, w_ptr,  # inputs: x, f [R,D]; gate, shift, scale [B,D]; w [D]
    y_ptr, x_new_ptr, rstd_ptr,  # outputs: y [R,D] (in the next GEMM's dtype), x_new [R,D] (residual only), rstd [R]
    n_rows, N, D, stride_gate_b, stride_shift_b, stride_scale_b, eps,
    HAS_MOD: tl.constexpr, HAS_W: tl.constexpr, RESIDUAL: tl.constexpr, GATE_F: tl.constexpr,
    COMPUTE: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(INDEX) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_mask = rows < n_rows
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows[:, None] * D + cols[None, :]  # [ROWS, BLOCK_D]
    b = rows // N  # batch of each row: a tile may span batches
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if RESIDUAL:
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        gate = tl.load(gate_ptr + b[:, None] * stride_gate_b + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        # gate * f is rounded to GATE_F (bf16 under autocast) before the add, as the unfused ops do
        x_new = round_to(x + round_to(gate * f, GATE_F).to(COMPUTE), x_new_ptr.dtype.element_ty)
        tl.store(x_new_ptr + offs, x_new, mask=mask)
        x = x_new.to(COMPUTE)
    y, rstd = rms_normalize(x, D, eps)  # [ROWS, BLOCK_D], [ROWS]
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)[None, :]
    if HAS_MOD:
        shift = tl.load(shift_ptr + b[:, None] * stride_shift_b + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        scale = tl.load(scale_ptr + b[:, None] * stride_scale_b + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        y = y * _one_plus_scale(scale, scale_ptr.dtype.element_ty) + shift  # no FMA: see _launch_fwd
    tl.store(y_ptr + offs, round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows_per_group", "tiles_per_program"])  # batch-dependent
def _rmsnorm_modulate_bwd_kernel(
    # inputs: dy (in y's dtype), x (x_new for the residual variant), dx_new, f [R,D]; rstd [R]; scale, gate [B,D]; w [D]
    dy_ptr, x_ptr, rstd_ptr, scale_ptr, w_ptr, dx_new_ptr, f_ptr, gate_ptr,
    # outputs: dx, df [R,D]; partial sums of dshift, dscale, dw, dgate [G, S, D] in COMPUTE
    dx_ptr, df_ptr, dshift_part_ptr, dscale_part_ptr, dw_part_ptr, dgate_part_ptr,
    rows_per_group, D, stride_scale_b, stride_gate_b, tiles_per_program,
    HAS_MOD: tl.constexpr, HAS_W: tl.constexpr, RESIDUAL: tl.constexpr, HAS_DXN: tl.constexpr,
    COMPUTE: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    group = tl.program_id(0)  # batch element (0 when nothing is per batch)
    split = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    # per-group vectors, loaded once: every row of this program belongs to `group`
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    if HAS_MOD:
        scale = tl.load(scale_ptr + group * stride_scale_b + cols, mask=col_mask, other=0.0).to(COMPUTE)
        one_plus_scale = _one_plus_scale(scale, scale_ptr.dtype.element_ty)  # what the forward multiplied by
    if RESIDUAL:
        gate = tl.load(gate_ptr + group * stride_gate_b + cols, mask=col_mask, other=0.0).to(COMPUTE)
    # [BLOCK_D] accumulators (summed over the tile's rows each step: few registers per thread)
    acc_shift = tl.zeros([BLOCK_D], dtype=COMPUTE)
    acc_scale = tl.zeros([BLOCK_D], dtype=COMPUTE)
    acc_w = tl.zeros([BLOCK_D], dtype=COMPUTE)
    acc_gate = tl.zeros([BLOCK_D], dtype=COMPUTE)
    first_tile = split * tiles_per_program
    for t in range(0, tiles_per_program):
        n = (first_tile + t) * ROWS + tl.arange(0, ROWS)  # row within the group
        row_mask = n < rows_per_group
        rows = group.to(INDEX) * rows_per_group + n
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE)
        xhat = x * rstd[:, None]  # masked rows and columns are 0 from here on
        g = dy  # the modulated upstream gradient dy * (1 + scale)
        if HAS_MOD:
            g = dy * one_plus_scale[None, :]
        gw, xw = g, xhat  # g * w, xhat * w
        if HAS_W:
            gw = g * w[None, :]
            xw = xhat * w[None, :]
        dx = rms_normalize_bwd(gw, xhat, rstd, D)
        if RESIDUAL:
            if HAS_DXN:
                dx += tl.load(dx_new_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            tl.store(df_ptr + offs, (dx * gate[None, :]).to(df_ptr.dtype.element_ty), mask=mask)
            acc_gate += tl.sum(dx * f, axis=0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_MOD:
            acc_shift += tl.sum(dy, axis=0)
            acc_scale += tl.sum(dy * xw, axis=0)
        if HAS_W:
            acc_w += tl.sum(g * xhat, axis=0)
    part = (group * tl.num_programs(1) + split).to(INDEX) * D + cols  # row (group, split) of [G, S, D]
    if HAS_MOD:
        tl.store(dshift_part_ptr + part, acc_shift, mask=col_mask)
        tl.store(dscale_part_ptr + part, acc_scale, mask=col_mask)
    if HAS_W:
        tl.store(dw_part_ptr + part, acc_w, mask=col_mask)
    if RESIDUAL:
        tl.store(dgate_part_ptr + part, acc_gate, mask=col_mask)


# --------------------------------------------------------------------------- host launchers


def _check(x, shift, scale, weight, gate=None, f=None) -> None:
    """Shapes the kernels assume; called by the launchers and the fake (so compile checks too)."""
    D = x.shape[-1]
    if (shift is None) != (scale is None):
        raise ValueError("rmsnorm_modulate: pass both shift and scale, or neither")
    if (shift is not None or gate is not None) and x.dim() != 3:
        raise ValueError(f"rmsnorm_modulate: modulation needs x [B,N,D], got {tuple(x.shape)}")
    per_batch = {"shift": shift, "scale": scale, "gate": gate}
    for name, t in per_batch.items():
        if t is not None and tuple(t.shape) != (x.shape[0], D):
            raise ValueError(f"rmsnorm_modulate: {name} must be [B,D] = {(x.shape[0], D)}, got {tuple(t.shape)}")
    if weight is not None and tuple(weight.shape) != (D,):
        raise ValueError(f"rmsnorm_modulate: weight must be [D] = ({D},), got {tuple(weight.shape)}")
    if f is not None and f.shape != x.shape:
        raise ValueError(f"residual_rmsnorm_modulate: f must have x's shape {tuple(x.shape)}, got {tuple(f.shape)}")


def _launch_fwd(x, shift, scale, weight, eps, gate=None, f=None, *, y_dtype=None, alloc=empty_output):
    """Runs the forward kernel; returns (x_new or None, y in y_dtype (default x's), rstd). `alloc`
    makes every output (the tests pass one that fills them with NaN, so an unwritten element fails)."""
    _check(x, shift, scale, weight, gate, f)
    residual = gate is not None
    D = x.shape[-1]
    x = x.contiguous()
    R = x.numel() // D
    N = x.shape[1] if x.dim() == 3 else 1
    shift, scale, gate = (unit_last_stride(t) for t in (shift, scale, gate))
    weight = weight.contiguous() if weight is not None else None
    f = f.contiguous() if residual else None
    y = alloc(x.shape, y_dtype or x.dtype, x.device)
    x_new = alloc(x.shape, x.dtype, x.device) if residual else None
    rstd = alloc((R,), compute_dtype(x.dtype), x.device)
    if R == 0:
        return x_new, y, rstd
    launch = row_launch(R, D, "rmsnorm_fwd")
    _rmsnorm_modulate_fwd_kernel[launch.grid](
        x, f if residual else x, gate if residual else x, shift if shift is not None else x,
        scale if scale is not None else x, weight if weight is not None else x,
        y, x_new if residual else y, rstd,
        R, N, D, gate.stride(0) if residual else 0, shift.stride(0) if shift is not None else 0,
        scale.stride(0) if scale is not None else 0, eps,
        HAS_MOD=shift is not None, HAS_W=weight is not None, RESIDUAL=residual,
        GATE_F=tl_dtype(torch.promote_types(gate.dtype, f.dtype)) if residual else tl_compute_dtype(x.dtype),
        COMPUTE=tl_compute_dtype(x.dtype), INDEX=index_dtype(x, f, gate, shift, scale), ROWS=launch.rows,
        BLOCK_D=launch.block_d, num_warps=launch.num_warps,
        enable_fp_fusion=False,  # y * (1 + scale) + shift rounds the product, as the unfused ops do
    )
    return x_new, y, rstd


def _launch_bwd(dy, x, rstd, scale, weight, dx_new=None, f=None, gate=None, *, alloc=empty_output, programs=None):
    """Runs the backward kernel; returns (dx, df, dgate, dshift, dscale, dweight), None where
    absent. x is the normalised input (x_new for the residual variant), dy in y's dtype
    (x's, or the autocast dtype: it is upcast as it is loaded); dshift and dscale come
    back in scale's dtype, dweight in weight's, dgate in gate's, dx in x's, df in f's.
    `alloc` as in _launch_fwd; `programs` overrides split_launch's total (tests, tuning)."""
    residual = gate is not None
    D = x.shape[-1]
    x, dy, rstd = x.contiguous(), dy.contiguous(), rstd.contiguous()
    R = x.numel() // D
    per_batch = scale is not None or residual
    G = x.shape[0] if per_batch else 1  # groups whose rows are summed separately
    scale, gate = unit_last_stride(scale), unit_last_stride(gate)
    weight = weight.contiguous() if weight is not None else None
    f = f.contiguous() if residual else None
    dx_new = dx_new.contiguous() if dx_new is not None else None
    cdt = rstd.dtype
    dx = alloc(x.shape, x.dtype, x.device)
    df = alloc(x.shape, f.dtype, x.device) if residual else None
    if R == 0:
        def zeros(t):
            return None if t is None else torch.zeros(t.shape, dtype=t.dtype, device=t.device)

        return dx, df, zeros(gate), zeros(scale), zeros(scale), zeros(weight)
    rows_per_group = R // G
    launch = row_launch(rows_per_group, D, "rmsnorm_bwd")
    split = split_launch(G, triton.cdiv(rows_per_group, launch.rows), x.device, programs=programs)

    def partial(wanted):
        return alloc((G, split.splits, D), cdt, x.device) if wanted else None

    pshift, pscale = partial(scale is not None), partial(scale is not None)
    pw, pgate = partial(weight is not None), partial(residual)
    _rmsnorm_modulate_bwd_kernel[split.grid](
        dy, x, rstd, scale if scale is not None else x, weight if weight is not None else x,
        dx_new if dx_new is not None else x, f if residual else x, gate if residual else x,
        dx, df if residual else dx,
        *(p if p is not None else rstd for p in (pshift, pscale, pw, pgate)),
        rows_per_group, D, scale.stride(0) if scale is not None else 0, gate.stride(0) if residual else 0,
        split.tiles_per_program,
        HAS_MOD=scale is not None, HAS_W=weight is not None, RESIDUAL=residual, HAS_DXN=dx_new is not None,
        COMPUTE=tl_compute_dtype(x.dtype), INDEX=index_dtype(x, f, gate, scale), ROWS=launch.rows,
        BLOCK_D=launch.block_d, num_warps=launch.num_warps,
    )
    dshift = pshift.sum(1).to(scale.dtype) if pshift is not None else None  # [B, D]
    dscale = pscale.sum(1).to(scale.dtype) if pscale is not None else None  # [B, D]
    dweight = pw.sum((0, 1)).to(weight.dtype) if pw is not None else None  # [D]
    dgate = pgate.sum(1).to(gate.dtype) if pgate is not None else None  # [B, D]
    return dx, df, dgate, dshift, dscale, dweight


# --------------------------------------------------------------------------- custom ops + autograd


def _grad_or_absent(t: Optional[Tensor], ref: Tensor) -> Tensor:
    """t, or absent_grad(ref) standing for None (a custom op returns no None)."""
    return absent_grad(ref) if t is None else t


def _fake_like(t: Optional[Tensor], ref: Tensor) -> Tensor:
    """A new tensor shaped like t (the gradient of t), or the empty stand-in for None."""
    t = _grad_or_absent(t, ref)
    return t.new_empty(t.shape)


@torch.library.custom_op("srdit::rmsnorm_modulate", mutates_args=())
def _rmsnorm_modulate_op(x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor], weight: Optional[Tensor],
                         eps: float, y_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    _, y, rstd = _launch_fwd(x, shift, scale, weight, eps, y_dtype=y_dtype)
    return y, rstd


@_rmsnorm_modulate_op.register_fake
def _(x, shift, scale, weight, eps, y_dtype):
    _check(x, shift, scale, weight)
    rows = x.numel() // x.shape[-1]
    return x.new_empty(x.shape, dtype=y_dtype), x.new_empty((rows,), dtype=compute_dtype(x.dtype))


@torch.library.custom_op("srdit::rmsnorm_modulate_bwd", mutates_args=())
def _rmsnorm_modulate_bwd_op(dy: Tensor, x: Tensor, rstd: Tensor, scale: Optional[Tensor],
                             weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, _, _, dshift, dscale, dweight = _launch_bwd(dy, x, rstd, scale, weight)
    return dx, _grad_or_absent(dshift, x), _grad_or_absent(dscale, x), _grad_or_absent(dweight, x)


@_rmsnorm_modulate_bwd_op.register_fake
def _(dy, x, rstd, scale, weight):
    return x.new_empty(x.shape), _fake_like(scale, x), _fake_like(scale, x), _fake_like(weight, x)


def _setup(ctx, inputs, output):
    x, shift, scale, weight, _, _ = inputs
    ctx.shift_dtype = shift.dtype if shift is not None else None
    ctx.save_for_backward(x, output[1], scale, weight)
    ctx.set_materialize_grads(False)  # rstd is an output only to be saved: no zero gradient for it


def _backward(ctx, dy, _drstd):
    if dy is None:  # y unused
        return None, None, None, None, None, None
    x, rstd, scale, weight = ctx.saved_tensors
    dx, dshift, dscale, dweight = torch.ops.srdit.rmsnorm_modulate_bwd(dy, x, rstd, scale, weight)
    if scale is None:
        dshift = dscale = None
    else:
        dshift = dshift.to(ctx.shift_dtype)
    return dx, dshift, dscale, dweight if weight is not None else None, None, None


_rmsnorm_modulate_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("srdit::residual_rmsnorm_modulate", mutates_args=())
def _residual_rmsnorm_modulate_op(x: Tensor, gate: Tensor, f: Tensor, shift: Optional[Tensor], scale: Optional[Tensor],
                                  weight: Optional[Tensor], eps: float, y_dtype: torch.dtype
                                  ) -> tuple[Tensor, Tensor, Tensor]:
    return _launch_fwd(x, shift, scale, weight, eps, gate, f, y_dtype=y_dtype)


@_residual_rmsnorm_modulate_op.register_fake
def _(x, gate, f, shift, scale, weight, eps, y_dtype):
    _check(x, shift, scale, weight, gate, f)
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(x.shape, dtype=y_dtype),
            x.new_empty((rows,), dtype=compute_dtype(x.dtype)))


@torch.library.custom_op("srdit::residual_rmsnorm_modulate_bwd", mutates_args=())
def _residual_rmsnorm_modulate_bwd_op(dx_new: Optional[Tensor], dy: Tensor, x_new: Tensor, f: Tensor, gate: Tensor,
                                      rstd: Tensor, scale: Optional[Tensor], weight: Optional[Tensor]
                                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, df, dgate, dshift, dscale, dweight = _launch_bwd(dy, x_new, rstd, scale, weight, dx_new, f, gate)
    return (dx, dgate, df, _grad_or_absent(dshift, x_new), _grad_or_absent(dscale, x_new),
            _grad_or_absent(dweight, x_new))


@_residual_rmsnorm_modulate_bwd_op.register_fake
def _(dx_new, dy, x_new, f, gate, rstd, scale, weight):
    return (x_new.new_empty(x_new.shape), _fake_like(gate, x_new), f.new_empty(f.shape),
            _fake_like(scale, x_new), _fake_like(scale, x_new), _fake_like(weight, x_new))


def _residual_setup(ctx, inputs, output):
    x, gate, f, shift, scale, weight, _, _ = inputs
    ctx.shift_dtype = shift.dtype if shift is not None else None
    x_new, y, rstd = output
    ctx.y_dtype = y.dtype
    ctx.save_for_backward(x_new, f, gate, rstd, scale, weight)
    # no zero gradients for rstd (saved only) or an unused x_new (the kernel then reads no dx_new)
    ctx.set_materialize_grads(False)


def _residual_backward(ctx, dx_new, dy, _drstd):
    x_new, f, gate, rstd, scale, weight = ctx.saved_tensors
    if dy is None:
        if dx_new is None:
            return None, None, None, None, None, None, None, None
        dy = torch.zeros(x_new.shape, dtype=ctx.y_dtype, device=x_new.device)  # y unused, x_new used: rare
    dx, dgate, df, dshift, dscale, dweight = torch.ops.srdit.residual_rmsnorm_modulate_bwd(
        dx_new, dy, x_new, f, gate, rstd, scale, weight)
    if scale is None:
        dshift = dscale = None
    else:
        dshift = dshift.to(ctx.shift_dtype)
    return dx, dgate, df, dshift, dscale, dweight if weight is not None else None, None, None


_residual_rmsnorm_modulate_op.register_autograd(_residual_backward, setup_context=_residual_setup)


# --------------------------------------------------------------------------- public functions


def rmsnorm_modulate(x, shift, scale, weight=None, eps=1e-6):
    """x [B,N,D], shift/scale [B,D] or both None (then x [..., D]): rms_norm(x) * (1 + scale) + shift,
    in the autocast dtype under autocast (what the next GEMM reads), else in x's."""
    return torch.ops.srdit.rmsnorm_modulate(x, shift, scale, weight, eps, gemm_dtype(x))[0]


def residual_rmsnorm_modulate(x, gate, f, shift, scale, weight=None, eps=1e-6):
    """x, f [B,N,D]; gate, shift, scale [B,D] -> (x_new = x + gate * f, rmsnorm_modulate(x_new, ...));
    x_new in x's dtype (the residual stream), y as rmsnorm_modulate's."""
    x_new, y, _ = torch.ops.srdit.residual_rmsnorm_modulate(x, gate, f, shift, scale, weight, eps, gemm_dtype(x))
    return x_new, y


def rms_norm(x, weight=None, eps=None):
    """Plain RMSNorm over the last dim (the REG token's wg_norm): its output joins the residual
    stream, not a GEMM, so it comes out as torch's rms_norm gives it: fp32 under autocast (which
    runs rms_norm in fp32; the bf16 token of an autocast Linear stays unrounded), else x's dtype.
    eps=None is torch's default."""
    eps = default_rms_eps(x.dtype) if eps is None else eps
    return torch.ops.srdit.rmsnorm_modulate(x, None, None, weight, eps, fp32_op_dtype(x))[0]

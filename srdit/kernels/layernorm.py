"""LayerNorm, and the same fused with the residual add and LayerScale before it: the frozen DINOv2
teacher's norms (srdit/model/dinov2.py), forward only.

Math (rows r of x [R, D] = [..., D]; f [..., D]; gamma, weight w, bias b [D]):
    x_new_r = x_r + f_r * gamma                                  (residual_layer_norm only)
    mean_r  = mean_d(x_new_r);   var_r = mean_d((x_new_r - mean_r)^2)     (biased, as torch)
    y_r     = (x_new_r - mean_r) / sqrt(var_r + eps) * w + b
layer_norm(x, w, b, eps, out_dtype) -> y;  residual_layer_norm(x, f, gamma, w, b, eps, out_dtype)
-> (x_new, y). In a teacher block the residual variant takes the attention (MLP) output f and
ls1 (ls2) gamma, and the weights of the norm that follows: norm2, the next block's norm1, or the
final norm.

Precision: every load is upcast to the compute dtype (fp32; fp64 for fp64 inputs). x_new is
what the unfused `x + (f * gamma)` stores under type promotion: the product rounded to the
compute dtype, then the sum, then rounded to x's dtype (the kernel is compiled without FMA
contraction, enable_fp_fusion=False, so the GPU rounds the product too). mean, var and rstd
are in the compute dtype, in a different summation order from torch's native_layer_norm, so y
is not bit-identical to it: within the rounding of the out dtype (tests/kernels/checks.py).
y is stored in out_dtype: the dtype of the GEMM that reads it (bf16 under autocast), so the
cast autocast would make is fused here. No autograd: the teacher is frozen and runs under
no_grad; a call that would need a gradient is refused.

Bytes per call (R rows, s = bytes per element of x, sf of f, so of out_dtype, 4 of the fp32
gamma, w, b):
    layer_norm            read R*D*s + 2*D*4;              write R*D*so
    residual_layer_norm   read R*D*(s + sf) + 3*D*4;       write R*D*(s + so)
In the teacher under bf16 autocast (s = 4, sf = so = 2): 12 bytes per element for the residual
op, against 32 for the unfused ops (layer_norm 8, cast to bf16 6, f * gamma 6, add 12) in 4
launches, and 6 against 14 for the plain one.

Design notes: docs/kernels.md "LayerNorm for the teacher".
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from srdit.kernels.triton_utils import (compute_dtype, empty_output, forward_only, index_dtype, round_to,
                                        row_launch, tl_compute_dtype)

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["n_rows"])  # batch-dependent: one compile for every batch
def _layer_norm_fwd_kernel(
    x_ptr, f_ptr, gamma_ptr, w_ptr, b_ptr,  # inputs: x, f [R,D]; gamma, w, b [D]
    y_ptr, x_new_ptr,  # outputs: y [R,D] in out_dtype, x_new [R,D] (residual only) in x's dtype
    n_rows, D, eps,
    RESIDUAL: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(INDEX) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    col_mask = cols < D
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    offs = rows[:, None] * D + cols[None, :]  # [ROWS, BLOCK_D]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if RESIDUAL:
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        gamma = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
        x_new = round_to(x + f * gamma[None, :], x_new_ptr.dtype.element_ty)  # the residual stream, as stored
        tl.store(x_new_ptr + offs, x_new, mask=mask)
        x = x_new.to(COMPUTE)
    mean = tl.sum(x, axis=1) / D  # [ROWS]; padded lanes hold 0
    xc = tl.where(mask, x - mean[:, None], 0.0)  # padded lanes back to 0 for the variance
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)  # [ROWS]
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, round_to(y, y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host launcher


def _check(x, weight, bias, f=None, gamma=None) -> None:
    """Shapes the kernel assumes; called by the launcher and the fakes (so compile checks too)."""
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias), ("gamma", gamma)):
        if t is not None and tuple(t.shape) != (D,):
            raise ValueError(f"layer_norm: {name} must be [D] = ({D},), got {tuple(t.shape)}")
    if f is not None and f.shape != x.shape:
        raise ValueError(f"residual_layer_norm: f must have x's shape {tuple(x.shape)}, got {tuple(f.shape)}")


def _launch_fwd(x, weight, bias, eps, out_dtype, f=None, gamma=None, *, alloc=empty_output):
    """Runs the kernel; returns (x_new or None, y). `alloc` makes every output (the tests pass one
    that fills them with NaN, so an unwritten element fails)."""
    _check(x, weight, bias, f, gamma)
    residual = f is not None
    D = x.shape[-1]
    x = x.contiguous()
    f = f.contiguous() if residual else None
    weight, bias = weight.contiguous(), bias.contiguous()
    gamma = gamma.contiguous() if residual else None
    R = x.numel() // D if D else 0
    y = alloc(x.shape, out_dtype, x.device)
    x_new = alloc(x.shape, x.dtype, x.device) if residual else None
    if R == 0:
        return x_new, y
    launch = row_launch(R, D, "layer_norm_fwd")
    _layer_norm_fwd_kernel[launch.grid](
        x, f if residual else x, gamma if residual else weight, weight, bias,
        y, x_new if residual else y,
        R, D, eps,
        RESIDUAL=residual, COMPUTE=tl_compute_dtype(x.dtype), INDEX=index_dtype(x, f, y), ROWS=launch.rows,
        BLOCK_D=launch.block_d, num_warps=launch.num_warps,
        enable_fp_fusion=False,  # x + f * gamma rounds the product, as the unfused ops do
    )
    return x_new, y


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("srdit::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    return _launch_fwd(x, weight, bias, eps, out_dtype)[1]


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    _check(x, weight, bias)
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("srdit::residual_layer_norm", mutates_args=())
def _residual_layer_norm_op(x: Tensor, f: Tensor, gamma: Tensor, weight: Tensor, bias: Tensor, eps: float,
                            out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _launch_fwd(x, weight, bias, eps, out_dtype, f, gamma)


@_residual_layer_norm_op.register_fake
def _(x, f, gamma, weight, bias, eps, out_dtype):
    _check(x, weight, bias, f, gamma)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype)


# --------------------------------------------------------------------------- public functions


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6,
               out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """LayerNorm over the last dim of x [..., D], stored in out_dtype (None: x's dtype)."""
    forward_only("layer_norm", x, weight, bias)
    return torch.ops.srdit.layer_norm(x, weight, bias, eps, out_dtype or x.dtype)


def residual_layer_norm(x: Tensor, f: Tensor, gamma: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6,
                        out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """x, f [..., D]; gamma [D] -> (x_new = x + f * gamma in x's dtype, layer_norm(x_new) in out_dtype)."""
    forward_only("residual_layer_norm", x, f, gamma, weight, bias)
    return torch.ops.srdit.residual_layer_norm(x, f, gamma, weight, bias, eps, out_dtype or x.dtype)

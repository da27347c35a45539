"""2D RoPE (EVA-02 interleaved layout) as one Triton kernel per direction.

Math (SPEC.md section 2), per token with table row p = rope_ids[b, n] and c = cos[p], s = sin[p]:
    out[2i]   = x[2i]   c[2i]   - x[2i+1] s[2i]
    out[2i+1] = x[2i+1] c[2i+1] + x[2i]   s[2i+1]
i.e. out = x * c + rotate_half(x) * s with rotate_half((a, b)) = (-b, a) on adjacent pairs. A
negative id leaves the token unrotated (c = 1, s = 0: the class token). The backward applies the
transposed rotation, dx[2i] = g[2i] c[2i] + g[2i+1] s[2i+1], dx[2i+1] = g[2i+1] c[2i+1] - g[2i] s[2i];
the tables and ids are constants (no gradient).

Shapes: x [B,N,H,Dh] (Dh even; any strides with a unit last stride, others are copied), cos/sin
[P,Dh] fp32, rope_ids [B,N] int (any strides, e.g. an expanded [1,N] row). Output: a contiguous
[B,N,H,Dh] tensor in x's dtype. One kernel row is one (token, head) pair of Dh elements.

Precision: loads are upcast to fp32 (fp64 for fp64 x) right after the load, the rotation is
computed there, the forward's products each rounded before their sum (no FMA contraction), as
the eager twin computes them, and the result is rounded once to x's dtype, to nearest even
(round_to): the twin's bits. Nothing is saved for backward except the tables and ids (x itself
is not needed: the map is linear).

Bytes per call (M = B*N*H*Dh elements of size e, T = B*N tokens): read x M*e, write M*e, read
ids 8T and the table rows 2*4*Dh*T (shared by the H heads of a token, so mostly cache hits).
bf16 at SR-DiT-B shapes: 4 bytes per element of x (+0.7 if the table rows missed the cache).

Design notes (the tile, the even/odd split, the eager twin's bytes): docs/kernels.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from srdit.kernels.triton_utils import (empty_output, head_rows, index_dtype, load_rope_tables, rotate_pairs,
                                        round_to, row_launch, tl_compute_dtype, unit_last_stride)


@triton.jit
def _rope_rows(x_ptr, out_ptr, cos_ptr, sin_ptr, ids_ptr, n_rows, N, H, Dh,
               stride_x_b, stride_x_n, stride_x_h, stride_ids_b, stride_ids_n, stride_cos_p,
               TRANSPOSE: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """out = RoPE(x) (or its transpose) for this program's (token, head) rows; out contiguous."""
    r, d, row_mask, d_mask, mask, b, n, h = head_rows(n_rows, N, H, Dh, INDEX, ROWS, BLOCK_D)
    x_offs = (b * stride_x_b + n * stride_x_n + h * stride_x_h)[:, None] + d[None, :]
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(COMPUTE)
    c, s = load_rope_tables(cos_ptr, sin_ptr, ids_ptr, b, n, stride_ids_b, stride_ids_n, stride_cos_p, d, row_mask,
                            d_mask, COMPUTE)
    y = rotate_pairs(x, c, s, ROWS, BLOCK_D, TRANSPOSE)
    tl.store(out_ptr + r[:, None] * Dh + d[None, :], round_to(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])  # batch-dependent: one compile for every batch
def _apply_rope_fwd_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, ids_ptr, n_rows, N, H, Dh,
                           stride_x_b, stride_x_n, stride_x_h, stride_ids_b, stride_ids_n, stride_cos_p,
                           COMPUTE: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    _rope_rows(x_ptr, out_ptr, cos_ptr, sin_ptr, ids_ptr, n_rows, N, H, Dh,
               stride_x_b, stride_x_n, stride_x_h, stride_ids_b, stride_ids_n, stride_cos_p,
               False, COMPUTE, INDEX, ROWS, BLOCK_D)


@triton.jit(do_not_specialize=["n_rows"])
def _apply_rope_bwd_kernel(dout_ptr, dx_ptr, cos_ptr, sin_ptr, ids_ptr, n_rows, N, H, Dh,
                           stride_dout_b, stride_dout_n, stride_dout_h, stride_ids_b, stride_ids_n, stride_cos_p,
                           COMPUTE: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    _rope_rows(dout_ptr, dx_ptr, cos_ptr, sin_ptr, ids_ptr, n_rows, N, H, Dh,
               stride_dout_b, stride_dout_n, stride_dout_h, stride_ids_b, stride_ids_n, stride_cos_p,
               True, COMPUTE, INDEX, ROWS, BLOCK_D)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_ids: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"apply_rope: x must be [B,N,H,Dh], got shape {tuple(x.shape)}")
    B, N, _, Dh = x.shape
    if Dh % 2:
        raise ValueError(f"apply_rope: head dim {Dh} must be even (RoPE rotates pairs)")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != Dh:
        raise ValueError(f"apply_rope: cos/sin must both be [P,{Dh}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if tuple(rope_ids.shape) != (B, N):
        raise ValueError(f"apply_rope: rope_ids must be [{B},{N}], got {tuple(rope_ids.shape)}")


def _launch(kernel, x, cos, sin, rope_ids, alloc, **options):
    """Run `kernel` (forward or backward) over every (token, head) row of x into a new
    contiguous [B,N,H,Dh] tensor made by `alloc` (every element written); `options` go to the
    launch (compile options)."""
    B, N, H, Dh = x.shape
    x = unit_last_stride(x)
    out = alloc((B, N, H, Dh), x.dtype, x.device)
    n_rows = B * N * H
    if n_rows == 0:
        return out
    cos, sin = cos.contiguous(), sin.contiguous()
    launch = row_launch(n_rows, Dh, "apply_rope")
    kernel[launch.grid](
        x, out, cos, sin, rope_ids, n_rows, N, H, Dh,
        x.stride(0), x.stride(1), x.stride(2), rope_ids.stride(0), rope_ids.stride(1), cos.stride(0),
        COMPUTE=tl_compute_dtype(x.dtype), INDEX=index_dtype(x, out), ROWS=launch.rows, BLOCK_D=launch.block_d,
        num_warps=launch.num_warps, **options,
    )
    return out


def _launch_fwd(x, cos, sin, rope_ids, alloc=empty_output):
    """RoPE of x [B,N,H,Dh] -> a contiguous [B,N,H,Dh] tensor from `alloc` (shape, dtype, device)."""
    # each product rounded before the sum, as the eager twin's (no FMA); the backward may fuse
    return _launch(_apply_rope_fwd_kernel, x, cos, sin, rope_ids, alloc, enable_fp_fusion=False)


def _launch_bwd(grad, cos, sin, rope_ids, alloc=empty_output):
    """Transposed RoPE of grad [B,N,H,Dh] (dL/dout -> dL/dx), output as in _launch_fwd."""
    return _launch(_apply_rope_bwd_kernel, grad, cos, sin, rope_ids, alloc)


@torch.library.custom_op("srdit::apply_rope", mutates_args=())
def _apply_rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_ids: torch.Tensor) -> torch.Tensor:
    return _launch_fwd(x, cos, sin, rope_ids)


@_apply_rope_op.register_fake
def _(x, cos, sin, rope_ids):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("srdit::apply_rope_bwd", mutates_args=())
def _apply_rope_bwd_op(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       rope_ids: torch.Tensor) -> torch.Tensor:
    return _launch_bwd(grad, cos, sin, rope_ids)


@_apply_rope_bwd_op.register_fake
def _(grad, cos, sin, rope_ids):
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _setup_context(ctx, inputs, output):
    _, cos, sin, rope_ids = inputs
    ctx.save_for_backward(cos, sin, rope_ids)


def _backward(ctx, grad):
    cos, sin, rope_ids = ctx.saved_tensors
    return _apply_rope_bwd_op(grad, cos, sin, rope_ids), None, None, None


_apply_rope_op.register_autograd(_backward, setup_context=_setup_context)


def apply_rope(x, cos, sin, rope_ids):
    """x [B,N,H,Dh]; cos/sin tables [P,Dh]; rope_ids [B,N] int, row of the table for each token.

    A negative id leaves the token unrotated (the class token). Computed in fp32 (fp64 for fp64
    x), returned in x's dtype as a contiguous [B,N,H,Dh] tensor. Same contract as
    srdit.kernels.reference.apply_rope; ids must lie in [-inf, P) (not checked: a host sync).
    """
    _check(x, cos, sin, rope_ids)
    return _apply_rope_op(x, cos, sin, rope_ids)

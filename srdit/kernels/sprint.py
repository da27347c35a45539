"""SPRINT routing ops: the token gather before the routed blocks and the sparse-dense fusion after.

Shapes: B batch, T tokens (257 at 256 px), K kept tokens (64), D width (768), F = prod(trailing
dims) of a gathered tensor (D for the hidden state, H*Dh for the value-residual v0).
Row counts: N = B*T, M = B*K. Kept ids [B,K] must be unique within a sample and in [0, T)
(select_tokens takes a prefix of a permutation); SRDIT_CHECK_IDS=1 checks it without a host
sync (torch._assert_async). Without the check an out-of-range id gives a zero row (the kernels
never touch memory outside x).

gather_tokens(x, ids) = x[b, ids[b, k]]: x [B,T,...], ids [B,K] int -> [B,K,...].
  forward : Triton row gather, one program per tile of kept rows.
  backward: dx = zeros [B,T,...] with dx[b, ids[b, k]] = dout[b, k] (Triton row scatter).
  Each destination row is *stored* once, which equals the reference's scatter-add exactly (a
  sum of one term, bit for bit) because the ids are unique within a sample.
  Bytes per call: fwd read M*F + write M*F; bwd memset N*F, read M*F, write M*F (+ 8 bytes per
  id), as torch's gather, whose backward is a memset plus an atomic scatter-add.
  Compute: none (copies); nothing is accumulated, so every dtype is exact.

sprint_fuse(x_enc, g, ids, mask_token, weight, bias) = Linear(2D -> D)(concat(x_enc, pad(g)))
  where pad(g) [B,T,D] holds g's rows at the kept ids and the [MASK] token m [1,1,D] elsewhere.
  With weight = [W1 | W2] (W1, W2 [D,D]) the concat never needs to exist:
      out = x_enc W1^T + b + mW2                       (one GEMM over all N rows, mW2 = m W2^T
                                                        folded into the bias: a [D] vector)
      out[b, ids[b,k]] += g[b,k] W2^T - mW2            (one GEMM over the M kept rows, then a
                                                        Triton epilogue touching only those rows)
  The three cases of the reference:
      g [B,K,D], ids [B,K]  routed (training)    as above;
      g [B,T,D], ids None   no routing           out = x_enc W1^T + b, then += g W2^T (cuBLAS
                                                 beta = 1, no Triton);
      g None                path drop            out = x_enc W1^T + (b + mW2): a single GEMM.
  Backward, with s = sum of dout over the dropped rows (all rows on path drop) [D]:
      d x_enc = dout W1            d W1 = dout^T x_enc          d b = sum of dout over rows
      d g     = dout[kept] W2      d W2 = dout[kept]^T g + s^T m
      d m     = s W2  [1,1,D]      (no routing: d W2 = dout^T g, d g = dout W2, d m = None,
                                    as in the reference, where m is unused)
  One Triton pass over dout gives dout[kept] (at its slot b*K + k) and the column sums over all
  rows (d b) and over the dropped rows (s) as per-program partials, summed by torch.

  Cost per call (fwd + bwd), bf16, 256 px, 32 images per GPU (N = 8224, M = 2048, D = 768):
    FLOPs   reference: the [N,2D]x[2D,D] GEMM and its two backward GEMMs = 12 N D^2 = 58.2 GFLOP
            here: the W1 GEMMs on N rows and the W2 GEMMs on M rows = 6 (N + M) D^2 = 36.4 GFLOP
            (+ 4 D^2 for mW2 and d m): 37.5% fewer, the W2 half running on K/T = 64/257 of rows.
    bytes   (activations only, in D-rows of 2*D bytes = 1.5 KB; weights are ~2.4 MB either way)
      fwd   reference: clone padded N, scatter 2M, cat 2N + 2N, GEMM read 2N + write N
                       = 8N + 2M rows = 107 MB
            here: GEMM read N + write N, GEMM read M + write M, epilogue 3M = 2N + 5M = 41 MB
      bwd   reference: d cat write 2N + dout N, d W reads dout N + cat 2N, scatter backward
                       (masked fill 2N, dg gather 2M), expand backward N, d b N = 10N + 2M = 133 MB
            here: Triton pass N + M, d x_enc 2N, d W1 2N, d g 2M, d W2 2M = 5N + 5M = 79 MB
    memory  saved for backward: the reference keeps the [N,2D] concat (25 MB); here only the
            inputs x_enc and g, which exist anyway.

Precision: GEMMs are torch's (cuBLAS on the GPU: fp32 accumulation, output in the input
dtype). b + mW2 is accumulated in fp32, as the reference's GEMM accumulates it (from an fp32
copy of W2: 3.5 MB moved per call at D = 768), and rounded once into the bias b', so a dropped
row is round(x W1^T + b'): within one rounding of the larger of the output and b + mW2 from the
reference's round(x W1^T + mW2 + b). The epilogue adds in fp32: a kept row is
round(x W1^T + b') + round(g W2^T) - (b' - b), rounded once more: within one rounding of the
largest of x W1^T + b', b' and g W2^T (each GEMM's bf16 output) from the reference's row
(tests/kernels/test_autocast_rounding.py, under bf16 autocast). Column
sums (d b, s) accumulate in fp32; s stays fp32 for d m = s W2 (fp32 GEMV) and for the s^T m
outer product, which is rounded to the input dtype before cuBLAS adds dout[kept]^T g to it.
Outputs and gradients are in the input dtype. Saved for backward: x_enc, g, ids, mask_token,
weight (no new activations). Under autocast the public function casts its floating inputs to
the autocast dtype first, as F.linear does in the reference; inside the ops autocast is off.

Design notes (stores instead of atomics, the kept-row epilogue, the slot search, time saved):
docs/kernels.md.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from srdit.kernels.autocast import gemm_operands
from srdit.kernels.triton_utils import (absent_grad, compute_dtype, empty_output, index_dtype, round_to, row_launch,
                                        split_launch, tl_compute_dtype)


# --------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["n_rows"])  # batch-dependent: one compile for every batch
def _gather_tokens_fwd_kernel(x_ptr, ids_ptr, out_ptr, n_rows, K, T, F, stride_x_b, stride_x_t,
                              BLOCK_F: tl.constexpr, ROWS: tl.constexpr, INDEX: tl.constexpr):
    """out[r] = x[r // K, ids[r]] for the ROWS kept rows r = b*K + k of this program."""
    rows = tl.program_id(0).to(INDEX) * ROWS + tl.arange(0, ROWS)  # [R]
    cols = tl.arange(0, BLOCK_F)  # [BF]
    row_mask = rows < n_rows
    col_mask = cols < F
    src = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(INDEX)  # [R]
    in_range = row_mask & (src >= 0) & (src < T)  # never read outside x, whatever the ids
    b = rows // K
    src_off = b * stride_x_b + src * stride_x_t  # [R]
    v = tl.load(x_ptr + src_off[:, None] + cols[None, :], mask=in_range[:, None] & col_mask[None, :], other=0.0)
    dst_off = rows * F  # [R]
    tl.store(out_ptr + dst_off[:, None] + cols[None, :], v, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["n_rows"])
def _gather_tokens_bwd_kernel(dout_ptr, ids_ptr, dx_ptr, n_rows, K, T, F,
                              BLOCK_F: tl.constexpr, ROWS: tl.constexpr, INDEX: tl.constexpr):
    """dx[r // K, ids[r]] = dout[r] (dx zero-filled; ids unique within a sample)."""
    rows = tl.program_id(0).to(INDEX) * ROWS + tl.arange(0, ROWS)  # [R]
    cols = tl.arange(0, BLOCK_F)
    row_mask = rows < n_rows
    col_mask = cols < F
    dst = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(INDEX)  # [R]
    in_range = row_mask & (dst >= 0) & (dst < T)
    b = rows // K
    d = tl.load(dout_ptr + rows[:, None] * F + cols[None, :], mask=row_mask[:, None] & col_mask[None, :])
    tl.store(dx_ptr + ((b * T + dst) * F)[:, None] + cols[None, :], d, mask=in_range[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["n_rows"])  # batch-dependent: one compile for every batch
def _sprint_fuse_fwd_kernel(out_ptr, gw2_ptr, fold_ptr, ids_ptr, n_rows, K, T, D,
                            BLOCK_D: tl.constexpr, ROWS: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr):
    """In place on out [B*T, D] (= x_enc W1^T + b + fold everywhere, fold ~ mW2 [D] in COMPUTE: what the
    bias gained): out[b*T + ids[r]] += gW2[r] - fold for the ROWS kept rows r = b*K + k of this
    program, in COMPUTE (fp32; fp64 for fp64 inputs)."""
    rows = tl.program_id(0).to(INDEX) * ROWS + tl.arange(0, ROWS)  # [R]
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < D
    t = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(INDEX)  # [R]
    in_range = row_mask & (t >= 0) & (t < T)
    b = rows // K
    mask = in_range[:, None] & col_mask[None, :]
    dst = ((b * T + t) * D)[:, None] + cols[None, :]  # [R, BD]
    base = tl.load(out_ptr + dst, mask=mask, other=0.0).to(COMPUTE)
    gw2 = tl.load(gw2_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    fold = tl.load(fold_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE)  # [BD]
    tl.store(out_ptr + dst, round_to(base + gw2 - fold[None, :], out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "tiles_per_program"])  # batch-dependent
def _sprint_fuse_bwd_kernel(dout_ptr, ids_ptr, dkept_ptr, sums_part_ptr, n_rows, K, T, D, tiles_per_program,
                            BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, COMPUTE: tl.constexpr,
                            INDEX: tl.constexpr):
    """One pass over dout [B*T, D]: dkept[b*K + k] = dout[b*T + ids[b, k]], and this program's COMPUTE
    column sums of dout over its rows (sums_part[pid, 0]) and over its dropped rows (sums_part[pid, 1]).
    Grid (1, programs) from split_launch: program pid loops over tiles_per_program row tiles."""
    pid = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    kk = tl.arange(0, BLOCK_K)  # [BK]
    k_mask = kk < K
    acc_all = tl.zeros([ROWS, BLOCK_D], dtype=COMPUTE)
    acc_drop = tl.zeros([ROWS, BLOCK_D], dtype=COMPUTE)
    for i in range(tiles_per_program):
        rows = (pid.to(INDEX) * tiles_per_program + i) * ROWS + tl.arange(0, ROWS)  # [R]
        row_mask = rows < n_rows
        b = rows // T
        t = rows - b * T
        # is token t of sample b kept, and in which slot? compare with the K ids of the sample
        kept_ids = tl.load(ids_ptr + b[:, None] * K + kk[None, :],
                           mask=row_mask[:, None] & k_mask[None, :], other=-1)  # [R, BK]
        hit = kept_ids == t[:, None]
        kept = tl.sum(hit.to(tl.int32), axis=1) > 0  # [R]
        slot = tl.sum(tl.where(hit, kk[None, :], 0), axis=1)  # [R], valid where kept
        mask = row_mask[:, None] & col_mask[None, :]
        d = tl.load(dout_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        da = d.to(COMPUTE)
        acc_all += da
        acc_drop += tl.where(kept[:, None], 0.0, da)
        dst = (b * K + slot) * D  # [R]
        tl.store(dkept_ptr + dst[:, None] + cols[None, :], d, mask=mask & kept[:, None])
    part = sums_part_ptr + pid.to(INDEX) * 2 * D + cols
    tl.store(part, tl.sum(acc_all, axis=0), mask=col_mask)
    tl.store(part + D, tl.sum(acc_drop, axis=0), mask=col_mask)


# --------------------------------------------------------------------------- host launchers


def _debug_checks() -> bool:
    """SRDIT_CHECK_IDS=1: check that kept ids are unique per sample and in [0, T) (see top)."""
    return os.environ.get("SRDIT_CHECK_IDS", "0") == "1"


def _check_ids(ids: torch.Tensor, num_tokens: int) -> None:
    if not _debug_checks() or ids.numel() == 0:
        return
    s = ids.sort(dim=1).values  # [B, K]
    ok = (s[:, 0] >= 0).all() & (s[:, -1] < num_tokens).all() & (s[:, 1:] != s[:, :-1]).all()
    torch._assert_async(ok, "SPRINT kept ids must be unique within a sample and in [0, T)")


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B,T,...] as [B,T,F] with unit stride along F (a view when possible: a [B,T,H,Dh] slice
    of the qkv projection is one, so v0 is gathered without a copy)."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    return x3 if x3.stride(2) == 1 or x3.shape[2] == 1 else x3.contiguous()


def _launch_gather_fwd(x: torch.Tensor, ids: torch.Tensor, alloc=empty_output) -> torch.Tensor:
    """x [B,T,...], ids [B,K] -> out [B,K,...] (every element written)."""
    B, T = x.shape[:2]
    K = ids.shape[1]
    out = alloc((B, K, *x.shape[2:]), x.dtype, x.device)
    if out.numel() == 0:
        return out
    x3 = _token_rows(x)
    width = x3.shape[2]
    launch = row_launch(B * K, width, "gather_tokens")
    _gather_tokens_fwd_kernel[launch.grid](
        x3, ids.contiguous(), out, B * K, K, T, width, x3.stride(0), x3.stride(1),
        BLOCK_F=launch.block_d, ROWS=launch.rows, INDEX=index_dtype(x3, out), num_warps=launch.num_warps)
    return out


def _launch_gather_bwd(dout: torch.Tensor, ids: torch.Tensor, num_tokens: int, alloc=empty_output) -> torch.Tensor:
    """dout [B,K,...], ids [B,K] -> dx [B,T,...]: zeros except dx[b, ids[b,k]] = dout[b,k]."""
    B, K = ids.shape
    dx = alloc((B, num_tokens, *dout.shape[2:]), dout.dtype, dout.device).zero_()
    if dout.numel() == 0:
        return dx
    d3 = dout.reshape(B, K, -1).contiguous()
    width = d3.shape[2]
    launch = row_launch(B * K, width, "gather_tokens")
    _gather_tokens_bwd_kernel[launch.grid](
        d3, ids.contiguous(), dx, B * K, K, num_tokens, width,
        BLOCK_F=launch.block_d, ROWS=launch.rows, INDEX=index_dtype(d3, dx), num_warps=launch.num_warps)
    return dx


def _launch_fuse_fwd_epilogue(out: torch.Tensor, gw2: torch.Tensor, fold: torch.Tensor, ids: torch.Tensor) -> None:
    """In place: out [B,T,D] (contiguous) += gw2 [B*K,D] - fold [D] at the kept rows ids [B,K]."""
    B, T, D = out.shape
    K = ids.shape[1]
    if B * K == 0:
        return
    launch = row_launch(B * K, D, "sprint_fuse_fwd")
    _sprint_fuse_fwd_kernel[launch.grid](
        out, gw2.contiguous(), fold.contiguous(), ids.contiguous(), B * K, K, T, D,
        BLOCK_D=launch.block_d, ROWS=launch.rows, COMPUTE=tl_compute_dtype(out.dtype), INDEX=index_dtype(out, gw2),
        num_warps=launch.num_warps)


def _launch_fuse_bwd_reduce(dout: torch.Tensor, ids: torch.Tensor, alloc=empty_output):
    """dout [B,T,D], ids [B,K] -> (dout at the kept rows [B,K,D], column sums of dout over all rows
    [D] and over the dropped rows [D], both in the accumulation dtype)."""
    B, T, D = dout.shape
    K = ids.shape[1]
    dout = dout.contiguous()
    dkept = alloc((B, K, D), dout.dtype, dout.device)
    launch = row_launch(B * T, D, "sprint_fuse_bwd")
    split = split_launch(1, launch.grid[0], dout.device)  # one group: the sums run over all rows
    part = alloc((split.splits, 2, D), compute_dtype(dout.dtype), dout.device)
    _sprint_fuse_bwd_kernel[split.grid](
        dout, ids.contiguous(), dkept, part, B * T, K, T, D, split.tiles_per_program,
        BLOCK_D=launch.block_d, BLOCK_K=triton.next_power_of_2(max(K, 1)), ROWS=launch.rows,
        COMPUTE=tl_compute_dtype(dout.dtype), INDEX=index_dtype(dout, dkept), num_warps=launch.num_warps)
    sums = part.sum(0)  # [2, D]
    return dkept, sums[0], sums[1]


def _sprint_fuse_fwd(x_enc, g, ids, mask_token, weight, bias, alloc=empty_output):
    """The forward of sprint_fuse (all inputs of one dtype) -> out [B,T,D], every element written."""
    B, T, D = x_enc.shape
    W1, W2 = weight[:, :D], weight[:, D:]  # [D, D] views (row stride 2D: cuBLAS takes it as is)
    out = alloc((B, T, D), x_enc.dtype, x_enc.device)
    o2 = out.view(B * T, D)
    x2 = x_enc.reshape(B * T, D)
    if g is not None and ids is None:  # no routing: out = x_enc W1^T + b + g W2^T
        if bias is None:
            torch.mm(x2, W1.t(), out=o2)
        else:
            torch.addmm(bias, x2, W1.t(), out=o2)
        o2.addmm_(g.reshape(B * T, D), W2.t())  # cuBLAS beta = 1
        return out
    # b + m W2^T accumulated in the compute dtype, as the single GEMM of the reference accumulates
    # it, and rounded once, into the bias: a bf16 m W2^T would round it once more (by up to half a
    # bf16 step of m W2^T, which can be far larger than the output itself)
    acc = compute_dtype(x_enc.dtype)
    m, b_acc = mask_token.reshape(D).to(acc), None if bias is None else bias.to(acc)
    folded = torch.mv(W2.to(acc), m) if bias is None else torch.addmv(b_acc, W2.to(acc), m)  # [D]
    bias_m = folded.to(x_enc.dtype)  # [D]: [MASK] folded into the bias
    torch.addmm(bias_m, x2, W1.t(), out=o2)  # every row as if dropped
    if g is not None:  # routed: take back at the kept rows what the bias gained (promoted to acc)
        gw2 = torch.mm(g.reshape(-1, D), W2.t())  # [B*K, D]
        _launch_fuse_fwd_epilogue(out, gw2, bias_m.to(acc) if bias is None else bias_m - b_acc, ids)
    return out


def _sprint_fuse_bwd(dout, x_enc, g, ids, mask_token, weight, has_bias: bool, alloc=empty_output):
    """-> (d x_enc, d g or [0], d mask_token or [0], d weight, d bias or [0]), in the inputs' dtypes."""
    B, T, D = x_enc.shape
    W1, W2 = weight[:, :D], weight[:, D:]
    d2 = dout.reshape(B * T, D)
    x2 = x_enc.reshape(B * T, D)
    acc = compute_dtype(dout.dtype)
    dweight = alloc((D, 2 * D), weight.dtype, weight.device)  # both halves written below
    dx = torch.mm(d2, W1).view(B, T, D)  # dout W1
    torch.mm(d2.t(), x2, out=dweight[:, :D])  # dout^T x_enc
    dmask = absent_grad(dout)
    if g is not None and ids is None:  # no routing: m unused
        dg = torch.mm(d2, W2).view(B, T, D)  # dout W2
        torch.mm(d2.t(), g.reshape(B * T, D), out=dweight[:, D:])  # dout^T g
        db = d2.sum(0, dtype=acc)
    else:
        if g is None:  # path drop: every row is dropped
            db = d2.sum(0, dtype=acc)
            s_drop = db
        else:
            dkept, db, s_drop = _launch_fuse_bwd_reduce(dout, ids, alloc)  # [B,K,D], [D], [D]
        m = mask_token.reshape(D)
        dmask = (s_drop @ W2.to(acc)).to(mask_token.dtype).view(1, 1, D)  # s W2, accumulated in acc
        outer = torch.outer(s_drop, m.to(acc)).to(weight.dtype)  # s^T m [D, D]
        if g is None:
            dg = absent_grad(dout)
            dweight[:, D:].copy_(outer)
        else:
            k2 = dkept.view(-1, D)
            dg = torch.mm(k2, W2).view(g.shape)  # dout[kept] W2
            torch.addmm(outer, k2.t(), g.reshape(-1, D), out=dweight[:, D:])  # s^T m + dout[kept]^T g
    dbias = db.to(dout.dtype) if has_bias else absent_grad(dout)
    return dx, dg, dmask, dweight, dbias


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("srdit::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    _check_ids(ids, x.shape[1])
    return _launch_gather_fwd(x, ids)


@_gather_tokens_op.register_fake
def _(x, ids):
    return x.new_empty((x.shape[0], ids.shape[1], *x.shape[2:]))


@torch.library.custom_op("srdit::gather_tokens_bwd", mutates_args=())
def _gather_tokens_bwd_op(dout: torch.Tensor, ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return _launch_gather_bwd(dout, ids, num_tokens)


@_gather_tokens_bwd_op.register_fake
def _(dout, ids, num_tokens):
    return dout.new_empty((dout.shape[0], num_tokens, *dout.shape[2:]))


def _gather_tokens_setup(ctx, inputs, output):
    x, ids = inputs
    ctx.save_for_backward(ids)
    ctx.num_tokens = x.shape[1]


def _gather_tokens_backward(ctx, dout):
    (ids,) = ctx.saved_tensors
    return _gather_tokens_bwd_op(dout, ids, ctx.num_tokens), None


_gather_tokens_op.register_autograd(_gather_tokens_backward, setup_context=_gather_tokens_setup)


@torch.library.custom_op("srdit::sprint_fuse", mutates_args=())
def _sprint_fuse_op(x_enc: torch.Tensor, g: Optional[torch.Tensor], ids: Optional[torch.Tensor],
                    mask_token: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if ids is not None:
        _check_ids(ids, x_enc.shape[1])
    with torch.autocast(x_enc.device.type, enabled=False):
        return _sprint_fuse_fwd(x_enc, g, ids, mask_token, weight, bias)


@_sprint_fuse_op.register_fake
def _(x_enc, g, ids, mask_token, weight, bias):
    return x_enc.new_empty(x_enc.shape)


@torch.library.custom_op("srdit::sprint_fuse_bwd", mutates_args=())
def _sprint_fuse_bwd_op(dout: torch.Tensor, x_enc: torch.Tensor, g: Optional[torch.Tensor], ids: Optional[torch.Tensor],
                        mask_token: torch.Tensor, weight: torch.Tensor, has_bias: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(dout.device.type, enabled=False):
        return _sprint_fuse_bwd(dout, x_enc, g, ids, mask_token, weight, has_bias)


@_sprint_fuse_bwd_op.register_fake
def _(dout, x_enc, g, ids, mask_token, weight, has_bias):
    D = x_enc.shape[2]
    dg = absent_grad(dout) if g is None else g.new_empty(g.shape)
    dmask = absent_grad(dout) if g is not None and ids is None else mask_token.new_empty((1, 1, D))
    dbias = dout.new_empty((D,)) if has_bias else absent_grad(dout)
    return dout.new_empty(x_enc.shape), dg, dmask, weight.new_empty(weight.shape), dbias


def _sprint_fuse_setup(ctx, inputs, output):
    x_enc, g, ids, mask_token, weight, bias = inputs
    ctx.save_for_backward(x_enc, g, ids, mask_token, weight)
    ctx.has_g, ctx.has_ids, ctx.has_bias = g is not None, ids is not None, bias is not None


def _sprint_fuse_backward(ctx, dout):
    x_enc, g, ids, mask_token, weight = ctx.saved_tensors
    dx, dg, dmask, dweight, dbias = _sprint_fuse_bwd_op(
        dout.contiguous(), x_enc, g if ctx.has_g else None, ids if ctx.has_ids else None,
        mask_token, weight, ctx.has_bias)
    routed_or_dropped = ctx.has_ids or not ctx.has_g  # m takes part only then (as in the reference)
    return (dx, dg if ctx.has_g else None, None, dmask if routed_or_dropped else None, dweight,
            dbias if ctx.has_bias else None)


_sprint_fuse_op.register_autograd(_sprint_fuse_backward, setup_context=_sprint_fuse_setup)


# --------------------------------------------------------------------------- public functions


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B,T,...], ids [B,K] int (unique within a sample) -> x at the kept ids [B,K,...]."""
    if x.dim() < 2 or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens needs x [B,T,...] and ids [B,K], got {tuple(x.shape)} and {tuple(ids.shape)}")
    return _gather_tokens_op(x, ids)


def sprint_fuse(x_enc, g, ids, mask_token, weight, bias):
    """SPRINT's sparse-dense fusion Linear(2D -> D)(concat(x_enc, pad(g))) without the concat.

    x_enc [B,T,D]; g [B,K,D] at kept ids [B,K] (unique within a sample), or [B,T,D] with ids=None
    (no routing), or None (path drop); mask_token [1,1,D]; weight [D,2D]; bias [D] or None.
    Returns [B,T,D] in x_enc's dtype (the autocast dtype under autocast, as F.linear).
    """
    B, T, D = x_enc.shape
    if weight.shape != (D, 2 * D) or mask_token.numel() != D or (bias is not None and bias.shape != (D,)):
        got_bias = None if bias is None else tuple(bias.shape)
        raise ValueError(f"sprint_fuse: weight must be [{D},{2 * D}], mask_token [1,1,{D}], bias [{D}]; got "
                         f"{tuple(weight.shape)}, {tuple(mask_token.shape)}, {got_bias}")
    if g is not None:
        K = T if ids is None else ids.shape[1]
        if g.shape != (B, K, D) or (ids is not None and ids.shape != (B, K)):
            raise ValueError(f"sprint_fuse: g must be [B,K,D] with ids [B,K], or [B,T,D] with ids=None; got "
                             f"g {tuple(g.shape)}, ids {None if ids is None else tuple(ids.shape)}, x_enc {(B, T, D)}")
    x_enc, g, mask_token, weight, bias = gemm_operands(x_enc, g, mask_token, weight, bias)
    return _sprint_fuse_op(x_enc, g, ids, mask_token, weight, bias)

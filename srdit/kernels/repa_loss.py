"""The REPA loss's per-token cosine similarity, fused: one row kernel forward, one backward.

Math (rows r = (b, t) of pred p and target q [B, T, d]; eps = 1e-12, F.normalize's):
    P_r   = max(||p_r||_2, eps),   Q_r = max(||q_r||_2, eps)
    cos_r = <p_r / P_r, q_r / Q_r> = <p_r, q_r> / (P_r Q_r)                     -> cos [B, T]
The REPA loss is mean over tokens of -cos, in torch (srdit/train/loss.py repa_loss); the eager
twin is srdit.kernels.reference.repa_cosine, the release's sum(normalize(q) * normalize(p)).

Backward: the gradient of pred only. The target is the frozen teacher's output, so a target
that requires a gradient is refused (RuntimeError) rather than given a silent None.
normalize's backward, y = x / max(||x||, eps), for an upstream gradient g (torch's clamp_min
passes its gradient where ||x|| >= eps, and the norm's backward is (x / ||x||) g):
    ||x|| >= eps:  dx = (g - y <y, g>) / ||x||
    ||x|| <  eps:  dx = g / eps                 (the clamp is a constant: y = x / eps)
With y = p / P and g = dcos_r * q_r / Q_r, <y, g> = dcos_r cos_r, so
    dp_r = dcos_r / P_r * (q_r / Q_r - [||p_r|| >= eps] cos_r p_r / P_r)
(a zero row of pred gets dcos_r * q_r / (eps Q_r), as torch's autograd gives it).

Precision: pred and target are read in their own dtypes (pred bf16 from the projector under
autocast; target fp32 from the online teacher or fp16 as cached, with no cast pass before the
loss) and upcast to the compute dtype as loaded (fp32; fp64 when either is fp64, so gradcheck
runs these kernels). The three row sums (||p||^2, ||q||^2, <p, q>) and cos are in it, cos is
stored in it: what the eager loss computes under CUDA autocast, where F.normalize runs in fp32.
eps is a constant of the compute dtype, as torch's clamp takes it (a float kernel argument would
be fp32, off by 4e-9 for fp64). dpred is stored in pred's dtype. Saved for backward: pred (the
projector's output; the eager loss saves it too, and the normalised target in fp32 besides) and
target (the teacher's, which the step holds anyway); the backward recomputes P, Q and cos,
which costs no bytes: it reads both rows anyway.

Bytes per call (R = B*T rows of d, sp and sq bytes per element of pred and target, c = 4 bytes
of the compute dtype, 8 for fp64):
    fwd: read R*d*(sp + sq);          write R*c
    bwd: read R*d*(sp + sq) + R*c;    write R*d*sp
Under bf16 autocast with fp32 targets that is 6 and 8 bytes per element of [R, d], one launch
each way, where the eager loss moves ~36 in 8 launches forward and ~94 in 17 backward
(bench/traffic.py's counts, sr-dit-b1-256). Cached fp16 targets are read as stored (4 and 6
bytes), where the eager step casts them to fp32 first (6 bytes more).

Launch settings: GPU_TILES' "repa_cosine_fwd" and "repa_cosine_bwd" (2 rows of 1024 for d = 768:
two [ROWS, BLOCK_D] tensors live forward, three backward), swept by bench/kernels.py --sweep.
"""
import torch
import triton
import triton.language as tl

from srdit.kernels.triton_utils import (compute_dtype, empty_output, index_dtype, row_launch, tl_compute_dtype,
                                        unit_last_stride)

Tensor = torch.Tensor

EPS = 1e-12  # F.normalize's default, the release's
TILE_FWD, TILE_BWD = "repa_cosine_fwd", "repa_cosine_bwd"  # GPU_TILES keys


@triton.jit
def _load_rows(pred_ptr, target_ptr, n_rows, T, D, stride_pred_b, stride_pred_t, stride_target_b, stride_target_t,
               COMPUTE: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows r = b*T + t of pred and target (views with unit last stride, e.g. the
    teacher's patch tokens teacher[:, 1:]) in COMPUTE, padded with 0: (rows, row_mask, mask, p, q)."""
    rows = tl.program_id(0).to(INDEX) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < D)[None, :]
    b = rows // T
    t = rows - b * T
    p_offs = (b * stride_pred_b + t * stride_pred_t)[:, None] + cols[None, :]  # [ROWS, BLOCK_D]
    q_offs = (b * stride_target_b + t * stride_target_t)[:, None] + cols[None, :]
    p = tl.load(pred_ptr + p_offs, mask=mask, other=0.0).to(COMPUTE)
    q = tl.load(target_ptr + q_offs, mask=mask, other=0.0).to(COMPUTE)
    return rows, row_mask, mask, p, q


@triton.jit
def _cosine(p, q, EPS: tl.constexpr):
    """Per row of p, q [ROWS, BLOCK_D] (padded lanes 0): cos [ROWS], 1/P, 1/Q, and ||p|| >= eps."""
    eps = tl.full([], EPS, p.dtype)  # in the compute dtype: a float argument would be fp32's 1e-12
    p_norm = tl.sqrt(tl.sum(p * p, axis=1))
    rp = 1.0 / tl.maximum(p_norm, eps)
    rq = 1.0 / tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), eps)
    return tl.sum(p * q, axis=1) * rp * rq, rp, rq, p_norm >= eps


@triton.jit(do_not_specialize=["n_rows"])  # batch-dependent: one compile for every batch
def _repa_cosine_fwd_kernel(
    pred_ptr, target_ptr,  # inputs [B, T, d], each in its own dtype, unit last stride
    cos_ptr,  # output [B*T] in COMPUTE
    n_rows, T, D, stride_pred_b, stride_pred_t, stride_target_b, stride_target_t,
    EPS: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_mask, _, p, q = _load_rows(pred_ptr, target_ptr, n_rows, T, D, stride_pred_b, stride_pred_t,
                                         stride_target_b, stride_target_t, COMPUTE, INDEX, ROWS, BLOCK_D)
    cos, _, _, _ = _cosine(p, q, EPS)
    tl.store(cos_ptr + rows, cos, mask=row_mask)


@triton.jit(do_not_specialize=["n_rows"])
def _repa_cosine_bwd_kernel(
    dcos_ptr, pred_ptr, target_ptr,  # inputs: dcos [B*T] in COMPUTE; pred, target as forward
    dpred_ptr,  # output [B*T, d] in pred's dtype
    n_rows, T, D, stride_pred_b, stride_pred_t, stride_target_b, stride_target_t,
    EPS: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_mask, mask, p, q = _load_rows(pred_ptr, target_ptr, n_rows, T, D, stride_pred_b, stride_pred_t,
                                            stride_target_b, stride_target_t, COMPUTE, INDEX, ROWS, BLOCK_D)
    cos, rp, rq, p_above_eps = _cosine(p, q, EPS)
    dcos = tl.load(dcos_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE)
    along_p = tl.where(p_above_eps, cos * rp, 0.0)  # below eps the clamped norm is a constant
    dp = (dcos * rp)[:, None] * (q * rq[:, None] - p * along_p[:, None])
    offs = rows[:, None] * D + tl.arange(0, BLOCK_D)[None, :]
    tl.store(dpred_ptr + offs, dp.to(dpred_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host launchers


def _check(pred: Tensor, target: Tensor) -> None:
    """Shapes the kernels assume; called by the launchers and the fakes (so compile checks too)."""
    if pred.dim() != 3 or target.shape != pred.shape:
        raise ValueError(f"repa_cosine: pred and target must be [B, T, d] of one shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")


def _cos_dtype(pred: Tensor, target: Tensor) -> torch.dtype:
    """cos's dtype, the compute dtype of the pair: fp64 if either is fp64, else fp32."""
    return compute_dtype(target.dtype if target.dtype == torch.float64 else pred.dtype)


def _args(pred: Tensor, target: Tensor, kernel: str):
    """The launch (row_launch of `kernel`), and the kernels' shared arguments after the tensors."""
    B, T, D = pred.shape
    launch = row_launch(B * T, D, kernel)
    return launch, (B * T, T, D, pred.stride(0), pred.stride(1), target.stride(0), target.stride(1))


def _launch_fwd(pred: Tensor, target: Tensor, *, alloc=empty_output) -> Tensor:
    """Runs the forward kernel; returns cos [B, T] in the compute dtype. `alloc` makes the output
    (the tests pass one that fills it with NaN, so an unwritten element fails)."""
    _check(pred, target)
    pred, target = unit_last_stride(pred), unit_last_stride(target)
    cos = alloc(pred.shape[:2], _cos_dtype(pred, target), pred.device)
    if cos.numel() == 0:
        return cos
    launch, args = _args(pred, target, TILE_FWD)
    _repa_cosine_fwd_kernel[launch.grid](
        pred, target, cos, *args,
        EPS=EPS, COMPUTE=tl_compute_dtype(cos.dtype), INDEX=index_dtype(pred, target), ROWS=launch.rows,
        BLOCK_D=launch.block_d, num_warps=launch.num_warps,
    )
    return cos


def _launch_bwd(dcos: Tensor, pred: Tensor, target: Tensor, *, alloc=empty_output) -> Tensor:
    """Runs the backward kernel; returns dpred [B, T, d] in pred's dtype (contiguous). dcos [B, T]
    in the compute dtype (cos's); `alloc` as in _launch_fwd."""
    _check(pred, target)
    pred, target = unit_last_stride(pred), unit_last_stride(target)
    dcos = dcos.to(_cos_dtype(pred, target)).contiguous()  # autograd's [B, T] gradient may be an expand
    dpred = alloc(pred.shape, pred.dtype, pred.device)
    if dpred.numel() == 0:
        return dpred
    launch, args = _args(pred, target, TILE_BWD)
    _repa_cosine_bwd_kernel[launch.grid](
        dcos, pred, target, dpred, *args,
        EPS=EPS, COMPUTE=tl_compute_dtype(dcos.dtype), INDEX=index_dtype(pred, target, dpred), ROWS=launch.rows,
        BLOCK_D=launch.block_d, num_warps=launch.num_warps,
    )
    return dpred


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("srdit::repa_cosine", mutates_args=())
def _repa_cosine_op(pred: Tensor, target: Tensor) -> Tensor:
    return _launch_fwd(pred, target)


@_repa_cosine_op.register_fake
def _(pred, target):
    _check(pred, target)
    return pred.new_empty(pred.shape[:2], dtype=_cos_dtype(pred, target))


@torch.library.custom_op("srdit::repa_cosine_bwd", mutates_args=())
def _repa_cosine_bwd_op(dcos: Tensor, pred: Tensor, target: Tensor) -> Tensor:
    return _launch_bwd(dcos, pred, target)


@_repa_cosine_bwd_op.register_fake
def _(dcos, pred, target):
    _check(pred, target)
    return pred.new_empty(pred.shape)


def _setup(ctx, inputs, output):
    if ctx.needs_input_grad[1]:
        raise RuntimeError("repa_cosine: the target requires a gradient, and this op differentiates pred only "
                           "(the target is the frozen teacher's features); pass target.detach()")
    ctx.save_for_backward(*inputs)


def _backward(ctx, dcos):
    pred, target = ctx.saved_tensors
    return torch.ops.srdit.repa_cosine_bwd(dcos, pred, target), None


_repa_cosine_op.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------- public function


def repa_cosine(pred: Tensor, target: Tensor) -> Tensor:
    """pred, target [B, T, d] in any float dtypes -> cos [B, T] = <normalize(pred), normalize(target)>
    in fp32 (fp64 for fp64 inputs); differentiable in pred only."""
    return torch.ops.srdit.repa_cosine(pred, target)

"""What every Triton op file of srdit shares, in one place (STYLE 5): launch settings, dtypes,
output allocation, and the @triton.jit pieces more than one kernel uses.

Host side
    GPU_TILES, row_launch, split_launch
                                launch settings of row kernels and of row kernels that also sum
                                over rows; both fail, naming the limit, outside their range
    GEMM_TILES, gemm_launch     launch settings of the GEMM kernels (srdit/kernels/mlp.py)
    gpu_settings                the switch: GPU settings on a GPU, or anywhere with SRDIT_LAUNCH=gpu
    index_dtype                 int32 offsets where every tensor is below 2^31 elements, else int64
    compute_dtype, tl_compute_dtype
                                the dtype kernels compute and accumulate in: fp32, or fp64 for
                                fp64 tensors (so gradcheck runs the same kernels)
    tl_dtype                    a torch floating dtype as Triton's (where a kernel rounds)
    empty_output                the default `alloc(shape, dtype, device)` of every launcher; the
                                tests pass one that fills the buffer with NaN instead
    absent_grad                 the empty tensor a custom op returns for a gradient that does not
                                exist (a custom op cannot return None)
    unit_last_stride            a tensor with unit last stride, copied only when it has none
    forward_only                the refusal of a forward-only op (the teacher's) whose inputs need
                                a gradient
Device side (@triton.jit, inlined into the kernels that call them)
    head_rows                   a program's (token, head) rows of a [B, N, H, Dh] layout
    load_rope_tables            the cos/sin rows of those tokens (identity rows for a negative id)
    rotate_pairs                RoPE's rotation of adjacent pairs, or its transpose
    rms_normalize               x * rstd with rstd = 1 / sqrt(mean(x^2) + eps), per row
    rms_normalize_bwd           the input gradient of rms_normalize
    round_to                    a cast to the output dtype rounded to nearest, ties to even,
                                also for bf16 under the interpreter (whose cast truncates)

Naming in every kernel: a pointer argument is `<tensor>_ptr` (per-program partial sums of a
gradient: `<grad>_part_ptr`); a stride is `stride_<tensor>_<dim>` (`stride_x_b`, `stride_v0_ids_n`),
with <tensor> the pointer's name without `_ptr` and <dim> the letter of the shape in the
docstring; the compute dtype is the constexpr COMPUTE; a program's rows are ROWS, the power-of-two
block over a row's width is BLOCK_<width symbol>.

Design notes (why these tile sizes, what the interpreter costs, registers per kernel):
docs/kernels.md.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROW_WIDTH = 16384  # one row must fit in registers/SRAM of one program
INT32_LIMIT = 2**31  # element offsets below this are computed in int32 (index_dtype)


# --------------------------------------------------------------------------- launch settings

LAUNCH_ENV = "SRDIT_LAUNCH"  # "gpu": the GPU's launch settings even under the interpreter
GPU_SM_COUNT = 132  # SMs of an H100 SXM / H200: the GPU settings' program count away from a GPU
INTERPRETER_ELEMENTS = 16384  # elements per program under the interpreter (its cost is per program)


@dataclass(frozen=True)
class Tile:
    """A kernel's launch settings on a GPU: at most `elements` (ROWS * BLOCK_D) per program, and
    `warps` warps."""
    elements: int
    warps: int = 4


# Every kernel's GPU settings, forward and backward apart, 4 warps (128 threads) each: tiles that
# keep a program well inside the register budget (<= 128 registers per thread, no spills, fp32
# and bf16, sm_90a and sm_100a: bench/compile_check.py, enforced in CI; the figures are in
# bench/RESULTS.md "Compiled resources"). Values per thread = elements / 128 for each live
# [ROWS, BLOCK_D] tensor: 8 where 4-6 tensors are live at once (the backward kernels), 16 where
# 2-4 are, 32 for the kernels that move one tensor. bench/kernels.py --sweep times candidates of
# each on a GPU; a recorded winner replaces the default here.
GPU_TILES = {
    "rmsnorm_fwd": Tile(2048),  # 2 rows of 1024 (D = 768): x, f, y, shift/scale rows; <= 56 registers
    "rmsnorm_bwd": Tile(1024),  # 1 row: dy, x, dx_new, f, dx live, plus 4 accumulator rows; <= 96
    "apply_rope": Tile(4096),  # 64 (token, head) rows of Dh = 64: x and the two table tiles; <= 94
    "attention_prologue_fwd": Tile(1024),  # 16 rows: q, k, v, v0 and the tables; <= 56
    "attention_prologue_bwd": Tile(1024),  # 16 rows: three gradients, q, k, v, v0, tables; <= 80
    "gather_tokens": Tile(4096),  # 4 rows of 1024: a copy; <= 40
    "sprint_fuse_fwd": Tile(4096),  # 4 rows: base, gW2; <= 62
    "sprint_fuse_bwd": Tile(2048),  # 2 rows: dout, 2 accumulator tiles, the slot search; <= 80
    "layer_norm_fwd": Tile(2048),  # 2 rows: x, f, x_new / y, gamma, w, b rows (teacher, forward only)
    "repa_cosine_fwd": Tile(2048),  # 2 rows of 1024 (d = 768): pred, target; <= 44 registers
    "repa_cosine_bwd": Tile(2048),  # 2 rows: pred, target, dpred; <= 56
}


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU interpreter used by the test suite)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_settings() -> bool:
    """True when launchers pick the GPU's settings (GPU_TILES; split_launch's programs per SM):
    on a GPU, and under the interpreter with SRDIT_LAUNCH=gpu, which is how the tests run the
    settings a GPU runs (and bench/compile_check.py records them). Unset or "auto": the
    interpreter's own larger tiles and 4 programs when interpreting."""
    value = os.environ.get(LAUNCH_ENV, "auto")
    if value not in ("auto", "gpu"):
        raise ValueError(f"{LAUNCH_ENV}={value!r}: use 'gpu' (GPU launch settings everywhere) or 'auto'")
    return value == "gpu" or not interpreting()


@dataclass(frozen=True)
class RowLaunch:
    block_d: int  # power-of-two block covering one row (masked beyond D)
    rows: int  # rows handled by one program
    num_warps: int
    grid: tuple[int]


def row_launch(n_rows: int, width: int, kernel: str) -> RowLaunch:
    """Launch settings of `kernel` (a key of GPU_TILES) over `n_rows` rows of `width` elements:
    one row in one power-of-two block, GPU_TILES[kernel] elements per program on a GPU (never
    fewer than one row; a function of the width only, so the compiled specialisation does not
    depend on the batch), INTERPRETER_ELEMENTS under the interpreter (capped by the rows there
    are).

    Fails, naming the limit, outside the supported range instead of launching a wrong kernel.
    """
    if width < 1 or n_rows < 1:
        raise ValueError(f"row kernel needs n_rows >= 1 and width >= 1, got {n_rows} x {width}")
    if width > MAX_ROW_WIDTH:
        raise ValueError(f"row width {width} exceeds {MAX_ROW_WIDTH}; this kernel keeps a row in one program")
    block_d = triton.next_power_of_2(width)
    if gpu_settings():
        tile = GPU_TILES[kernel]
        rows, num_warps = max(1, tile.elements // block_d), tile.warps
    else:
        rows = max(1, min(INTERPRETER_ELEMENTS // block_d, triton.next_power_of_2(n_rows)))
        num_warps = 4
    return RowLaunch(block_d, rows, num_warps, (triton.cdiv(n_rows, rows),))


@dataclass(frozen=True)
class SplitLaunch:
    splits: int  # programs per group
    tiles_per_program: int  # row tiles one program loops over (the last program's may run past the group)
    grid: tuple[int, int]  # (groups, splits)


def split_launch(n_groups: int, tiles_per_group: int, device, *, programs: int | None = None) -> SplitLaunch:
    """Programs for a row kernel that also sums over the rows of each group (a norm backward's
    dweight/dshift): each program loops over consecutive row tiles of one group and writes one
    partial sum, so the partial buffer is [groups, splits, D] and the final sum is deterministic.

    `programs` is the total wanted (at least one per group, at most one per tile). None: ~4 per SM
    with the GPU settings (the device's SMs on a GPU, GPU_SM_COUNT elsewhere), 4 under the
    interpreter.
    """
    if n_groups < 1 or tiles_per_group < 1:
        raise ValueError(f"split launch needs n_groups >= 1 and tiles_per_group >= 1, "
                         f"got {n_groups}, {tiles_per_group}")
    target = programs or (4 * sm_count(device) if gpu_settings() else 4)
    splits = min(tiles_per_group, triton.cdiv(target, n_groups))
    tiles = triton.cdiv(tiles_per_group, splits)
    splits = triton.cdiv(tiles_per_group, tiles)  # no program without a tile
    return SplitLaunch(splits, tiles, (n_groups, splits))


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """SMs of a CUDA device; GPU_SM_COUNT for any other (the GPU settings away from a GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return GPU_SM_COUNT
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def index_dtype(*tensors):
    """tl.int32 when every element offset into `tensors` (None skipped), and the masked offsets a
    launch computes past their end, stay below INT32_LIMIT (all of SR-DiT's: its largest
    tensor, qkv at B = 256, 512 px, has 604M elements), else
    tl.int64: the kernels' INDEX constexpr. 32-bit offsets halve the registers an address takes
    and turn 64-bit divisions into 32-bit ones."""
    span = max((1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + t.storage_offset()
                if t.numel() else 0) for t in tensors if t is not None)
    # twice the span: room for the masked offsets of a last tile (or a split's last tiles) past the end
    return tl.int32 if 2 * span < INT32_LIMIT else tl.int64


@dataclass(frozen=True)
class GemmTile:
    """A GEMM kernel's block of the output (block_m x block_n), its step along K, the warps and
    the pipeline stages of its K loop, and GROUP_M: output rows of blocks launched together so
    that their operand tiles are reused from L2."""
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    group_m: int = 8


# Hopper's usual bf16 tile: 128 x 128 outputs in fp32 (64 accumulator registers per thread at 8
# warps, two warpgroups of wgmma), K in steps of 64, 3 stages of operand tiles in shared memory
# (96 KiB). fp32 operands ("_exact": multiplied exactly, no tensor cores, the fp32 training
# precision) take a quarter of the tile: at 128 x 128 they need 255 registers and spill. A GEMM
# is compute-bound: it is budgeted on spills and 8 resident warps (one program per SM), not the
# row kernels' 16 (bench/compile_check.py). bench/kernels.py times the MLP against cuBLAS plus
# the separate GELU passes (gelu_mlp, linear_gelu) and --sweep times candidate tiles (GEMM_SWEEP)
# on a GPU; a recorded winner replaces the default here.
GEMM_TILES = {
    "gemm_act_fwd": GemmTile(128, 128, 64, warps=8, stages=3),  # <= 157 registers (exact GELU)
    "gemm_act_bwd": GemmTile(128, 128, 64, warps=8, stages=3),  # + h and the bias-gradient sums; <= 152
    "gemm_act_fwd_exact": GemmTile(64, 64, 32, warps=4, stages=2),
    "gemm_act_bwd_exact": GemmTile(64, 64, 32, warps=4, stages=2),
}
# under the interpreter a program costs per op, not per element: INTERPRETER_ELEMENTS outputs a
# program, a long K step (the tests set a small tile to cover several blocks and a K remainder)
INTERPRETER_GEMM_TILE = GemmTile(128, 128, 128, warps=4, stages=1)


@dataclass(frozen=True)
class GemmLaunch:
    tile: GemmTile
    m_blocks: int
    grid: tuple[int]


def gemm_launch(M: int, N: int, kernel: str, dtype: torch.dtype = torch.bfloat16) -> GemmLaunch:
    """Launch settings of the GEMM `kernel` (a key of GEMM_TILES) for an [M, N] output of
    `dtype` operands: one program per output block, GEMM_TILES on a GPU (the "_exact" tile for
    fp32/fp64), INTERPRETER_GEMM_TILE under the interpreter."""
    if M < 1 or N < 1:
        raise ValueError(f"GEMM needs M >= 1 and N >= 1, got {M} x {N}")
    exact = "_exact" if dtype in (torch.float32, torch.float64) else ""
    tile = GEMM_TILES[kernel + exact] if gpu_settings() else INTERPRETER_GEMM_TILE
    m_blocks = triton.cdiv(M, tile.block_m)
    return GemmLaunch(tile, m_blocks, (m_blocks * triton.cdiv(N, tile.block_n),))


# --------------------------------------------------------------------------- dtypes and buffers


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype kernels compute and accumulate in for tensors of `dtype`: fp64 stays fp64,
    everything else (fp32, fp16, bf16) computes in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_compute_dtype(dtype: torch.dtype):
    """compute_dtype as a Triton dtype, for a kernel's COMPUTE constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype (a constexpr naming where a kernel rounds)."""
    return {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def empty_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """The default `alloc` of the launchers: an uninitialised buffer for a kernel to fill. The
    tests pass an allocator with the same signature that fills it with NaN, so an element a
    kernel forgets to write fails the comparison."""
    return torch.empty(shape, dtype=dtype, device=device)


def absent_grad(like: torch.Tensor) -> torch.Tensor:
    """The stand-in for a gradient that does not exist (its input was None): a custom op returns
    no None, and its outputs must not alias each other, so each stand-in is its own empty tensor
    on `like`'s device; the autograd backward turns it back into None."""
    return like.new_empty((0,))


def unit_last_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """t itself when its last stride is 1 (views such as adaLN chunks or a slice of qkv stay
    views), else a contiguous copy; None stays None."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def forward_only(name: str, *tensors: torch.Tensor | None) -> None:
    """Refuse, with the fix, a call of the forward-only op srdit.kernels.`name` (the frozen
    teacher's: no backward) whose inputs need a gradient, instead of a custom op without a
    backward failing later."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"srdit.kernels.{name} is forward only (the frozen teacher's) and got inputs that "
                           "require a gradient; call it under torch.no_grad() or with frozen weights")


# --------------------------------------------------------------------------- device helpers


@triton.jit
def head_rows(n_rows, N, H, Dh, INDEX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (token, head) rows of a [B, N, H, Dh] layout: row ids r [ROWS] (INDEX, so
    that the divisions by H and N are 32-bit ones with index_dtype's int32), lanes d [BLOCK_D],
    the row, lane and tile masks, and the coordinates b, n, h of each row."""
    r = tl.program_id(0).to(INDEX) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    row_mask = r < n_rows
    d_mask = d < Dh
    token = r // H
    return r, d, row_mask, d_mask, row_mask[:, None] & d_mask[None, :], token // N, token % N, r % H


@triton.jit
def load_rope_tables(cos_ptr, sin_ptr, ids_ptr, b, n, stride_ids_b, stride_ids_n, stride_cos_p, d, row_mask, d_mask,
                     COMPUTE: tl.constexpr):
    """cos/sin rows [ROWS, BLOCK_D] in COMPUTE for tokens (b, n) at table row ids[b, n]; rows with
    a negative id get c = 1, s = 0 (not rotated). sin has cos's layout (row stride stride_cos_p)."""
    pos = tl.load(ids_ptr + b * stride_ids_b + n * stride_ids_n, mask=row_mask, other=-1).to(b.dtype)  # [ROWS]
    mask = (row_mask & (pos >= 0))[:, None] & d_mask[None, :]
    offs = pos[:, None] * stride_cos_p + d[None, :]
    c = tl.load(cos_ptr + offs, mask=mask, other=1.0).to(COMPUTE)
    s = tl.load(sin_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    return c, s


@triton.jit
def rotate_pairs(x, c, s, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Rotate adjacent pairs of every row of x [ROWS, BLOCK_D] by the tables c, s [ROWS, BLOCK_D].

    TRANSPOSE=False is RoPE itself; TRANSPOSE=True its transpose (the backward)."""
    xe, xo = tl.split(tl.reshape(x, [ROWS, BLOCK_D // 2, 2]))
    ce, co = tl.split(tl.reshape(c, [ROWS, BLOCK_D // 2, 2]))
    se, so = tl.split(tl.reshape(s, [ROWS, BLOCK_D // 2, 2]))
    if TRANSPOSE:
        ye = xe * ce + xo * so
        yo = xo * co - xe * se
    else:
        ye = xe * ce - xo * se
        yo = xo * co + xe * so
    return tl.reshape(tl.join(ye, yo), [ROWS, BLOCK_D])


@triton.jit
def rms_normalize(x, D, eps):
    """RMSNorm without its weight, per row of x [ROWS, BLOCK_D] (padded lanes hold 0) over the D
    real lanes: returns (xhat = x * rstd [ROWS, BLOCK_D], rstd = 1 / sqrt(mean(x^2) + eps) [ROWS])."""
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    return x * rstd[:, None], rstd


@triton.jit
def rms_normalize_bwd(gw, xhat, rstd, D):
    """Input gradient of rms_normalize per row: dx = rstd * (gw - xhat * mean(gw * xhat)), with gw
    the gradient arriving on xhat (the output gradient times the weight, if any)."""
    c = tl.sum(gw * xhat, axis=1) / D  # [ROWS]
    return (gw - xhat * c[:, None]) * rstd[:, None]


@triton.jit
def round_to(y, OUT: tl.constexpr):
    """y in OUT, rounded to nearest, ties to even, as torch's cast and the GPU's cvt.rn round.
    fp32 -> bf16 by integer arithmetic, because the interpreter's cast truncates (docs/kernels.md):
    the same code then runs, and is tested bit for bit, on the CPU and on the GPU."""
    if OUT == tl.bfloat16 and y.dtype == tl.float32:
        bits = y.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)  # a carry out of the mantissa raises the exponent, as it should
        half = tl.where(y == y, bits >> 16, 0x7FC0)  # NaN's mantissa could carry into the sign
        return half.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(OUT)

"""Launch settings for every Triton kernel in srdit, in one place (STYLE 5).

Row-wise kernels (norms, RoPE, gathers) put one row of width D in one power-of-two block and
several rows in one program. Large tiles matter twice: on a GPU they amortise the launch and
the per-program setup; under TRITON_INTERPRET=1 the cost is per program, so a test with 64-row
tiles runs ~40x faster than with one row per program (TOOLCHAIN.md).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

MAX_ROW_WIDTH = 16384  # one row must fit in registers/SRAM of one program


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU interpreter used by the test suite)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class RowLaunch:
    block_d: int  # power-of-two block covering one row (masked beyond D)
    rows: int  # rows handled by one program
    num_warps: int
    grid: tuple[int]


def row_launch(n_rows: int, width: int, *, max_rows: int | None = None) -> RowLaunch:
    """Launch settings for a kernel over `n_rows` rows of `width` elements each.

    Fails, naming the limit, outside the supported range instead of launching a wrong kernel.
    """
    if width < 1 or n_rows < 1:
        raise ValueError(f"row kernel needs n_rows >= 1 and width >= 1, got {n_rows} x {width}")
    if width > MAX_ROW_WIDTH:
        raise ValueError(f"row width {width} exceeds {MAX_ROW_WIDTH}; this kernel keeps a row in one program")
    block_d = triton.next_power_of_2(width)
    # ~4K-16K elements per program: enough work per program on a GPU, few programs on the CPU
    target = 16384 if interpreting() else 4096
    rows = max(1, min(target // block_d, triton.next_power_of_2(n_rows)))
    if max_rows is not None:
        rows = min(rows, max_rows)
    num_warps = 4 if block_d * rows <= 4096 else 8
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
    on a GPU, enough to fill the card while keeping the partial buffer small; 4 on the CPU (the
    interpreter's cost is per tile either way; a few programs with a loop run the GPU's code path).
    """
    if n_groups < 1 or tiles_per_group < 1:
        raise ValueError(f"split launch needs n_groups >= 1 and tiles_per_group >= 1, "
                         f"got {n_groups}, {tiles_per_group}")
    target = programs or (4 * _sm_count(device) if str(device).startswith("cuda") else 4)
    splits = min(tiles_per_group, triton.cdiv(target, n_groups))
    tiles = triton.cdiv(tiles_per_group, splits)
    splits = triton.cdiv(tiles_per_group, tiles)  # no program without a tile
    return SplitLaunch(splits, tiles, (n_groups, splits))


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device) -> int:
    device = torch.device(device)
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())

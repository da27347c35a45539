"""Launch settings for every Triton kernel in srdit, in one place (STYLE 5).

Row-wise kernels (norms, RoPE, gathers) put one row of width D in one power-of-two block and
several rows in one program. Large tiles matter twice: on a GPU they amortise the launch and
the per-program setup; under TRITON_INTERPRET=1 the cost is per program, so a test with 64-row
tiles runs ~40x faster than with one row per program (TOOLCHAIN.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

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

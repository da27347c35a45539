"""srdit.kernels.triton_utils' launch settings: the SRDIT_LAUNCH switch, the GPU settings it
selects (what a GPU runs; bench/compile_check.py compiles them), the interpreter's, and the
index width."""
import pytest
import torch
import triton.language as tl

from srdit.kernels import triton_utils as tu


def test_the_switch(monkeypatch):
    """Under the interpreter the default is the interpreter's settings; SRDIT_LAUNCH=gpu gives
    the GPU's; anything else is refused with the choices."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(tu.LAUNCH_ENV, raising=False)
    assert not tu.gpu_settings()
    monkeypatch.setenv(tu.LAUNCH_ENV, "gpu")
    assert tu.gpu_settings()
    monkeypatch.setenv(tu.LAUNCH_ENV, "fast")
    with pytest.raises(ValueError, match="'gpu'.*'auto'"):
        tu.gpu_settings()
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv(tu.LAUNCH_ENV, "auto")
    assert tu.gpu_settings()  # compiled kernels always take the GPU settings


@pytest.mark.parametrize("kernel", sorted(tu.GPU_TILES))
def test_gpu_settings_follow_the_table_and_not_the_batch(monkeypatch, kernel):
    monkeypatch.setenv(tu.LAUNCH_ENV, "gpu")
    tile = tu.GPU_TILES[kernel]
    for width in (64, 768):
        launches = [tu.row_launch(n, width, kernel) for n in (1, 257, 256 * 257 * 12)]
        assert {(l.rows, l.block_d, l.num_warps) for l in launches} == {
            (max(1, tile.elements // tu.triton.next_power_of_2(width)), tu.triton.next_power_of_2(width), tile.warps)}


def test_split_programs(monkeypatch):
    """4 programs per SM with the GPU settings (GPU_SM_COUNT away from a GPU), 4 when interpreting."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(tu.LAUNCH_ENV, "gpu")
    split = tu.split_launch(1, 10_000, "cpu")
    assert split.splits * split.tiles_per_program >= 10_000 and split.splits <= 4 * tu.GPU_SM_COUNT
    assert split.splits > 4 * tu.GPU_SM_COUNT - split.splits / split.tiles_per_program - 1
    assert tu.split_launch(256, 65, "cpu").grid == (256, 3)  # rmsnorm backward at batch 256: 22 tiles each
    monkeypatch.setenv(tu.LAUNCH_ENV, "auto")
    assert tu.split_launch(1, 10_000, "cpu").splits == 4


def test_index_width(monkeypatch):
    x = torch.empty(4, 8)
    assert tu.index_dtype(x, None) == tl.int32
    assert tu.index_dtype(x[:, ::2], x.t()) == tl.int32
    monkeypatch.setattr(tu, "INT32_LIMIT", 2 * x.numel())  # room for a tile past the end: twice the span
    assert tu.index_dtype(x) == tl.int64
    assert tu.index_dtype(x[:2]) == tl.int32

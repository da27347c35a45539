"""srdit.kernels.mlp (gelu_mlp: the GELU MLP with GELU in fc1's GEMM and its derivative and the
first bias's gradient in the backward GEMM; linear_gelu: the teacher's fc1 + GELU, forward only)
against its eager twins (srdit.kernels.reference.gelu_mlp, linear_gelu), STYLE 3 and 4.

The launcher tests run a small tile (16 x 16 outputs, K steps of 16, groups of 2 block rows), so
that small shapes cover several blocks in both directions, a partial last block, a K remainder and
the grouped block order; the model-sized tile runs once through the `gpu_launch` fixture. Outputs
come from an allocator that fills them with NaN, so an element the kernel forgets to write fails.
fp16 stands in for bf16 on the CPU (the interpreter truncates fp32 -> bf16; kernels round).
"""
import pytest
import torch
import torch.nn.functional as F

from checks import (DTYPES, DEVICE, assert_close, gpu_launch, poisoned, rand,  # noqa: F401 (a fixture)
                    within_one_rounding)
from srdit.kernels import mlp, reference, triton_utils
from srdit.kernels.triton_utils import GemmTile, gemm_launch

SMALL_TILE = GemmTile(16, 16, 16, warps=4, stages=1, group_m=2)
# (rows, K, hidden, out): several blocks each way with partial last ones and a K remainder
# (40 = 2.5 steps), one row, a K below one step, widths of the model's ratio (hidden = 4 * K)
SHAPES = [(37, 40, 72, 24), (1, 16, 16, 16), (50, 8, 32, 20), (33, 24, 96, 24)]
APPROXIMATIONS = ["tanh", "none"]


@pytest.fixture
def small_tile(monkeypatch):
    monkeypatch.setattr(triton_utils, "INTERPRETER_GEMM_TILE", SMALL_TILE)


def weights(K, hidden, out, dtype):
    """fc1 and fc2 at nn.Linear's scale, biases of order one (so that they matter)."""
    return (rand(hidden, K, dtype=dtype) / K**0.5, rand(hidden, dtype=dtype),
            rand(out, hidden, dtype=dtype) / hidden**0.5, rand(out, dtype=dtype))


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
def test_forward_gemm_against_twin(small_tile, shape, dtype, approximate):
    M, K, hidden, _ = shape
    x = rand(M, K, dtype=dtype)
    w1, b1, _, _ = weights(K, hidden, 8, dtype)
    g, h = mlp._forward_gemm(x, w1, b1, approximate, write_h=True, alloc=poisoned)
    h_ref = F.linear(x.double(), w1.double(), b1.double())
    assert_close(h, h_ref, dtype, "h")
    assert_close(g, F.gelu(h_ref, approximate=approximate), dtype, "g")
    if dtype == torch.float16:  # g is GELU of the stored h, rounded once, as the unfused gelu computes it
        want = F.gelu(h.float(), approximate=approximate)
        within_one_rounding(g, want)
    assert gemm_launch(M, hidden, "gemm_act_fwd").m_blocks == -(-M // SMALL_TILE.block_m)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
def test_backward_gemm_against_twin(small_tile, shape, dtype, approximate):
    """dh = round(dy @ w2) * gelu'(h), and the per-block partial sums of dh (db1's rows)."""
    M, K, hidden, out = shape
    dy, h = rand(M, out, dtype=dtype), rand(M, hidden, dtype=dtype)
    _, _, w2, _ = weights(K, hidden, out, dtype)
    dh, parts = mlp._backward_gemm(dy, w2, h, approximate, alloc=poisoned)
    dg = (dy.double() @ w2.double()).to(dtype)  # as mm stores it
    dh_ref = torch.ops.aten.gelu_backward(dg.double(), h.double(), approximate=approximate)
    assert_close(dh, dh_ref, dtype, "dh")
    assert parts.shape == (-(-M // SMALL_TILE.block_m), hidden)
    assert parts.dtype == torch.promote_types(dtype, torch.float32)
    assert_close(parts.sum(0), dh.double().sum(0), dtype, "db1")
    for block in range(parts.shape[0]):  # each partial row is its own block's rows, no more
        rows = slice(block * SMALL_TILE.block_m, (block + 1) * SMALL_TILE.block_m)
        assert_close(parts[block], dh[rows].double().sum(0), torch.float32 if dtype != torch.float64 else dtype,
                     f"partial {block}")


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
def test_gelu_mlp_forward_and_gradients_against_twin(small_tile, dtype, approximate):
    B, N, K, hidden, out = 2, 19, 24, 96, 24
    x = rand(B, N, K, dtype=dtype).requires_grad_()
    params = [p.requires_grad_() for p in weights(K, hidden, out, dtype)]
    y = mlp.gelu_mlp(x, *params, approximate)
    dy = rand(*y.shape, dtype=dtype)
    grads = torch.autograd.grad(y, [x, *params], dy)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, *params)]
    y_ref = reference.gelu_mlp(*ref_inputs, approximate)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, dy.double())
    assert y.dtype == dtype and y.shape == (B, N, out)
    assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, grads_ref):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_close(got, want, dtype, name)


def test_gelu_mlp_gradcheck(small_tile):
    """The analytic backward (the fused GEMM, the partial sums, the cuBLAS GEMMs) against finite
    differences of the op itself, in float64."""
    x = rand(1, 5, 12, dtype=torch.float64).requires_grad_()
    params = [p.requires_grad_() for p in weights(12, 20, 8, torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: mlp.gelu_mlp(*a, "tanh"), (x, *params))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_launch_settings(gpu_launch, dtype):
    """The GPU tiles (bf16: 128 x 128, K steps of 64; fp32: 64 x 64, steps of 32): several block
    rows, a partial last block each way, a K remainder, through the whole op and its backward."""
    M, K, hidden, out = 130, 80, 136, 24
    launch = gemm_launch(M, hidden, "gemm_act_fwd", dtype)
    exact = "_exact" if dtype == torch.float32 else ""
    assert launch.tile == triton_utils.GEMM_TILES["gemm_act_fwd" + exact] and launch.m_blocks >= 2
    assert K % launch.tile.block_k and hidden % launch.tile.block_n
    x = rand(M, K, dtype=dtype).requires_grad_()
    params = [p.requires_grad_() for p in weights(K, hidden, out, dtype)]
    y = mlp.gelu_mlp(x, *params)
    dy = rand(*y.shape, dtype=dtype)
    grads = torch.autograd.grad(y, [x, *params], dy)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, *params)]
    y_ref = reference.gelu_mlp(*ref_inputs)
    assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "dw1", "db1", "dw2", "db2"), grads,
                               torch.autograd.grad(y_ref, ref_inputs, dy.double())):
        assert_close(got, want, dtype, name)


def test_under_autocast_operands_and_outputs_take_the_autocast_dtype(small_tile):
    """fp32 weights and input under autocast: the GEMMs run in the autocast dtype (F.linear's
    casts), the output is in it, and the fp32 weights get fp32 gradients, as the twin's."""
    low = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    x = rand(2, 9, 16, dtype=torch.float32).requires_grad_()
    params = [p.requires_grad_() for p in weights(16, 64, 16, torch.float32)]
    with torch.autocast(DEVICE, dtype=low):
        y = mlp.gelu_mlp(x, *params)
        y_twin = reference.gelu_mlp(x, *params)
    assert y.dtype == y_twin.dtype == low
    grads = torch.autograd.grad(y.float().sum(), [x, *params])
    grads_twin = torch.autograd.grad(y_twin.float().sum(), [x, *params])
    assert_close(y, y_twin, low, "y")
    for name, got, want in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, grads_twin):
        assert got.dtype == want.dtype == torch.float32, name
        assert_close(got, want, low, name)


@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
def test_linear_gelu_is_the_teachers_fc1_and_refuses_gradients(small_tile, dtype):
    x = rand(3, 7, 24, dtype=dtype)
    w, b, _, _ = weights(24, 40, 8, dtype)
    with torch.no_grad():
        assert_close(mlp.linear_gelu(x, w, b), reference.linear_gelu(x.double(), w.double(), b.double()), dtype, "g")
    with pytest.raises(RuntimeError, match="forward only"):
        mlp.linear_gelu(x, w.requires_grad_(), b)


def test_bad_arguments_are_named():
    x, w = torch.randn(4, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="approximate"):
        mlp.gelu_mlp(x, w, torch.randn(16), torch.randn(8, 16), torch.randn(8), "sigmoid")
    with pytest.raises(ValueError, match="w2 must be"):
        mlp.gelu_mlp(x, w, torch.randn(16), torch.randn(8, 12), torch.randn(8))
    with pytest.raises(ValueError, match="b1 must be"):
        mlp.gelu_mlp(x, w, torch.randn(15), torch.randn(8, 16), torch.randn(8))
    with pytest.raises(ValueError, match="w1 must be"):
        mlp.linear_gelu(x, torch.randn(16, 7), torch.randn(16))

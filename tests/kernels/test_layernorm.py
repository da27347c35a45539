"""srdit.kernels.layernorm (layer_norm, residual_layer_norm: the teacher's fused LayerNorms,
forward only) against its eager twins in float64, and in the mixed dtypes of bf16 autocast
against the twin in fp32 (STYLE 3, 4).

The launcher tests call the host launcher with an allocator that fills every output with NaN,
so an element the kernel forgets to write fails the comparison. Under autocast the stream x,
gamma and the norm's weights are fp32 and f and y are the GEMM's bf16; the interpreter rounds
fp32 -> bf16 by truncation (its bf16 conversion is not a GPU's), so on the CPU fp16 stands in
for bf16, as in the other kernel tests.
"""
import pytest
import torch

from checks import DTYPES, assert_close, gpu_launch, poisoned, rand, within_one_rounding  # noqa: F401 (a fixture)
from srdit.kernels import layernorm as ln
from srdit.kernels import reference
from srdit.kernels import triton_utils
from srdit.kernels.triton_utils import row_launch

EPS = 1e-6
# (..., D): one row of odd width, the routed length 64 + 1, the teacher's 256 + 1 tokens, D not a
# power of two (96), small (7, 64) and ViT-B's 768; a 2-D x
SHAPES = [(1, 1, 7), (2, 65, 96), (1, 257, 64), (2, 3, 768), (1, 65, 768), (5, 96)]
LOW = [d for d in DTYPES if d != torch.float32]  # fp16 on the CPU, fp16 and bf16 on a GPU


def make_inputs(shape, dtype, *, residual, f_dtype=None, param_dtype=None):
    """Fresh inputs; weight and gamma around 1, bias around 0, as in a trained LayerNorm."""
    D = shape[-1]
    param_dtype = param_dtype or dtype
    inputs = {"x": rand(*shape, dtype=dtype), "weight": 1 + 0.5 * rand(D, dtype=param_dtype),
              "bias": 0.5 * rand(D, dtype=param_dtype)}
    if residual:
        inputs.update(f=rand(*shape, dtype=f_dtype or dtype), gamma=1 + 0.5 * rand(D, dtype=param_dtype))
    return inputs


def twin(inputs, dtype=None, out_dtype=None):
    """The eager twin on copies of `inputs` in `dtype` (None: as given) -> (x_new or None, y)."""
    inp = {k: v.to(dtype or v.dtype) for k, v in inputs.items()}
    if "f" in inp:
        return reference.residual_layer_norm(**inp, eps=EPS, out_dtype=out_dtype)
    return None, reference.layer_norm(**inp, eps=EPS, out_dtype=out_dtype)


def launch(inputs, out_dtype, **kw):
    return ln._launch_fwd(inputs["x"], inputs["weight"], inputs["bias"], EPS, out_dtype, inputs.get("f"),
                          inputs.get("gamma"), **kw)


# --------------------------------------------------------------------------- launcher, poisoned


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_against_float64_twin(shape, residual, dtype):
    inp = make_inputs(shape, dtype, residual=residual)
    x_new, y = launch(inp, dtype, alloc=poisoned)
    x_new_ref, y_ref = twin(inp, torch.float64)
    assert y.dtype == dtype and y.shape == inp["x"].shape
    assert_close(y, y_ref, dtype, "y")
    if residual:
        assert x_new.dtype == dtype
        assert_close(x_new, x_new_ref, dtype, "x_new")
    else:
        assert x_new is None


@pytest.mark.parametrize("out_dtype", LOW, ids=str)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("shape", [(2, 65, 96), (2, 257, 768), (1, 1, 7)], ids=lambda s: "x".join(map(str, s)))
def test_mixed_dtypes_as_under_autocast(shape, residual, out_dtype):
    """The teacher's dtypes: x, gamma, weight, bias fp32, f and y in the GEMM's dtype. x_new is
    bit for bit the eager `x + f * gamma`; y is the fp32 twin rounded once to out_dtype, within
    one rounding step, and as close to float64 as the tolerances of checks.py ask."""
    inp = make_inputs(shape, torch.float32, residual=residual, f_dtype=out_dtype)
    x_new, y = launch(inp, out_dtype, alloc=poisoned)
    x_new_fp32, y_fp32 = twin(inp, out_dtype=torch.float32)  # fp32 LayerNorm, before the cast
    assert y.dtype == out_dtype
    within_one_rounding(y, y_fp32, "y")
    assert_close(y, twin(inp, torch.float64)[1], out_dtype, "y vs float64")
    if residual:
        assert x_new.dtype == torch.float32 and torch.equal(x_new, x_new_fp32)


def test_gpu_launch_settings(gpu_launch):
    """The GPU's launch settings (checks.gpu_launch), outputs poisoned: the teacher's 257 tokens
    of 768 in tiles of 2 rows, 3 x 257 rows so the last tile is partial."""
    shape = (3, 257, 768)
    rows = row_launch(3 * 257, 768, "layer_norm_fwd").rows
    assert rows > 1 and (3 * 257) % rows, "the last tile should be partial"
    test_kernel_against_float64_twin(shape, True, torch.float32)
    test_mixed_dtypes_as_under_autocast(shape, False, LOW[0])


def test_int64_offsets(monkeypatch):
    """int64 offsets (index_dtype), forced on a small shape: the same results."""
    monkeypatch.setattr(triton_utils, "INT32_LIMIT", 0)
    test_kernel_against_float64_twin((2, 65, 96), True, torch.float32)


def test_no_rows():
    inp = make_inputs((2, 0, 8), torch.float32, residual=True)
    x_new, y = ln.residual_layer_norm(**inp)
    assert x_new.shape == y.shape == (2, 0, 8)


# --------------------------------------------------------------------------- custom ops


def test_public_functions_chain_as_in_a_block():
    """The public functions (custom ops) as the teacher calls them: a first norm, then a residual
    norm writing the next GEMM's dtype, then the final one in fp32."""
    low = LOW[0]
    inp = make_inputs((2, 17, 64), torch.float32, residual=True, f_dtype=low)
    x, f, gamma, w, b = (inp[k] for k in ("x", "f", "gamma", "weight", "bias"))
    y0 = ln.layer_norm(x, w, b, EPS, low)
    x1, y1 = ln.residual_layer_norm(x, f, gamma, w, b, EPS, low)
    x2, y2 = ln.residual_layer_norm(x1, y1, gamma, w, b)
    assert (y0.dtype, y1.dtype, x1.dtype, x2.dtype, y2.dtype) == (low, low, torch.float32, torch.float32,
                                                                  torch.float32)
    assert torch.equal(y0, launch({"x": x, "weight": w, "bias": b}, low)[1])
    x1_ref, y1_ref = reference.residual_layer_norm(x, f, gamma, w, b, EPS, torch.float32)
    assert torch.equal(x1, x1_ref)
    within_one_rounding(y1, y1_ref, "y1")
    x2_ref, y2_ref = reference.residual_layer_norm(x1, y1, gamma, w, b, EPS)
    assert torch.equal(x2, x2_ref)
    assert_close(y2, y2_ref, torch.float32, "y2")


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through both ops (register_fake, the dtype argument)
    and gives the eager function's values."""
    torch._dynamo.reset()
    low = LOW[0]
    inp = make_inputs((2, 65, 96), torch.float32, residual=True, f_dtype=low)

    def teacher_like(x, f, gamma, weight, bias):
        y = ln.layer_norm(x, weight, bias, EPS, low)
        x_new, z = ln.residual_layer_norm(x, f * y, gamma, weight, bias, EPS, low)
        return x_new * 2, z.float().square().mean()

    with torch.no_grad():
        want = teacher_like(**inp)
        got = torch.compile(teacher_like, fullgraph=True)(**inp)
    for name, g, w in zip(("x_new", "z"), got, want):
        assert g.dtype == w.dtype == torch.float32
        assert_close(g, w, torch.float32, name)


def test_refuses_gradients():
    """Forward only: inputs that need a gradient are refused unless grad mode is off."""
    inp = make_inputs((2, 3, 8), torch.float32, residual=True)
    inp["weight"].requires_grad_()
    with pytest.raises(RuntimeError, match="forward only"):
        ln.residual_layer_norm(**inp)
    with pytest.raises(RuntimeError, match="forward only"):
        ln.layer_norm(inp["x"], inp["weight"], inp["bias"])
    with torch.no_grad():
        x_new, y = ln.residual_layer_norm(**inp)
    assert not y.requires_grad and torch.isfinite(y).all()


def test_bad_arguments_fail_clearly():
    inp = make_inputs((2, 3, 8), torch.float32, residual=True)
    with pytest.raises(ValueError, match="weight must be"):
        ln.layer_norm(inp["x"], inp["weight"][:7], inp["bias"])
    with pytest.raises(ValueError, match="gamma must be"):
        ln.residual_layer_norm(inp["x"], inp["f"], inp["gamma"][:7], inp["weight"], inp["bias"])
    with pytest.raises(ValueError, match="f must have"):
        ln.residual_layer_norm(inp["x"], inp["f"][:, :2], inp["gamma"], inp["weight"], inp["bias"])


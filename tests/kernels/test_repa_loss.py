"""srdit.kernels.repa_loss (repa_cosine: the REPA loss's per-token cosine, fused) against its eager
twin reference.repa_cosine in float64, and in the dtypes of the training step (pred in the
autocast dtype, target fp32 from the online teacher or fp16 as cached) against the fp32 twin
(STYLE 3, 4).

The launcher tests call the host launchers with an allocator that fills every output with NaN,
so an element a kernel forgets to write fails the comparison; the autograd, gradcheck and
compile tests go through the registered custom ops. On the CPU fp16 stands in for bf16 (the
interpreter's fp32 -> bf16 cast truncates, docs/kernels.md).
"""
import pytest
import torch

from checks import DTYPES, assert_close, gpu_launch, poisoned, rand  # noqa: F401 (a fixture)
from srdit.kernels import reference
from srdit.kernels import repa_loss as rl
from srdit.kernels import triton_utils
from srdit.kernels.triton_utils import row_launch
from srdit.train.loss import repa_loss

# (B, T, d): one row of odd width, the routed length 64 + 1 with d not a power of two, the 256 + 1
# tokens, SR-DiT's d = 768 on rows fewer than a tile, d = 100 on 15 rows
SHAPES = [(1, 1, 7), (2, 65, 96), (1, 257, 64), (2, 3, 768), (3, 5, 100)]
LOW = [d for d in DTYPES if d != torch.float32]  # fp16 on the CPU, fp16 and bf16 on a GPU


def make_inputs(shape, dtype, target_dtype=None):
    """Fresh pred, target [B, T, d] and an upstream gradient dcos [B, T] in fp32 (cos's dtype)."""
    return rand(*shape, dtype=dtype), rand(*shape, dtype=target_dtype or dtype), rand(*shape[:2], dtype=torch.float32)


def twin(pred, target, dcos, dtype=None):
    """The eager twin on copies in `dtype` (None: as given) -> (cos, dpred) for the upstream dcos."""
    p = pred.detach().to(dtype or pred.dtype).requires_grad_()
    cos = reference.repa_cosine(p, target.to(dtype or target.dtype))
    cos.backward(dcos.to(cos.dtype))
    return cos.detach(), p.grad


def run_launchers(pred, target, dcos):
    """The forward and backward launchers, every output poisoned -> (cos, dpred)."""
    cos = rl._launch_fwd(pred, target, alloc=poisoned)
    return cos, rl._launch_bwd(dcos.to(cos.dtype), pred, target, alloc=poisoned)


# --------------------------------------------------------------------------- launchers, poisoned


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_against_float64_twin(shape, dtype):
    pred, target, dcos = make_inputs(shape, dtype)
    cos, dpred = run_launchers(pred, target, dcos)
    cos_ref, dpred_ref = twin(pred, target, dcos, torch.float64)
    assert cos.dtype == triton_utils.compute_dtype(dtype) and cos.shape == shape[:2]
    assert dpred.dtype == dtype and dpred.shape == shape
    assert_close(cos, cos_ref, dtype, "cos")
    assert_close(dpred, dpred_ref, dtype, "dpred")


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float16], ids=["online", "cached"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [(2, 65, 96), (2, 3, 768)], ids=lambda s: "x".join(map(str, s)))
def test_mixed_dtypes_as_under_autocast(shape, dtype, target_dtype):
    """The step's dtypes: pred from the projector's GEMM in the autocast dtype, the target in its
    own (fp32 online, fp16 cached), each read as it is. cos is the fp32 twin's (the eager loss's
    math under autocast, where normalize runs in fp32) up to fp32 rounding; dpred is the fp32
    twin's gradient rounded once to pred's dtype, within one rounding step."""
    pred, target, dcos = make_inputs(shape, dtype, target_dtype)
    cos, dpred = run_launchers(pred, target, dcos)
    cos_ref, dpred_ref = twin(pred, target, dcos, torch.float32)
    assert cos.dtype == torch.float32 and dpred.dtype == dtype
    assert_close(cos, cos_ref, torch.float32, "cos")
    finfo = torch.finfo(dtype)
    diff = (dpred.double() - dpred_ref.to(dtype).double()).abs()
    bound = finfo.eps * dpred_ref.double().abs() + finfo.tiny
    assert (diff <= bound).all(), f"dpred: {int((diff > bound).sum())} elements differ by more than one rounding"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + (DTYPES[2:]), ids=str)
def test_zero_norm_rows_take_the_eps_clamp(dtype):
    """Rows of norm below eps = 1e-12 are divided by eps, as F.normalize's clamp does: a zero row of
    pred or target has cos 0, and a zero row of pred the gradient dcos * q / (eps ||q||) (the
    norm's gradient is cut off by the clamp; ~1e11 here, beyond fp16's range, so not in fp16)."""
    shape = (2, 5, 96)
    pred, target, dcos = make_inputs(shape, dtype)
    pred[0, 1] = 0
    pred[1, 3] = 1e-14  # a norm ~1e-13: below eps, not zero
    target[1, 2] = 0
    cos, dpred = run_launchers(pred, target, dcos)
    cos_ref, dpred_ref = twin(pred, target, dcos, torch.float64)
    assert cos[0, 1] == 0 and cos[1, 2] == 0
    assert_close(cos, cos_ref, dtype, "cos")
    assert_close(dpred, dpred_ref, dtype, "dpred")
    for b, t in ((0, 1), (1, 3)):
        assert_close(dpred[b, t], dpred_ref[b, t], dtype, f"dpred[{b}, {t}]")


def test_gpu_launch_settings(gpu_launch):
    """The GPU's launch settings (checks.gpu_launch), outputs poisoned: d = 768 in tiles of 2 rows,
    3 x 65 rows so the last tile is partial; and the step's mixed dtypes."""
    shape = (3, 65, 768)
    for kernel in (rl.TILE_FWD, rl.TILE_BWD):
        rows = row_launch(3 * 65, 768, kernel).rows
        assert rows > 1 and (3 * 65) % rows, "the last tile should be partial"
    test_kernels_against_float64_twin(shape, torch.float32)
    test_mixed_dtypes_as_under_autocast(shape, LOW[0], torch.float16)


def test_int64_offsets(monkeypatch):
    """int64 offsets (index_dtype), forced on a small shape: the same results."""
    monkeypatch.setattr(triton_utils, "INT32_LIMIT", 0)
    test_kernels_against_float64_twin((2, 65, 96), torch.float32)


def test_no_rows():
    pred, target = rand(2, 0, 8, dtype=torch.float32), rand(2, 0, 8, dtype=torch.float32)
    cos = rl.repa_cosine(pred.requires_grad_(), target)
    cos.sum().backward()
    assert cos.shape == (2, 0) and pred.grad.shape == (2, 0, 8)


# --------------------------------------------------------------------------- custom ops, autograd


def views_as_in_the_step(dtype):
    """pred a view with a row stride wider than d (unit last stride), target the teacher's patch
    tokens teacher[:, 1:] (the REPA target of a model without the REG token): both strided."""
    B, T, d = 2, 17, 96
    pred = rand(B, T, d + 32, dtype=dtype)[..., :d]
    teacher = rand(B, 1 + T, d, dtype=dtype)
    return pred, teacher[:, 1:]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_repa_loss_through_the_custom_op(dtype):
    """srdit.train.loss.repa_loss with kernels="triton" against the eager loss, values and pred's
    gradient, on strided views (no copy: the kernels take both row strides)."""
    pred, target = views_as_in_the_step(dtype)
    got_leaf, want_leaf = pred.detach().clone().requires_grad_(), pred.detach().double().requires_grad_()
    got = repa_loss(got_leaf, target, kernels="triton")
    want = repa_loss(want_leaf, target.double())
    assert got.dtype == triton_utils.compute_dtype(dtype)
    got.sum().backward()
    want.sum().backward()
    assert_close(got, want, dtype, "loss")
    assert got_leaf.grad.dtype == dtype
    assert_close(got_leaf.grad, want_leaf.grad, dtype, "dpred")


def test_gradcheck_float64():
    pred = rand(2, 3, 10, dtype=torch.float64).requires_grad_()
    target = rand(2, 3, 10, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: rl.repa_cosine(p, target), (pred,))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through the op and its backward op (register_fake),
    and the compiled loss gives the eager one's value and gradient."""
    torch._dynamo.reset()
    pred, target = views_as_in_the_step(torch.float32)

    def loss(p):
        return -rl.repa_cosine(p * 2, target).mean()

    def loss_and_grad(fn):
        leaf = pred.detach().clone().requires_grad_()
        value = fn(leaf)
        return value, torch.autograd.grad(value, leaf)[0]

    for name, g, w in zip(("loss", "dpred"), loss_and_grad(torch.compile(loss, fullgraph=True)), loss_and_grad(loss)):
        assert_close(g, w, torch.float32, name)


def test_refuses_a_target_that_requires_grad():
    """The target is the frozen teacher's: a gradient for it is refused, not silently dropped."""
    pred, target = rand(2, 3, 8, dtype=torch.float32).requires_grad_(), rand(2, 3, 8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="target requires a gradient"):
        rl.repa_cosine(pred, target.requires_grad_())
    with torch.no_grad():
        assert torch.isfinite(rl.repa_cosine(pred, target)).all()
    rl.repa_cosine(pred, target.detach()).sum().backward()
    assert pred.grad is not None


def test_bad_arguments_fail_clearly():
    x = rand(2, 3, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="must be \\[B, T, d\\] of one shape"):
        rl.repa_cosine(x, x[:, :2])
    with pytest.raises(ValueError, match="must be \\[B, T, d\\] of one shape"):
        rl.repa_cosine(x[0], x[0])

"""srdit.kernels.rope.apply_rope against reference.apply_rope evaluated in float64.

Runs under TRITON_INTERPRET=1 on the CPU and unchanged on a GPU (tests/kernels/conftest.py).
"""
import pytest
import torch

from srdit.kernels import reference
from srdit.kernels.rope import _launch_bwd, _launch_fwd, apply_rope
from srdit.model.sit import VisionRoPE
from checks import DEVICE, DTYPES, assert_close, gpu_launch, poisoned  # noqa: F401 (a fixture)
from srdit.kernels import triton_utils
from srdit.kernels.triton_utils import row_launch

# (B, N, H, Dh, P): the SR-DiT head (H=2 of 12, Dh=64) on the routed length 65 and the full
# 257-token sequence, one token, and an odd head count with a non-power-of-two head dim
SHAPES = [(2, 65, 2, 64, 256), (1, 257, 2, 64, 256), (3, 1, 3, 24, 7), (2, 9, 3, 24, 16)]


def _ids(B, N, P, kind="random"):
    """Rope ids [B,N] with a class token (-1) first; "random": kept patches in random order (as
    after SPRINT's gather), "grid": the dense model's arange expanded over the batch (stride 0)."""
    if kind == "grid":
        return (torch.arange(N, device=DEVICE) - 1).clamp(max=P - 1).expand(B, -1)
    ids = torch.randint(0, P, (B, N), device=DEVICE)
    ids[:, 0] = -1
    ids[B - 1, N // 2] = -1  # a second unrotated token somewhere in the middle
    return ids


def _tables(P, Dh):
    # independent random tables: cos[2i] != cos[2i+1], so the pairing of table dims is checked too
    return torch.randn(P, Dh, device=DEVICE), torch.randn(P, Dh, device=DEVICE)


def _reference(x, cos, sin, ids, grad):
    x64 = x.detach().double().requires_grad_()
    out = reference.apply_rope(x64, cos.double(), sin.double(), ids)
    (dx,) = torch.autograd.grad(out, x64, grad.double())
    return out, dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(dtype, shape):
    B, N, H, Dh, P = shape
    cos, sin = _tables(P, Dh)
    ids = _ids(B, N, P)
    x = torch.randn(B, N, H, Dh, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, N, H, Dh, device=DEVICE, dtype=dtype)
    ref, ref_dx = _reference(x, cos, sin, ids, grad)

    out = apply_rope(x, cos, sin, ids)
    out.backward(grad)
    assert out.dtype == dtype and out.shape == x.shape and x.grad.dtype == dtype
    assert_close(out, ref, dtype, "out")
    assert_close(x.grad, ref_dx, dtype, "dx")

    # the launchers write every element of preallocated (poisoned) outputs
    fwd = _launch_fwd(x.detach(), cos, sin, ids, alloc=poisoned)
    bwd = _launch_bwd(grad, cos, sin, ids, alloc=poisoned)
    assert_close(fwd, ref, dtype, "out (poisoned)")
    assert_close(bwd, ref_dx, dtype, "dx (poisoned)")


def test_gpu_launch_settings(gpu_launch):
    """The GPU's settings (checks.gpu_launch): 64 (token, head) rows of Dh = 64 per program, so
    2 x 65 x 2 rows leave a partial last tile; forward, backward and the poisoned launchers."""
    shape = (2, 65, 2, 64, 256)
    B, N, H, Dh, _ = shape
    assert (B * N * H) % row_launch(B * N * H, Dh, "apply_rope").rows, "the last tile should be partial"
    test_matches_reference(torch.float32, shape)


def test_int64_offsets(monkeypatch):
    """int64 offsets (index_dtype's choice from 2^30 elements), forced on a small shape."""
    monkeypatch.setattr(triton_utils, "INT32_LIMIT", 0)
    test_matches_reference(torch.float32, SHAPES[3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_input_and_release_tables(dtype):
    """x a non-contiguous slice of a qkv projection, ids the model's expanded grid (stride 0),
    the release's EVA-02 tables (VisionRoPE), and a non-contiguous upstream gradient."""
    B, S, H, Dh = 2, 4, 3, 16
    N = S * S + 1
    rope = VisionRoPE(Dh, S).to(DEVICE)
    ids = _ids(B, N, S * S, kind="grid")
    qkv = torch.randn(B, N, 3, H, Dh, device=DEVICE, dtype=dtype, requires_grad=True)
    x = qkv[:, :, 1]  # [B,N,H,Dh], strides (N*3*H*Dh, 3*H*Dh, Dh, 1)
    grad = torch.randn(B, H, N, Dh, device=DEVICE, dtype=dtype).transpose(1, 2)
    ref, ref_dx = _reference(x, rope.freqs_cos, rope.freqs_sin, ids, grad)
    out = apply_rope(x, rope.freqs_cos, rope.freqs_sin, ids)
    out.backward(grad)
    assert_close(out, ref, dtype, "out")
    assert_close(qkv.grad[:, :, 1], ref_dx, dtype, "dx")
    assert (qkv.grad[:, :, [0, 2]] == 0).all()


def test_gradcheck_float64():
    B, N, H, Dh, P = 2, 3, 2, 6, 5
    cos, sin = (t.double() for t in _tables(P, Dh))
    ids = _ids(B, N, P)
    x = torch.randn(B, N, H, Dh, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: apply_rope(x, cos, sin, ids), (x,), fast_mode=True)
    out = apply_rope(x, cos, sin, ids)
    assert out.dtype == torch.float64
    assert_close(out, reference.apply_rope(x, cos, sin, ids), torch.float64, "out")


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through the custom op, forward and backward.

    Inductor compiles the surrounding graph (C++ on the CPU, ~10 s cold) and calls the op as an
    extern kernel, so on the CPU the Triton kernels still run in the interpreter."""
    B, N, H, Dh, P = 2, 9, 3, 24, 16
    cos, sin = _tables(P, Dh)
    ids = _ids(B, N, P)
    x = torch.randn(B, N, H, Dh, device=DEVICE, requires_grad=True)
    grad = torch.randn(B, N, H, Dh, device=DEVICE)

    def f(x):
        return (apply_rope(x * 2.0, cos, sin, ids) * grad).sum()

    loss = torch.compile(f, fullgraph=True)(x)
    loss.backward()
    ref, ref_dx = _reference(x * 2.0, cos, sin, ids, grad)
    assert_close(loss, (ref * grad.double()).sum(), torch.float32, "loss")
    assert_close(x.grad, 2.0 * ref_dx, torch.float32, "dx")


def test_rejects_bad_shapes():
    x = torch.randn(1, 2, 1, 5, device=DEVICE)
    cos = torch.randn(3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        apply_rope(x, cos, cos, torch.zeros(1, 2, dtype=torch.long, device=DEVICE))
    x = torch.randn(1, 2, 1, 4, device=DEVICE)
    with pytest.raises(ValueError, match="rope_ids"):
        apply_rope(x, cos[:, :4], cos[:, :4], torch.zeros(2, 2, dtype=torch.long, device=DEVICE))


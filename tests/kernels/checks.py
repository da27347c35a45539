"""Shared pieces of the kernel correctness suite (STYLE 3), imported by every test_<op>.py: one tolerance table, poisoning,
relative errors against the float64 eager twin, the device the suite runs on, and the `gpu_launch` fixture.

Tolerances are on ||out - ref|| / ||ref|| against the twin evaluated in float64 (DESIGN.md):
fp32 1e-5; fp16/bf16 1e-2. Gradients reduced over many rows (dshift, dscale, dweight, dlambda)
sum N partial products in a different order from the reference, so their error grows like
sqrt(N) ulps; at the sizes tested (N <= 2k rows) that stays inside the same bounds.
"""
import pytest
import torch

from srdit.kernels.triton_utils import LAUNCH_ENV, gpu_settings

TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}

# The interpreter computes bf16 arithmetic wrongly (TOOLCHAIN.md); bf16 runs on the GPU only.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or Inf anywhere in out is an error of inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out, ref, dtype, name=""):
    err = rel_err(out, ref)
    assert err <= TOLERANCES[dtype], f"{name}: relative error {err:.3e} > {TOLERANCES[dtype]:.0e} ({dtype})"


def within_one_rounding(got, want, name="", magnitude=None):
    """got (low precision) differs from want (fp32, or already rounded) rounded to got's dtype by
    at most one step of that dtype at |want|, or at `magnitude` where that is larger (the size of
    an intermediate the fused op rounds and the twin does not): the fp32 values differ in the
    last bits only (summation order, tanh and erf's implementations), which can move a value
    across a rounding boundary, no further."""
    finfo = torch.finfo(got.dtype)
    diff = (got.double() - want.to(got.dtype).double()).abs()
    size = want.double().abs() if magnitude is None else torch.maximum(want.double().abs(), magnitude.double().abs())
    bound = finfo.eps * size + finfo.tiny
    assert (diff <= bound).all(), f"{name}: {int((diff > bound).sum())} elements differ by more than one rounding"


def assert_bits_equal(got, want, name=""):
    """got and want hold the same values bit for bit (NaN nowhere), in the same dtype."""
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, the twin's {want.dtype}"
    differ = got != want
    assert not differ.any(), f"{name}: {int(differ.sum())} of {got.numel()} elements differ from the twin's"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))


def poisoned(shape, dtype, device):
    """An uninitialised output buffer, NaN-filled (an allocator for the launchers' `alloc=`)."""
    return poison_(torch.empty(shape, dtype=dtype, device=device))


def rand(*shape, dtype):
    """Fresh standard-normal inputs on the suite's device (never zeros)."""
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


@pytest.fixture
def gpu_launch(monkeypatch):
    """The launch settings a GPU runs, also under the interpreter (SRDIT_LAUNCH=gpu): GPU_TILES'
    rows and warps, and split_launch's 4 programs per SM of a GPU_SM_COUNT-SM card. Each kernel
    file runs its checks once this way, on a shape with a partial last tile and, for the kernels
    that loop over row tiles, more than one tile per program (the tests assert both)."""
    monkeypatch.setenv(LAUNCH_ENV, "gpu")
    assert gpu_settings()

"""The public functional API of DESIGN.md "Contracts": srdit.kernels.rmsnorm_modulate and
srdit.kernels.apply_rope are the Triton kernels, callable from the package, with the signatures
of their eager twins in srdit.kernels.reference; importing srdit.kernels does not import triton.
"""
import inspect
import os
import subprocess
import sys

import pytest
import torch

import srdit.kernels
from checks import DEVICE, DTYPES, assert_close, rand
from srdit.kernels import reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _float64_twin(fn, inputs, upstream):
    """fn on float64 copies of the floating inputs -> (output, gradients of the floating leaves)."""
    leaves = [t.detach().double().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.backward(upstream.double())
    return out.detach(), [t.grad for t in leaves if t is not None and t.is_floating_point()]


def _check(fn, twin, inputs, dtype, name):
    leaves = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    upstream = rand(*out.shape, dtype=dtype)
    out.backward(upstream)
    ref, ref_grads = _float64_twin(twin, inputs, upstream)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, name)
    grads = [t.grad for t in leaves if t is not None and t.is_floating_point()]
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, dtype, f"{name}: gradient of floating input {i}")


def test_package_functions_are_the_triton_kernels():
    from srdit.kernels import rmsnorm, rope

    assert srdit.kernels.rmsnorm_modulate is rmsnorm.rmsnorm_modulate
    assert srdit.kernels.apply_rope is rope.apply_rope
    assert srdit.kernels.get_ops("triton").rmsnorm_modulate is srdit.kernels.rmsnorm_modulate


def test_fused_mlp_switch_picks_the_mlp_of_student_and_teacher():
    """model.fused_mlp=false keeps every other Triton op and runs the GELU MLPs (the student's and
    the teacher's) on their eager twins: cuBLAS and separate GELU passes."""
    from srdit.config import apply_overrides, preset
    from srdit.kernels import mlp, reference
    from srdit.model import build_model
    from srdit.train.inputs import build_teacher

    assert srdit.kernels.get_ops("triton").gelu_mlp is mlp.gelu_mlp
    assert srdit.kernels.get_ops("triton", fused_mlp=False).gelu_mlp is reference.gelu_mlp
    assert srdit.kernels.get_ops("eager").gelu_mlp is reference.gelu_mlp
    for fused in (True, False):
        cfg = apply_overrides(preset("quickstart"), ["model.kernels=triton", f"model.fused_mlp={fused}",
                                                     "data.cached_teacher=false"])
        model = build_model(cfg)
        teacher, _ = build_teacher(cfg, torch.device("cpu"), random_init=True)
        want_student, want_teacher = (mlp.gelu_mlp, mlp.linear_gelu) if fused else (reference.gelu_mlp,
                                                                                      reference.linear_gelu)
        assert {m.ops.gelu_mlp for m in model.modules() if type(m).__name__ == "Mlp"} == {want_student}, fused
        assert teacher.fused.linear_gelu is want_teacher and teacher.fused.layer_norm is srdit.kernels.layer_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rmsnorm_modulate_through_the_package(dtype):
    B, N, D = 2, 65, 96
    shift, scale = rand(B, 2 * D, dtype=dtype).chunk(2, dim=-1)  # strided views, as from adaLN
    x, weight = rand(B, N, D, dtype=dtype), rand(D, dtype=dtype)
    _check(srdit.kernels.rmsnorm_modulate, reference.rmsnorm_modulate, [x, shift, scale], dtype, "defaults")
    _check(lambda *a: srdit.kernels.rmsnorm_modulate(*a, weight=weight, eps=1e-5),
           lambda *a: reference.rmsnorm_modulate(*a, weight=weight.double(), eps=1e-5), [x, shift, scale], dtype,
           "weight, eps")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_rope_through_the_package(dtype):
    B, N, H, Dh, P = 2, 65, 2, 64, 256
    cos, sin = torch.randn(P, Dh, device=DEVICE), torch.randn(P, Dh, device=DEVICE)
    ids = torch.randint(0, P, (B, N), device=DEVICE)
    ids[:, 0] = -1  # the class token: not rotated
    _check(lambda x: srdit.kernels.apply_rope(x, cos, sin, ids),
           lambda x: reference.apply_rope(x, cos.double(), sin.double(), ids), [rand(B, N, H, Dh, dtype=dtype)],
           dtype, "apply_rope")


def test_signatures_are_design_md():
    P = inspect.Parameter
    want = {
        "rmsnorm_modulate": [("x", P.empty), ("shift", P.empty), ("scale", P.empty), ("weight", None), ("eps", 1e-6)],
        "apply_rope": [("x", P.empty), ("cos", P.empty), ("sin", P.empty), ("rope_ids", P.empty)],
    }
    for name, params in want.items():
        for fn in (getattr(srdit.kernels, name), getattr(reference, name)):
            got = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
            assert got == params, f"{fn.__module__}.{name}{inspect.signature(fn)}"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_does_not_import_triton():
    """triton is optional at import time: kernels="eager" must run where it is not installed."""
    run = _python("import srdit.kernels, sys; assert 'triton' not in sys.modules\n"
                  "srdit.kernels.get_ops('eager'); assert 'triton' not in sys.modules")
    assert run.returncode == 0, run.stderr


def test_without_triton_the_error_names_the_fix():
    code = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
import srdit.kernels
from srdit.config import ConfigError
srdit.kernels.get_ops("eager")
try:
    srdit.kernels.apply_rope
except ImportError as error:
    assert "triton" in str(error) and "srdit.kernels.reference.apply_rope" in str(error), error
else:
    raise AssertionError("no ImportError")
try:
    srdit.kernels.get_ops("triton")
except ConfigError as error:
    assert "model.kernels=eager" in str(error), error
else:
    raise AssertionError("no ConfigError")
"""
    run = _python(code)
    assert run.returncode == 0, run.stderr

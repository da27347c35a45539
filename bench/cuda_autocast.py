"""CUDA's autocast policy on the CPU: `cuda_autocast_on_cpu()` runs torch.autocast("cpu", bf16)
with every op cast as CUDA autocast casts it, so a step recorded on a CPU machine sees the dtypes
a GPU run has (bench/traffic.py counts its bytes, bench/compile_check.py compiles its kernels).

CPU and CUDA autocast agree on the matmul-class ops (mm, addmm, bmm, linear, matmul, conv,
scaled_dot_product_attention: lower precision) but not on the rest: CUDA runs pow, rsqrt, exp,
norms, softmax and sums of bf16 tensors in fp32 where the CPU keeps bf16, and the CPU casts a few
ops (cat, stack, ...) that CUDA leaves alone. While the context is active, an AutocastCPU kernel
of our own replaces the CPU's for every op whose policy differs (CUDA_POLICY below, from
aten/src/ATen/autocast_mode.{h,cpp}: the ops registered for AutocastCUDA but not AutocastCPU,
and the reverse). `differing_ops()` lists those sets for the installed torch, so a test fails
when a torch release adds an op the table does not place.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch._C import DispatchKey, DispatchKeySet

LOWER = "lower"  # floating tensors cast to the autocast dtype (bf16)
FP32 = "fp32"  # floating tensors cast to fp32
FP32_DTYPE = "fp32_set_opt_dtype"  # reductions: dtype=float32 when the first tensor is a lower-precision float
PROMOTE = "promote"  # floating tensors cast to the widest floating dtype among them

# op (aten name, "name.overload" where the overload decides) -> CUDA's policy
CUDA_POLICY = {
    **dict.fromkeys((
        "_convolution", "_cudnn_rnn", "_scaled_dot_product_flash_attention", "_thnn_fused_gru_cell",
        "_thnn_fused_lstm_cell", "addmv", "addr", "chain_matmul", "convolution", "cudnn_convolution",
        "cudnn_convolution_transpose", "einsum", "gru_cell", "linalg_multi_dot", "lstm_cell", "mv",
        "rnn_relu_cell", "rnn_tanh_cell"), LOWER),
    **dict.fromkeys((
        "_upsample_bicubic2d_aa", "_upsample_bilinear2d_aa", "_upsample_nearest_exact1d",
        "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "acos", "asin", "cosh", "cosine_similarity",
        "dist", "erfinv", "exp", "expm1", "frobenius_norm.dim", "group_norm", "layer_norm", "log", "log10",
        "log1p", "log2", "logsumexp", "native_layer_norm", "nuclear_norm", "nuclear_norm.dim", "pdist",
        "pow.Scalar", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "reciprocal", "renorm", "rms_norm", "rsqrt",
        "sinh", "softplus", "tan", "upsample_bicubic2d", "upsample_bilinear2d", "upsample_linear1d",
        "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_trilinear3d"), FP32),
    **dict.fromkeys((
        "cumprod", "cumsum", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "linalg_vector_norm",
        "log_softmax.int", "softmax.int", "sum", "sum.dim_IntList"), FP32_DTYPE),
    # norm.Scalar / norm.ScalarOpt_dim: CUDA calls the dtype overload with float32, as FP32_DTYPE does
    **dict.fromkeys(("norm.Scalar", "norm.ScalarOpt_dim"), FP32_DTYPE),
    # named-dimension overloads: torch 2.11 registers them for AutocastCUDA only (2.14 for neither)
    **dict.fromkeys(("cumprod.dimname", "cumsum.dimname", "log_softmax.Dimname", "softmax.Dimname",
                     "sum.dim_DimnameList", "norm.names_ScalarOpt_dim"), FP32_DTYPE),
    **dict.fromkeys((
        "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "index_put", "scatter_add", "tensordot",
        "vdot"), PROMOTE),
}
_AUTOCAST_CPU = DispatchKeySet(DispatchKey.AutocastCPU)


def _registered(key: str) -> set[str]:
    names = set()
    for qualified in torch._C._dispatch_get_all_op_names():
        if qualified.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
            names.add(qualified[len("aten::"):])
    return names


def differing_ops() -> tuple[set[str], set[str]]:
    """(ops with a CUDA autocast kernel and no CPU one, ops with a CPU autocast kernel and no CUDA
    one) in the installed torch: the ops whose policy this module must set."""
    cuda, cpu = _registered("AutocastCUDA"), _registered("AutocastCPU")
    return cuda - cpu, cpu - cuda


def _overload(name: str):
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _kernel(op, policy: str, lower: torch.dtype):
    def run(*args, **kwargs):
        floats = [t for t in _tensors(list(args) + list(kwargs.values())) if t.is_floating_point()]
        if policy == LOWER:
            args, kwargs = _cast(args, lower), _cast(kwargs, lower)
        elif policy == FP32:
            args, kwargs = _cast(args, torch.float32), _cast(kwargs, torch.float32)
        elif policy == PROMOTE and floats:
            widest = floats[0].dtype
            for t in floats[1:]:
                widest = torch.promote_types(widest, t.dtype)
            args, kwargs = _cast(args, widest), _cast(kwargs, widest)
        elif policy == FP32_DTYPE and floats and floats[0].dtype in (torch.bfloat16, torch.float16):
            if "dtype" in (a.name for a in op._schema.arguments) and kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
            else:  # norm.Scalar and the like: no dtype argument here, CUDA upcasts the input
                args = _cast(args, torch.float32)
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            return op(*args, **kwargs)

    return run


@contextlib.contextmanager
def cuda_autocast_on_cpu(dtype: torch.dtype = torch.bfloat16):
    """torch.autocast("cpu", dtype) with CUDA's per-op policy (see the module docstring)."""
    cuda_only, cpu_only = differing_ops()
    unplaced = sorted(n for n in cuda_only if n not in CUDA_POLICY)
    if unplaced:
        raise RuntimeError(f"torch {torch.__version__} autocasts ops on CUDA that bench/cuda_autocast.py does "
                           f"not place: {', '.join(unplaced)}; add them to CUDA_POLICY")
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():  # "overriding a previously registered kernel": the point
            warnings.simplefilter("ignore")
            for name in sorted(cuda_only):
                lib.impl(name, _kernel(_overload(name), CUDA_POLICY[name], dtype), "AutocastCPU")
            for name in sorted(cpu_only):  # as on CUDA: autocast passes the op through, its parts are cast
                lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        with torch.autocast("cpu", dtype=dtype):
            yield
    finally:
        lib._destroy()

"""Fused ops and their eager twins.

    srdit.kernels.rmsnorm_modulate(x, shift, scale, weight=None, eps=1e-6)
    srdit.kernels.apply_rope(x, cos, sin, rope_ids)
        the Triton versions (DESIGN.md "Contracts"), imported on first use: importing
        srdit.kernels does not import triton, so the model with kernels="eager" runs without it.
    srdit.kernels.layer_norm(x, weight, bias, eps, out_dtype)
    srdit.kernels.residual_layer_norm(x, f, gamma, weight, bias, eps, out_dtype)
    srdit.kernels.linear_gelu(x, weight, bias, approximate)
        the DINOv2 teacher's fused LayerNorms and fc1 + GELU (forward only), found the same way;
        its eager path (srdit/model/dinov2.py Block.forward) is their reference.
    srdit.kernels.reference
        the eager twin of every op, same signatures (tests, benchmarks, kernels="eager").
    get_ops(cfg.model.kernels, cfg.model.attention_backend, cfg.model.fused_mlp)
        one whole set for the model.

The model calls only what `get_ops` returns (STYLE 7: the model does not know how it is run).
Every set has the functions of OP_NAMES with the signatures of srdit/kernels/reference.py, and
`attention(q, k, v)` of the chosen backend (srdit/kernels/attention.py). One file per Triton op
(rmsnorm.py, rope.py, attention_prologue.py, sprint.py, layernorm.py, mlp.py), shared pieces in triton_utils.py,
the output-dtype rule under autocast in autocast.py; design notes in docs/kernels.md.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

from srdit.config import KERNELS, ConfigError

OP_NAMES = ("rms_norm", "rmsnorm_modulate", "residual_rmsnorm_modulate", "layernorm_modulate", "apply_rope",
            "attention_prologue", "gather_tokens", "sprint_fuse", "gelu_mlp")

# The Triton functions of DESIGN.md's contract and the teacher's norms and fc1 + GELU, by the file
# that defines them, looked up on first access (a module __getattr__, PEP 562) so that `import srdit.kernels`
# never imports triton.
_TRITON_FUNCTIONS = {"rmsnorm_modulate": "rmsnorm", "apply_rope": "rope", "layer_norm": "layernorm",
                     "residual_layer_norm": "layernorm", "linear_gelu": "mlp"}


def __getattr__(name: str):
    module = _TRITON_FUNCTIONS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        fn = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ImportError as error:
        raise ImportError(f"srdit.kernels.{name} is a Triton kernel and needs the triton package ({error}); "
                          f"install triton >= 3.6, or use its eager twin srdit.kernels.reference.{name} "
                          f"(model.kernels=eager)") from error
    globals()[name] = fn  # later lookups find it directly
    return fn


def __dir__():
    return sorted({*globals(), *_TRITON_FUNCTIONS})


def get_ops(kind: str, attention_backend: str = "sdpa", fused_mlp: bool = True) -> SimpleNamespace:
    """The op set for cfg.model.kernels (one of srdit.config.KERNELS) and the attention function
    of cfg.model.attention_backend; a backend that cannot run here is a ConfigError now, at
    build time, not at the first step. fused_mlp (cfg.model.fused_mlp), with "triton": the GELU
    MLP with GELU in fc1's Triton GEMM (mlp.py), else its eager twin (cuBLAS + GELU passes).

    A namespace of plain functions (not a module object), so models holding it can be deep-copied
    (the EMA) and pickled.
    """
    from srdit.kernels import reference
    from srdit.kernels.attention import attention_fn

    attention = attention_fn(attention_backend)
    if kind == "eager":
        return SimpleNamespace(kind=kind, attention=attention, **{name: getattr(reference, name) for name in OP_NAMES})
    if kind != "triton":
        raise ConfigError(f"model.kernels={kind!r} is not one of {', '.join(map(repr, KERNELS))}")
    try:
        from srdit.kernels import attention_prologue, mlp, rmsnorm, rope, sprint
    except ImportError as error:
        raise ConfigError(f"model.kernels='triton' needs the triton package ({error}); use model.kernels=eager") from None
    return SimpleNamespace(
        kind=kind,
        attention=attention,
        rms_norm=rmsnorm.rms_norm,
        rmsnorm_modulate=rmsnorm.rmsnorm_modulate,
        residual_rmsnorm_modulate=rmsnorm.residual_rmsnorm_modulate,
        layernorm_modulate=reference.layernorm_modulate,  # LayerNorm only in two ablation rows: no Triton twin
        apply_rope=rope.apply_rope,
        attention_prologue=attention_prologue.attention_prologue,
        gather_tokens=sprint.gather_tokens,
        sprint_fuse=sprint.sprint_fuse,
        gelu_mlp=mlp.gelu_mlp if fused_mlp else reference.gelu_mlp,
    )

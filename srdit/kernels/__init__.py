"""Fused ops and their eager twins; `get_ops(cfg.model.kernels, cfg.model.attention_backend)`
picks one set for the model.

The model calls only what `get_ops` returns (STYLE 7: the model does not know how it is run).
Every set has the functions of OP_NAMES with the signatures of srdit/kernels/reference.py, and
`attention(q, k, v)` of the chosen backend (srdit/kernels/attention.py).
"""
from __future__ import annotations

from types import SimpleNamespace

from srdit.config import KERNELS, ConfigError

OP_NAMES = ("rms_norm", "rmsnorm_modulate", "residual_rmsnorm_modulate", "layernorm_modulate", "apply_rope",
            "attention_prologue", "gather_tokens", "sprint_fuse")


def get_ops(kind: str, attention_backend: str = "sdpa") -> SimpleNamespace:
    """The op set for cfg.model.kernels (one of srdit.config.KERNELS) and the attention function
    of cfg.model.attention_backend; a backend that cannot run here is a ConfigError now, at
    build time, not at the first step.

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
        from srdit.kernels import attention_prologue, rmsnorm_modulate, rope, sprint
    except ImportError as error:
        raise ConfigError(f"model.kernels='triton' needs the triton package ({error}); use model.kernels=eager") from None
    return SimpleNamespace(
        kind=kind,
        attention=attention,
        rms_norm=rmsnorm_modulate.rms_norm,
        rmsnorm_modulate=rmsnorm_modulate.rmsnorm_modulate,
        residual_rmsnorm_modulate=rmsnorm_modulate.residual_rmsnorm_modulate,
        layernorm_modulate=reference.layernorm_modulate,  # LayerNorm only in two ablation rows: no Triton twin
        apply_rope=rope.apply_rope,
        attention_prologue=attention_prologue.attention_prologue,
        gather_tokens=sprint.gather_tokens,
        sprint_fuse=sprint.sprint_fuse,
    )

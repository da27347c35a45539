"""Eager PyTorch twins of every fused op: the correctness reference and the speed baseline.

Each function here has the same signature as its Triton version (rmsnorm.py, rope.py,
attention_prologue.py, sprint.py, layernorm.py, mlp.py in srdit/kernels/).
They follow the release code's operation order, so that in float64 the model built from them
computes the release model's function; in lower precision they do what the release does
under autocast (norms and RoPE compute in fp32, results go on in the input's dtype).

Shapes: B batch, N tokens, D width, H heads, Dh head dim, T full sequence, K kept tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def default_rms_eps(dtype: torch.dtype) -> float:
    """The eps torch's RMSNorm uses when given none: machine eps of the compute dtype, which is
    fp32 for bf16/fp16 inputs (measured: torch upcasts them) and fp64 for fp64."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight over the last dim; eps=None is torch's default."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rmsnorm_modulate(x, shift, scale, weight=None, eps=1e-6):
    """x [B,N,D], shift/scale [B,D] or both None: rms_norm(x) * (1 + scale) + shift."""
    y = rms_norm(x, weight, eps)  # [B, N, D]
    if shift is None and scale is None:
        return y
    return y * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layernorm_modulate(x, shift, scale, eps=1e-6):
    """LayerNorm without affine, then modulation (the Table-1 rows before "+ RMSNorm")."""
    y = F.layer_norm(x, (x.shape[-1],), eps=eps)  # [B, N, D]
    return y * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Adjacent pairs (a, b) -> (-b, a) along the last dim (EVA-02's interleaved layout)."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., Dh/2, 2]
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x, cos, sin, rope_ids):
    """x [B,N,H,Dh]; cos/sin tables [P,Dh]; rope_ids [B,N] int, row of the table for each token.

    A negative id leaves the token unrotated (the class token). Computed in fp32 (the tables are
    fp32, as in the release, whose products promote), returned in x's dtype.
    """
    ids = rope_ids.clamp(min=0)
    rotated = (rope_ids >= 0).unsqueeze(-1)  # [B, N, 1]
    c = torch.where(rotated, cos[ids], 1.0).unsqueeze(2)  # [B, N, 1, Dh]
    s = torch.where(rotated, sin[ids], 0.0).unsqueeze(2)  # [B, N, 1, Dh]
    compute = torch.promote_types(x.dtype, cos.dtype)
    xc = x.to(compute)
    return (xc * c.to(compute) + _rotate_half(xc) * s.to(compute)).to(x.dtype)


def gather_tokens(x, ids):
    """x [B,T,...], ids [B,K] -> x at the kept ids [B,K,...] (SPRINT drop; value-residual v0)."""
    index = ids.reshape(*ids.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def attention_prologue(qkv, heads, q_weight=None, k_weight=None, cos=None, sin=None, rope_ids=None,
                       v0=None, v0_ids=None, lam=None):
    """From the qkv projection to what attention consumes, in the release's order.

    qkv [B,N,3D] -> split q, k, v [B,N,H,Dh]; QK-norm (per-head RMSNorm with torch's default
    eps) of q and k; value residual v = lam * v0 + (1 - lam) * v, v0 [B,T,H,Dh] taken at
    v0_ids [B,N] when routed; 2D RoPE of q and k at rope_ids. Returns q, k, v as [B,H,N,Dh]
    (the SDPA layout) and v_raw [B,N,H,Dh], the un-mixed v that block 0 caches as v0.
    """
    B, N, _ = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, -1).unbind(2)  # each [B, N, H, Dh]
    v_raw = v
    if q_weight is not None:
        q = rms_norm(q, q_weight)
        k = rms_norm(k, k_weight)
    if v0 is not None:
        if v0_ids is not None:
            v0 = gather_tokens(v0, v0_ids)  # [B, N, H, Dh]
        v = lam * v0 + (1.0 - lam) * v
    if cos is not None:
        q = apply_rope(q, cos, sin, rope_ids)
        k = apply_rope(k, cos, sin, rope_ids)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), v_raw


def sprint_fuse(x_enc, g, ids, mask_token, weight, bias):
    """SPRINT's sparse-dense fusion: Linear(2D -> D)(concat(x_enc, pad(g))).

    x_enc [B,T,D] encoder output; g [B,K,D] routed output at kept ids [B,K], or [B,T,D] with
    ids=None (no routing), or None (path drop: the sparse stream is [MASK] everywhere);
    mask_token [1,1,D]; weight [D,2D]; bias [D]. Materialises the padded stream and the concat
    as the release does; the Triton version does neither.
    """
    B, T, D = x_enc.shape
    if g is not None and ids is None:
        padded = g
    else:
        padded = mask_token.expand(B, T, D).clone()  # [B, T, D]
        if g is not None:
            padded.scatter_(1, ids.unsqueeze(-1).expand(-1, -1, D), g.to(padded.dtype))
    return F.linear(torch.cat([x_enc, padded], dim=-1), weight, bias)  # [B, T, D]


def residual_rmsnorm_modulate(x, gate, f, shift, scale, weight=None, eps=1e-6):
    """x, f [B,N,D]; gate, shift, scale [B,D]: the block's gated residual add, then the next norm.

    Returns (x_new, y): x_new = x + gate * f is the residual stream the block continues with,
    y = rmsnorm_modulate(x_new, shift, scale, weight, eps) what the next sublayer consumes.
    """
    x = x + gate.unsqueeze(1) * f  # [B, N, D]
    return x, rmsnorm_modulate(x, shift, scale, weight, eps)


def linear_gelu(x, weight, bias, approximate="none"):
    """gelu(F.linear(x, weight, bias)): a Linear and its GELU (exact, or approximate="tanh"); under
    autocast the Linear runs in the autocast dtype and the GELU on its stored output (mlp.py)."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def gelu_mlp(x, w1, b1, w2, b2, approximate="tanh"):
    """The transformer MLP fc2(gelu(fc1(x))): fc1 = (w1 [Hd, K], b1), fc2 = (w2 [D, Hd], b2);
    SiT's is GELU(tanh). The Triton version fuses the GELU into fc1's GEMM (mlp.py)."""
    return F.linear(linear_gelu(x, w1, b1, approximate), w2, b2)


def layer_norm(x, weight, bias, eps=1e-6, out_dtype=None):
    """The DINOv2 teacher's LayerNorm as the eager teacher computes it: torch's LayerNorm, then the
    cast that autocast makes before the GEMM that reads it (layernorm.py; forward only)."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(out_dtype or x.dtype)


def residual_layer_norm(x, f, gamma, weight, bias, eps=1e-6, out_dtype=None):
    """The teacher block's `x + ls(f)` (type promotion: f * gamma in fp32), then layer_norm."""
    x_new = x + f * gamma
    return x_new, layer_norm(x_new, weight, bias, eps, out_dtype)


def repa_cosine(pred, target):
    """Per-token cosine of pred and target [B, T, d] -> [B, T] (repa_loss.py): the release's REPA
    sum(normalize(target) * normalize(pred)) with F.normalize's eps 1e-12; under CUDA autocast
    normalize runs in fp32, so the cosine is fp32 for bf16 pred and fp32 or fp16 target."""
    return (F.normalize(target, dim=-1) * F.normalize(pred, dim=-1)).sum(dim=-1)

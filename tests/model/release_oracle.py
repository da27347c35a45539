"""An independent, functional transcription of the release model's forward (SPEC section 2 and
the release's operation order), used only as a test oracle.

It works on a state dict in the release layout, with plain tensor ops: one token sequence,
materialised [MASK] padding and concat, path drop as `g * 0 + mask` after computing the
routed blocks (quirk Q3), the class token rotated as position 0 when routed (Q1). srdit's
model, whatever its ops and skips, must compute the same function in float64.
"""
import math

import torch
import torch.nn.functional as F


def _rotate_half(x):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _rope(x, sd, rope_ids, num_patches):
    """x [B,H,N,Dh]. Full sequence (class token + every patch): the class token is skipped.
    Routed subset: every token rotates at table[rope_id] (a kept class token has id 0)."""
    cos, sin = sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"]
    if x.shape[2] == num_patches + 1:
        body = x[:, :, 1:]
        body = body * cos + _rotate_half(body) * sin
        return torch.cat([x[:, :, :1], body], dim=2)
    c, s = cos[rope_ids][:, None], sin[rope_ids][:, None]  # [B, 1, N, Dh]
    return x * c + _rotate_half(x) * s


def _block(sd, i, x, c, heads, rope_ids, num_patches, v1):
    p = f"blocks.{i}."
    D = x.shape[-1]
    B, N, _ = x.shape
    mods = F.linear(F.silu(c), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=-1)

    h = F.rms_norm(x, (D,), None, 1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
    q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4).unbind(0)
    v_last = v
    q = F.rms_norm(q, (D // heads,), sd[p + "attn.q_norm.weight"])
    k = F.rms_norm(k, (D // heads,), sd[p + "attn.k_norm.weight"])
    if v1 is not None:
        lam = sd[p + "attn.v1_lambda"]
        v = lam * v1 + (1.0 - lam) * v
    q, k = _rope(q, sd, rope_ids, num_patches), _rope(k, sd, rope_ids, num_patches)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
    x = x + gate_msa[:, None] * F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])

    h = F.rms_norm(x, (D,), None, 1e-6) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    h = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh")
    x = x + gate_mlp[:, None] * F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x, v_last


def release_forward(sd, x, t, y, cls, *, heads, depth, ids_keep=None, path_drop=False):
    """(v, v_cls, zs) of the release SR-DiT for state dict `sd`.

    ids_keep [B, K] routes the middle blocks (training); path_drop replaces the padded sparse
    stream by [MASK] after computing it, as the release does in training and for `uncond`.
    """
    B, C, Hh, Ww = x.shape
    conv_w = sd["x_embedder.proj.weight"]
    patch = conv_w.shape[-1]
    h = F.conv2d(x, conv_w, sd["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    P = h.shape[1]
    D = h.shape[-1]
    tok = F.linear(cls, sd["cls_projectors2.weight"], sd["cls_projectors2.bias"])
    tok = F.rms_norm(tok, (D,), sd["wg_norm.weight"], 1e-6)
    h = torch.cat([tok[:, None], h], dim=1) + sd["pos_embed"]
    T = h.shape[1]
    rope_full = torch.cat([torch.zeros(B, 1, dtype=torch.long), torch.arange(P).expand(B, -1)], dim=1)

    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)
    temb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]

    x_enc, v1_full = h, None
    for i in range(2):
        x_enc, v_last = _block(sd, i, x_enc, c, heads, rope_full, P, v1_full)
        if v1_full is None:
            v1_full = v_last
    z = x_enc
    for j in (0, 2, 4):
        z = F.linear(z, sd[f"projectors.0.{j}.weight"], sd[f"projectors.0.{j}.bias"])
        if j < 4:
            z = F.silu(z)

    if ids_keep is not None:
        x_mid = x_enc.gather(1, ids_keep[..., None].expand(-1, -1, D))
        rope_sparse = rope_full.gather(1, ids_keep)
        v1_sparse = v1_full.gather(2, ids_keep[:, None, :, None].expand(-1, v1_full.shape[1], -1, v1_full.shape[-1]))
    else:
        x_mid, rope_sparse, v1_sparse = x_enc, rope_full, v1_full
    for i in range(2, depth - 2):
        x_mid, _ = _block(sd, i, x_mid, c, heads, rope_sparse, P, v1_sparse)
    mask = sd["mask_token"]
    if ids_keep is not None:
        g_pad = mask.expand(B, T, D).clone()
        g_pad.scatter_(1, ids_keep[..., None].expand(-1, -1, D), x_mid)
    else:
        g_pad = x_mid
    if path_drop:
        g_pad = g_pad * 0.0 + mask.expand_as(g_pad)
    x_dec = F.linear(torch.cat([x_enc, g_pad], dim=-1), sd["fusion_proj.weight"], sd["fusion_proj.bias"])
    for i in range(depth - 2, depth):
        x_dec, _ = _block(sd, i, x_dec, c, heads, rope_full, P, v1_full)

    mods = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    shift, scale = mods.chunk(2, dim=-1)
    x_dec = F.rms_norm(x_dec, (D,), None, 1e-6) * (1 + scale[:, None]) + shift[:, None]
    v_cls = F.linear(x_dec[:, 0], sd["final_layer.linear_cls.weight"], sd["final_layer.linear_cls.bias"])
    out = F.linear(x_dec[:, 1:], sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    S = int(P**0.5)
    out = out.reshape(B, S, S, patch, patch, C)
    v = torch.einsum("nhwpqc->nchpwq", out).reshape(B, C, S * patch, S * patch)
    return v, v_cls, z

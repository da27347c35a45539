"""The SR-DiT network: SiT with REG class token, REPA projector, SPRINT routing, RoPE, QK-norm and
value residual (SPEC section 2). Module and parameter names equal the release model's, so a
release state dict loads as it is (see checkpoint.py).

Reads top to bottom: fixed tables, embedders, attention, MLP, block, final layer, the model,
`initialize_weights`. Normalisation, RoPE, QK-norm, value residual and the SPRINT gather/fuse
run through `ops` (srdit.kernels.get_ops(cfg.kernels, cfg.attention_backend, cfg.fused_mlp)); the model never
imports Triton.

Shapes: B batch, C latent channels, S grid side, P = S*S patches, T = P (+1 with the REG
token) tokens, K kept tokens in routed blocks, D width, H heads, Dh head dim.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from srdit.config import ModelConfig
from srdit.kernels import get_ops


class ModelOutput(NamedTuple):
    v: torch.Tensor  # velocity [B, C, H, W]
    v_cls: torch.Tensor | None  # REG class-token velocity [B, teacher_dim]
    repa: torch.Tensor | None  # REPA projector output [B, T, teacher_dim]
    hidden: torch.Tensor | None = None  # hidden state at the REPA tap [B, T, D] (dispersive loss)


# --------------------------------------------------------------------------- fixed tables


def sincos_pos_embed(dim: int, grid: int, cls_row: bool) -> torch.Tensor:
    """MAE 2D sin-cos position embedding [P (+1), dim], float64 math rounded to float32.

    As in MAE (and the release), the first half of the channels encodes the column and the
    second half the row; each half is [sin(pos * w_k), cos(pos * w_k)], w_k = 1e4^(-k / (dim/4)).
    The class token's row is zeros.
    """
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)  # [P, dim]
    if cls_row:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return torch.from_numpy(table).float()


class VisionRoPE(nn.Module):
    """2D RoPE tables (EVA-02 style), fp32 buffers freqs_cos/freqs_sin [P, Dh] as in the release.

    Frequencies theta^(-k/(Dh/4)), k < Dh/4, each repeated twice interleaved; dims [0, Dh/2)
    rotate by the grid row, [Dh/2, Dh) by the column. Row p = h*S + w of the tables is patch
    (h, w). Computed with the release's float32 operations so a fresh model matches bit for bit.
    """

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # [Dh/4]
        pos = torch.arange(grid) / grid * grid  # float32 positions 0..S-1
        axis = torch.einsum("s,f->sf", pos, freqs).repeat_interleave(2, dim=-1)  # [S, Dh/2]
        table = torch.cat(
            [axis[:, None, :].expand(grid, grid, half), axis[None, :, :].expand(grid, grid, half)], dim=-1
        ).reshape(grid * grid, head_dim)  # [P, Dh]
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())


# --------------------------------------------------------------------------- embedders


class PatchEmbed(nn.Module):
    """Conv patchify: [B, C, H, W] -> [B, P, D] (timm's PatchEmbed layout: `proj`)."""

    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, P, D]


class TimestepEmbedder(nn.Module):
    """256-d sinusoid of raw t in [0, 1] (cos then sin, max period 1e4), then an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        # float32 like the release, whatever t's dtype; then cast back to it
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # [B, half]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)  # [B, dim]

    def forward(self, t):
        return self.mlp(self.sinusoid(t, self.freq_dim))  # [B, D]


class LabelEmbedder(nn.Module):
    """Embedding(num_classes + 1, D); the last row is the null label. Label dropout is the
    trainer's job (srdit.train.loss.drop_labels), so the model is deterministic given y."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)  # [B, D]


class NormWeight(nn.Module):
    """Holds the learnable scale of an RMSNorm whose math runs in `ops` (key `<name>.weight`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


# --------------------------------------------------------------------------- attention, MLP


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops, value_residual: bool):
        super().__init__()
        self.ops, self.heads = ops, cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.q_norm = NormWeight(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = NormWeight(cfg.head_dim) if cfg.qk_norm else None
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.v1_lambda = nn.Parameter(torch.tensor(0.5)) if value_residual else None

    def forward(self, x, rope: VisionRoPE | None, rope_ids, v0=None):
        """v0 [B, N, H, Dh]: block 0's v at this block's tokens (routed: gathered by the model)."""
        B, N, D = x.shape
        q, k, v, v_raw = self.ops.attention_prologue(
            self.qkv(x),  # [B, N, 3D]
            self.heads,
            self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None,
            rope.freqs_cos if rope is not None else None,
            rope.freqs_sin if rope is not None else None,
            rope_ids,
            v0 if self.v1_lambda is not None else None,
            None,  # v0_ids: v0 comes at this block's tokens
            self.v1_lambda,
        )  # q, k, v [B, H, N, Dh]; v_raw [B, N, H, Dh]
        out = self.ops.attention(q, k, v).transpose(1, 2).reshape(B, N, D)  # [B, N, D]
        return self.proj(out), v_raw


class XIELU(nn.Module):
    """xIELU (Huang et al. 2025): alpha_p x^2 + beta x for x > 0, alpha_n (expm1(min(x, eps)) - x)
    + beta x otherwise; alpha_p = softplus(a_p), alpha_n = beta + softplus(a_n), both learnable."""

    def __init__(self, alpha_p: float = 0.8, alpha_n: float = 0.8, beta: float = 0.5, eps: float = -1e-6):
        super().__init__()
        inv_softplus = lambda y: math.log(math.expm1(y))  # noqa: E731
        self.alpha_p = nn.Parameter(torch.tensor(inv_softplus(alpha_p)))
        self.alpha_n = nn.Parameter(torch.tensor(inv_softplus(alpha_n - beta)))
        self.beta, self.eps = beta, eps

    def forward(self, x):
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        positive = alpha_p * x * x + self.beta * x
        negative = alpha_n * (torch.expm1(torch.clamp(x, max=self.eps)) - x) + self.beta * x
        return torch.where(x > 0, positive, negative)


def _relu2(x):
    return F.relu(x).square()


def _lopsided_relu2(x):
    return torch.where(x > 0, x * x, 0.01 * x)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (timm's Mlp layout). SwiGLU splits fc1 into gate and value and
    uses a 2/3-width hidden layer so that its parameter count matches the 4x GELU MLP. With GELU
    the whole MLP is the op set's gelu_mlp: these same calls when eager, GELU inside fc1's GEMM and
    its derivative inside the backward's with Triton (srdit/kernels/mlp.py)."""

    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.ops = ops
        hidden = int(cfg.hidden * cfg.mlp_ratio)
        self.glu = cfg.mlp_act == "swiglu"
        if self.glu:
            hidden = int(2 * hidden / 3)
        self.fc1 = nn.Linear(cfg.hidden, 2 * hidden if self.glu else hidden)
        self.act = {
            "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
            "swiglu": nn.SiLU,
            "relu2": lambda: _relu2,
            "xielu": XIELU,
            "lopsided_relu2": lambda: _lopsided_relu2,
        }[cfg.mlp_act]()
        self.fc2 = nn.Linear(hidden, cfg.hidden)

    def forward(self, x):
        if isinstance(self.act, nn.GELU):  # the fused op: GELU inside fc1's GEMM (srdit/kernels/mlp.py)
            return self.ops.gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                     self.act.approximate)  # [B, N, D]
        h = self.fc1(x)  # [B, N, hidden or 2*hidden]
        if self.glu:
            gate, value = h.chunk(2, dim=-1)
            h = self.act(gate) * value
        else:
            h = self.act(h)
        return self.fc2(h)  # [B, N, D]


# --------------------------------------------------------------------------- block, final layer


class NormModulate(nn.Module):
    """norm1/norm2/norm_final: RMSNorm or LayerNorm without affine (eps 1e-6), then x(1+scale)+shift."""

    def __init__(self, ops, kind: str):
        super().__init__()
        self.ops, self.kind = ops, kind

    def forward(self, x, shift, scale):
        if self.kind == "rmsnorm":
            return self.ops.rmsnorm_modulate(x, shift, scale, None, 1e-6)
        return self.ops.layernorm_modulate(x, shift, scale, 1e-6)

    def residual(self, x, gate, f, shift, scale):
        """(x + gate * f, this norm of it, modulated): one fused pass with RMSNorm."""
        if self.kind == "rmsnorm":
            return self.ops.residual_rmsnorm_modulate(x, gate, f, shift, scale, None, 1e-6)
        x = x + gate.unsqueeze(1) * f
        return x, self.ops.layernorm_modulate(x, shift, scale, 1e-6)


def add_branch(x, branch):
    """x + gate * f for a block's pending MLP branch (gate [B, D], f [B, N, D]); x itself if None.
    The release's op, where the residual stream itself is needed (SiTBlock.forward says where)."""
    if branch is None:
        return x
    gate, f = branch
    return x + gate.unsqueeze(1) * f  # [B, N, D]


class SiTBlock(nn.Module):
    """Pre-norm adaLN-Zero block: x += g_msa * Attn(mod(norm1 x)); x += g_mlp * MLP(mod(norm2 x)).

    The last add is left to the next norm (the next block's norm1 or norm_final): the block returns
    its MLP branch (g_mlp, MLP(...)) pending, and takes the previous block's as `pending`, added in
    norm1's fused pass (NormModulate.residual), so the stream between blocks is written once and
    never re-read for a separate add. The model materialises it with add_branch where the stream
    itself is used: the REPA tap, the SPRINT gather and fusion, the end of the routed blocks.
    With kernels="eager" the fused op is the same add then the same norm: the same ops in the same
    order as one block after the other.
    """

    def __init__(self, cfg: ModelConfig, ops, value_residual: bool):
        super().__init__()
        self.norm1 = NormModulate(ops, cfg.norm)
        self.attn = Attention(cfg, ops, value_residual)
        self.norm2 = NormModulate(ops, cfg.norm)
        self.mlp = Mlp(cfg, ops)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 6 * cfg.hidden))

    def forward(self, x, mod, rope, rope_ids, v0=None, pending=None):
        """mod [B, 6D]: this block's adaLN output (SRDiT.modulations computes it from c); pending:
        the previous block's MLP branch (gate [B, D], f [B, N, D]) not yet in x, or None.
        Returns (x, this block's MLP branch, v_raw); the stream is x + g_mlp * MLP(...)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        if pending is None:
            h = self.norm1(x, shift_msa, scale_msa)  # [B, N, D]
        else:
            x, h = self.norm1.residual(x, *pending, shift_msa, scale_msa)  # x += g * f; h = mod(norm1 x)
        a, v_raw = self.attn(h, rope, rope_ids, v0)
        x, h = self.norm2.residual(x, gate_msa, a, shift_mlp, scale_mlp)  # x += g_msa * a; h = mod(norm2 x)
        return x, (gate_mlp, self.mlp(h)), v_raw  # [B, N, D], ([B, D], [B, N, D]), [B, N, H, Dh]


class FinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.norm_final = NormModulate(ops, cfg.norm)
        self.linear = nn.Linear(cfg.hidden, cfg.patch_size**2 * cfg.in_channels)
        self.linear_cls = nn.Linear(cfg.hidden, cfg.teacher_dim) if cfg.reg_token else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))

    def forward(self, x, mod, has_cls: bool, pending=None):
        """pending: the last block's MLP branch, added in norm_final's fused pass (SiTBlock)."""
        shift, scale = mod.chunk(2, dim=-1)  # mod [B, 2D]
        if pending is None:
            x = self.norm_final(x, shift, scale)  # [B, T, D]
        else:
            _, x = self.norm_final.residual(x, *pending, shift, scale)  # [B, T, D]
        if not has_cls:
            return self.linear(x), None
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])  # [B, P, p*p*C], [B, teacher_dim]


# --------------------------------------------------------------------------- helpers


def select_tokens(batch: int, num_tokens: int, num_keep: int, *, keep_first: bool = False,
                  generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """SPRINT's kept ids [B, K]: a uniformly random subset per sample, in random order.

    keep_first=False is the release (quirk Q2: the class token at 0 competes like any token);
    keep_first=True always keeps token 0 first and draws K-1 of the others.
    """
    if keep_first:
        noise = torch.rand(batch, num_tokens - 1, generator=generator, device=device)
        rest = noise.argsort(dim=1)[:, : num_keep - 1] + 1
        return torch.cat([torch.zeros(batch, 1, dtype=rest.dtype, device=rest.device), rest], dim=1)
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    return noise.argsort(dim=1)[:, :num_keep]


class _TieZeroGrads(torch.autograd.Function):
    """Identity on x whose backward gives each of `params` a zero gradient.

    Path drop replaces the routed stream by [MASK]: the release still computes the routed blocks
    and multiplies their output by 0 (quirk Q3), which gives their parameters zero gradients. An
    optimizer step with a zero gradient still moves a parameter (Adam momentum), so skipping
    the blocks must still hand them zeros, not None; this does so without computing them.
    """

    @staticmethod
    def forward(ctx, x, *params):
        ctx.specs = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.specs])


# --------------------------------------------------------------------------- the model


class SRDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ops = get_ops(cfg.kernels, cfg.attention_backend, cfg.fused_mlp)
        self.ops = ops
        D = cfg.hidden
        if cfg.sprint:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
            self.fusion_proj = nn.Linear(2 * D, D)
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        # Fixed, but a parameter (requires_grad=False) as in the release, whose EMA moved it:
        # load it from checkpoints, never recompute it (SPEC, release checkpoints).
        self.pos_embed = nn.Parameter(sincos_pos_embed(D, cfg.grid, cfg.reg_token)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            SiTBlock(cfg, ops, value_residual=cfg.value_residual and i > 0) for i in range(cfg.depth)
        )
        self.projectors = nn.ModuleList([
            nn.Sequential(
                nn.Linear(D, cfg.projector_dim), nn.SiLU(),
                nn.Linear(cfg.projector_dim, cfg.projector_dim), nn.SiLU(),
                nn.Linear(cfg.projector_dim, cfg.teacher_dim),
            )
        ])
        self.final_layer = FinalLayer(cfg, ops)
        if cfg.reg_token:
            self.cls_projectors2 = nn.Linear(cfg.teacher_dim, D)
            self.wg_norm = NormWeight(D)
        self.feat_rope = VisionRoPE(cfg.head_dim, cfg.grid, cfg.rope_theta) if cfg.rope else None
        # RoPE row of each token; the class token (-1) is not rotated in dense blocks.
        rope_ids = torch.arange(-int(cfg.reg_token), cfg.grid**2)
        self.register_buffer("rope_ids", rope_ids, persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear, not a conv
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        final = self.final_layer
        for layer in (final.adaLN_modulation[-1], final.linear, final.linear_cls):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    # ----------------------------------------------------------------- pieces of forward

    def unpatchify(self, x):
        """[B, P, p*p*C] -> [B, C, S*p, S*p]."""
        p, S, C = self.cfg.patch_size, self.cfg.grid, self.cfg.in_channels
        x = x.reshape(x.shape[0], S, S, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], C, S * p, S * p)

    def modulations(self, c):
        """adaLN outputs of the blocks and the final layer, [B, 6D] each and [B, 2D]: callable by
        index (index depth = the final layer), so skipped blocks need not compute theirs.

        With model.batched_adaln, one GEMM on the concatenated weights computes all of them (c is
        shared by every block: 13 small GEMMs become one); otherwise each layer its own, as the
        release does. Same math either way; parameters stay per block (the release layout).
        """
        layers = [b.adaLN_modulation for b in self.blocks] + [self.final_layer.adaLN_modulation]
        if not self.cfg.batched_adaln:
            return lambda i: layers[i](c)
        linears = [layer[1] for layer in layers]
        weight = torch.cat([lin.weight for lin in linears])  # [13 * 6D - 4D, D]
        bias = torch.cat([lin.bias for lin in linears])
        mods = F.linear(F.silu(c), weight, bias).split([lin.out_features for lin in linears], dim=-1)
        return mods.__getitem__

    def _run(self, blocks, h, mods, rope_ids, v0, first_index=0, to_head=False):
        """Run `blocks` on h; caches block 0's v as v0; returns (h, pending, v0, tapped hidden).

        The stream is materialised (add_branch) at the REPA tap and at the end, where the caller
        uses it; with to_head the last block's MLP branch comes back pending, for norm_final.
        """
        pending = tap = None
        for i, block in enumerate(blocks, start=first_index):
            h, pending, v_raw = block(h, mods(i), self.feat_rope, rope_ids, v0, pending)
            if i == 0 and self.cfg.value_residual:
                v0 = v_raw
            if i + 1 == self.cfg.repa_depth:
                h, pending = add_branch(h, pending), None
                tap = h
        if not to_head:
            h, pending = add_branch(h, pending), None
        return h, pending, v0, tap

    def forward(self, x, t, y, cls=None, *, route: bool | None = None, path_drop: bool = False,
                generator: torch.Generator | None = None, keep_ids: torch.Tensor | None = None) -> ModelOutput:
        """x [B,C,H,W] noisy latent, t [B] in [0,1], y [B] labels (NULL_CLASS = unconditional),
        cls [B, teacher_dim] noisy REG class token.

        route=None routes in training mode only; route=True/False forces it. path_drop=True
        replaces the sparse stream by [MASK] for the whole batch without computing the routed
        blocks. Kept ids come from `keep_ids` [B, K] if given, else are drawn with `generator`.
        """
        cfg = self.cfg
        B = x.shape[0]
        h = self.x_embedder(x)  # [B, P, D]
        if cfg.reg_token:
            if cls is None:
                raise ValueError("this model has a REG class token: pass cls [B, teacher_dim]")
            token = self.ops.rms_norm(self.cls_projectors2(cls), self.wg_norm.weight, 1e-6)  # [B, D]
            h = torch.cat([token.unsqueeze(1), h], dim=1)  # [B, T, D]
        h = h + self.pos_embed  # [B, T, D]
        c = self.t_embedder(t) + self.y_embedder(y)  # [B, D]
        mods = self.modulations(c)  # mods(i): [B, 6D] of block i, mods(depth): [B, 2D] of the final layer
        rope_ids = self.rope_ids.expand(B, -1)  # [B, T]

        if not cfg.sprint:
            h, pending, _, tap = self._run(self.blocks, h, mods, rope_ids, None, to_head=True)
            return self._head(h, pending, mods(cfg.depth), tap)

        # 1) dense encoder on all tokens
        n_enc, n_mid = cfg.sprint_encoder_depth, cfg.routed_depth
        enc, _, v0, tap = self._run(self.blocks[:n_enc], h, mods, rope_ids, None)  # [B, T, D]
        # 2) routed middle blocks on the kept tokens (all tokens when not routing)
        route = self.training if route is None else route
        mid_blocks = self.blocks[n_enc: n_enc + n_mid]
        ids = None
        if path_drop:
            g = None  # Q3 fixed: the routed blocks are not computed at all
        elif route:
            ids = keep_ids if keep_ids is not None else select_tokens(
                B, enc.shape[1], cfg.num_kept, keep_first=cfg.reg_token and not cfg.quirk_cls_may_drop,
                generator=generator, device=enc.device)  # [B, K]
            sparse_rope_ids = rope_ids.gather(1, ids)  # [B, K]: tokens keep their grid position
            if cfg.quirk_rotate_routed_cls:
                sparse_rope_ids = sparse_rope_ids.clamp(min=0)  # Q1: a kept class token rotates as (0, 0)
            # v0 at the kept tokens once for all routed blocks: its gradient is summed over them at
            # [B, K, H, Dh] and scattered once, not zero-filled to [B, T, H, Dh] and added per block
            kept_v0 = self.ops.gather_tokens(v0, ids) if v0 is not None else None  # [B, K, H, Dh]
            g, _, _, _ = self._run(mid_blocks, self.ops.gather_tokens(enc, ids), mods, sparse_rope_ids, kept_v0,
                                   first_index=n_enc)  # [B, K, D]
        else:
            g, _, _, _ = self._run(mid_blocks, enc, mods, rope_ids, v0, first_index=n_enc)  # [B, T, D]
        # 3) pad with [MASK] and fuse with the encoder output
        h = self.ops.sprint_fuse(enc, g, ids, self.mask_token, self.fusion_proj.weight, self.fusion_proj.bias)
        if path_drop and torch.is_grad_enabled():
            h = _TieZeroGrads.apply(h, *[p for p in mid_blocks.parameters() if p.requires_grad])
        # 4) dense decoder on all tokens
        h, pending, _, _ = self._run(self.blocks[n_enc + n_mid:], h, mods, rope_ids, v0, first_index=n_enc + n_mid,
                                     to_head=True)
        return self._head(h, pending, mods(cfg.depth), tap)

    def _head(self, h, pending, mod, tap) -> ModelOutput:
        out, v_cls = self.final_layer(h, mod, self.cfg.reg_token, pending)  # [B, P, p*p*C]
        repa = self.projectors[0](tap)  # [B, T, teacher_dim]
        return ModelOutput(self.unpatchify(out), v_cls, repa, tap)


def build_model(cfg) -> SRDiT:
    """SRDiT from a Config or a ModelConfig."""
    return SRDiT(getattr(cfg, "model", cfg))


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

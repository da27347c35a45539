"""Analytic FLOP counts of a training image (DESIGN.md "Performance method").

Counted: matrix multiplications only (2 FLOPs per multiply-add), which is what MFU compares
against the card's matmul peak; elementwise work, norms and softmax are left out. Backward
costs twice the forward (grads of inputs and of weights), so a training step is 3x forward.
Routed blocks run on K kept tokens in training; on path-drop steps (5%) they do not run at
all, and the expected count says so.
"""
from __future__ import annotations

from dataclasses import dataclass

from srdit.config import ModelConfig


def block_forward(tokens: int, cfg: ModelConfig) -> int:
    """Matmul FLOPs of one transformer block's forward on `tokens` tokens of one image."""
    D, N = cfg.hidden, tokens
    hidden = int(cfg.hidden * cfg.mlp_ratio)
    mlp = 2 * N * (D * hidden + hidden * D)
    if cfg.mlp_act == "swiglu":
        h = int(2 * hidden / 3)
        mlp = 2 * N * (D * 2 * h + h * D)
    qkv_proj = 2 * N * (D * 3 * D + D * D)
    scores_and_values = 2 * 2 * N * N * D  # q k^T and attn v over all heads
    adaln = 2 * D * 6 * D  # once per image, from the conditioning vector
    return mlp + qkv_proj + scores_and_values + adaln


@dataclass(frozen=True)
class StepFlops:
    forward: int  # one image, forward, training routing (no path drop)
    forward_path_drop: int  # one image, forward, path-dropped step
    train: float  # one image, forward + backward, expected over the path-drop coin


def model_flops(cfg: ModelConfig, path_drop_prob: float = 0.0) -> StepFlops:
    """Matmul FLOPs of SR-DiT for one training image."""
    D, T, P = cfg.hidden, cfg.num_tokens, cfg.grid**2
    C_in = cfg.in_channels * cfg.patch_size**2
    embed = 2 * P * C_in * D + 2 * (256 * D + D * D)  # patchify conv, timestep MLP
    if cfg.reg_token:
        embed += 2 * cfg.teacher_dim * D  # REG token projection
    projector = 2 * T * (D * cfg.projector_dim + cfg.projector_dim**2 + cfg.projector_dim * cfg.teacher_dim)
    final = 2 * D * 2 * D + 2 * P * D * C_in + (2 * D * cfg.teacher_dim if cfg.reg_token else 0)
    if not cfg.sprint:
        body = cfg.depth * block_forward(T, cfg)
        fwd = embed + body + projector + final
        return StepFlops(fwd, fwd, 3.0 * fwd)
    dense = (cfg.sprint_encoder_depth + cfg.sprint_decoder_depth) * block_forward(T, cfg)
    routed = cfg.routed_depth * block_forward(cfg.num_kept, cfg)
    fuse = 2 * T * 2 * D * D  # as the release computes it: Linear(2D -> D) on every token
    fwd = embed + dense + routed + fuse + projector + final
    fwd_drop = fwd - routed
    expected = (1 - path_drop_prob) * fwd + path_drop_prob * fwd_drop
    return StepFlops(fwd, fwd_drop, 3.0 * expected)


def sampling_flops(cfg: ModelConfig) -> int:
    """Matmul FLOPs of one sampling forward of one image: routing is off, so the routed blocks
    run on all tokens."""
    f = model_flops(cfg)
    return f.forward_path_drop + (cfg.routed_depth * block_forward(cfg.num_tokens, cfg) if cfg.sprint else 0)


def teacher_flops(arch: str, resolution: int, mlp_ratio: float = 4.0) -> int:
    """Forward matmul FLOPs of the DINOv2 teacher `arch` on one image of `resolution` px."""
    from srdit.model.dinov2 import ARCHS

    a = ARCHS[arch]
    D, N = a.embed_dim, (resolution // a.patch) ** 2 + 1
    per_block = 2 * N * (D * 3 * D + D * D + 2 * D * int(D * mlp_ratio)) + 2 * 2 * N * N * D
    patchify = 2 * (N - 1) * 3 * a.patch**2 * D
    return a.depth * per_block + patchify

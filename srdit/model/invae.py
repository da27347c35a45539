"""E2E-INVAE tokenizer (REPA-E `VAE_F16D32`): an LDM-style KL autoencoder, 16x down, 32 channels.

Written from the latent-diffusion autoencoder's math. The state_dict equals the published file
`e2e-invae-400k.pt` (HF repo REPA-E/e2e-invae) key for key, shape for shape, in the same order
(shared/layouts/invae_f16d32.json, 342 tensors, 69.8M parameters).

Architecture (ch 128, ch_mult (1,1,2,2,4) -> widths 128,128,256,256,512; GroupNorm(32, eps 1e-6)
and swish everywhere; attention only at feature resolution 16, i.e. the lowest level for the
256-px build the module was designed for; the rule is fixed at construction, not at run time):

    encoder: conv_in 3->128; down.0..4, each 2 ResnetBlocks (+2 AttnBlocks at level 4),
             downsample (asymmetric pad (0,1,0,1), 3x3 stride-2 conv) after levels 0..3;
             mid (block_1, attn_1, block_2); norm_out, swish, conv_out 512->64 (double_z)
    quant_conv 1x1 64->64 -> moments: mean = ch 0..31, logvar = ch 32..63 clamped to [-30, 20]
    post_quant_conv 1x1 32->32
    decoder: conv_in 32->512; mid; up.4..0 (run from 4, the lowest resolution, to 0; stored in
             index order 0..4), each 3 ResnetBlocks (+3 AttnBlocks at level 4), upsample
             (nearest x2 + 3x3 conv) after levels 4..1; norm_out, swish, conv_out 128->3

Pixels are float in [-1, 1] (`pixels_from_uint8`); latents are one posterior *sample* (SPEC 1).
The training scale 0.3099 (config.LATENT_SCALE) is applied only by `encode_scaled` /
`decode_scaled`, never inside encode/decode.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from srdit.config import LATENT_SCALE
from srdit.model.weights import describe_mismatch, load_state_file

INVAE_FILE = "e2e-invae-400k.pt"
LOGVAR_RANGE = (-30.0, 20.0)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def pixels_from_uint8(u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return u8.float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded float pixels -> uint8, as the release: clamp(255 * (x + 1) / 2, 0, 255), truncated
    (not rounded) by the cast, so 0.999 -> 254 (SPEC 5)."""
    x = (pixels.float() + 1.0) / 2.0
    return torch.clamp(255.0 * x, 0.0, 255.0).to(torch.uint8)


# ------------------------------------------------------------------------------------------
# building blocks (attribute names are the checkpoint's key names)
# ------------------------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    """h = conv2(swish(norm2(conv1(swish(norm1(x)))))); out = shortcut(x) + h.
    The shortcut is a 1x1 conv `nin_shortcut` where the width changes, else identity."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))  # [B, Co, H, W]
        h = self.conv2(swish(self.norm2(h)))  # [B, Co, H, W] (dropout 0)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)  # [B, Co, H, W]
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, C-dim, 1x1-conv q/k/v/proj_out:
    out = x + proj_out(softmax(q k^T / sqrt(C)) v)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)  # [B, C, H, W]

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)  # [B, 1, HW, C]

        y = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))  # [B,1,HW,C]
        y = y.transpose(-1, -2).reshape(b, c, h, w)  # [B, C, H, W]
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """LDM asymmetric downsample: zero-pad right and bottom by 1, then 3x3 conv stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # [B, C, H+1, W+1]
        return self.conv(x)  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    """Nearest-neighbour x2, then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [B, C, 2H, 2W]
        return self.conv(x)  # [B, C, 2H, 2W]


class Level(nn.Module):
    """One resolution level: `block` ResnetBlocks, `attn` AttnBlocks (empty or one per block),
    then an optional `downsample` / `upsample` (registered in that order, as in the file)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attn: bool, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks if attn else 0))
        self.downsample = Downsample(c_out) if resample == "down" else None
        self.upsample = Upsample(c_out) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)  # [B, Co, H, W]
            if len(self.attn):
                x = self.attn[i](x)  # [B, Co, H, W]
        if self.downsample is not None:
            x = self.downsample(x)  # [B, Co, H/2, W/2]
        if self.upsample is not None:
            x = self.upsample(x)  # [B, Co, 2H, 2W]
        return x


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))  # [B, C, H, W]


# ------------------------------------------------------------------------------------------
# encoder / decoder
# ------------------------------------------------------------------------------------------
CH, CH_MULT, Z_CHANNELS, RESOLUTION, ATTN_RESOLUTIONS = 128, (1, 1, 2, 2, 4), 32, 256, (16,)


class Encoder(nn.Module):
    def __init__(self, ch=CH, ch_mult=CH_MULT, num_res_blocks=2, z_channels=Z_CHANNELS):
        super().__init__()
        n = len(ch_mult)
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, c_in = RESOLUTION, ch
        for level in range(n):
            self.down.append(
                Level(c_in, widths[level], num_res_blocks, res in ATTN_RESOLUTIONS, "down" if level < n - 1 else None)
            )
            c_in = widths[level]
            res //= 2 if level < n - 1 else 1
        self.mid = Mid(c_in)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * z_channels, 3, padding=1)  # double_z: mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, 128, H, W]
        for level in self.down:
            h = level(h)  # ... -> [B, 512, H/16, W/16]
        h = self.mid(h)  # [B, 512, H/16, W/16]
        return self.conv_out(swish(self.norm_out(h)))  # [B, 64, H/16, W/16]


class Decoder(nn.Module):
    def __init__(self, ch=CH, ch_mult=CH_MULT, num_res_blocks=2, z_channels=Z_CHANNELS):
        super().__init__()
        n = len(ch_mult)
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        # Built from the lowest resolution (level n-1) upwards; stored in index order 0..n-1.
        levels = {}
        res, c_in = RESOLUTION // 2 ** (n - 1), widths[-1]
        for level in reversed(range(n)):
            levels[level] = Level(
                c_in, widths[level], num_res_blocks + 1, res in ATTN_RESOLUTIONS, "up" if level > 0 else None
            )
            c_in = widths[level]
            res *= 2 if level > 0 else 1
        self.up = nn.ModuleList(levels[level] for level in range(n))
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # [B, 512, h, w]
        h = self.mid(h)  # [B, 512, h, w]
        for level in reversed(self.up):
            h = level(h)  # ... -> [B, 128, 16h, 16w]
        return self.conv_out(swish(self.norm_out(h)))  # [B, 3, 16h, 16w]


# ------------------------------------------------------------------------------------------
# the autoencoder
# ------------------------------------------------------------------------------------------
class INVAE(nn.Module):
    """REPA-E E2E-INVAE (`VAE_F16D32`): pixels [-1,1] [B,3,H,W] <-> latents [B,32,H/16,W/16]."""

    def __init__(self, embed_dim: int = Z_CHANNELS):
        super().__init__()
        self.encoder = Encoder(z_channels=embed_dim)
        self.decoder = Decoder(z_channels=embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    def freeze(self) -> INVAE:
        self.eval()
        self.requires_grad_(False)
        return self

    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B,3,H,W] in [-1,1] -> (mean, logvar), each [B,32,H/16,W/16]; logvar clamped."""
        moments = self.quant_conv(self.encoder(pixels))  # [B, 64, H/16, W/16]
        mean, logvar = moments.chunk(2, dim=1)  # 2 x [B, 32, H/16, W/16]
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One posterior sample mean + exp(logvar / 2) * eps, eps ~ N(0, I) drawn from
        `generator` (on the generator's device, then moved) or the global RNG of pixels' device."""
        mean, logvar = self.encode_moments(pixels)  # [B, 32, h, w]
        std = torch.exp(0.5 * logvar)
        device = mean.device if generator is None else generator.device
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        return mean + std * eps.to(mean.device)  # [B, 32, h, w]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latent [B,32,h,w] (unscaled) -> pixels [B,3,16h,16w], roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def encode_scaled(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
                      scale: float = LATENT_SCALE) -> torch.Tensor:
        """The diffusion model's latent: encode(pixels) * scale (data.latent_scale: 0.3099, no shift)."""
        return self.encode(pixels, generator) * scale

    def decode_scaled(self, z: torch.Tensor, scale: float = LATENT_SCALE) -> torch.Tensor:
        """Inverse of encode_scaled's scaling: decode(z / scale)."""
        return self.decode(z / scale)


# ------------------------------------------------------------------------------------------
# builder and loader
# ------------------------------------------------------------------------------------------
def build_invae() -> INVAE:
    """Random-init INVAE (PyTorch default init; deterministic under torch.manual_seed)."""
    return INVAE()


def load_invae(path) -> INVAE:
    """Load `e2e-invae-400k.pt` (a flat state dict; a {"vae": sd} / {"state_dict": sd} wrapper
    is tolerated) strictly; returns a frozen model in eval mode."""
    sd = load_state_file(path, INVAE_FILE, ("vae", "state_dict"))
    model = INVAE()
    problem = describe_mismatch(sd, model.state_dict())
    if problem:
        raise ValueError(f"{os.fspath(path)} does not match the INVAE (expected the file {INVAE_FILE}): {problem}")
    model.load_state_dict(sd, strict=True)
    return model.freeze()

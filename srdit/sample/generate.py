"""From a trained SR-DiT to images: the model as a sampler's `model_call`, the sampler chosen by
cfg.sample, and the decode to uint8 pixels.

The sampler state is (latent, class-token state) for models with a REG token: both start
from N(0, I) at t = 1 and are integrated jointly (SPEC 5).
"""
from __future__ import annotations

import torch

from srdit.config import Config
from srdit.flow import velocity_from_x0
from srdit.model.invae import to_uint8
from srdit.sample.samplers import euler_maruyama, guided, ode


STATE_DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def model_call(model, cfg: Config):
    """`call(state, t, y, *, path_drop) -> velocity` with the state's structure and dtype (no
    routing). The model sees fp32 inputs whatever the state's precision (the release integrates
    in float64 and feeds the model fp32; bf16 comes from sample.precision's autocast)."""
    reg, x0 = cfg.model.reg_token, cfg.train.prediction == "x0"

    def call(state, t, y, *, path_drop=False):
        x, cls = state if reg else (state, None)
        out = model(x.float(), t.float(), y, None if cls is None else cls.float(), route=False, path_drop=path_drop)
        v = out.v.to(x.dtype)
        v_cls = out.v_cls.to(cls.dtype) if reg else None
        if x0:
            v = velocity_from_x0(v, x, t, cfg.train.x0_t_min)
            v_cls = velocity_from_x0(v_cls, cls, t, cfg.train.x0_t_min) if reg else None
        return (v, v_cls) if reg else v

    return call


@torch.no_grad()
def generate(model, cfg: Config, labels: torch.Tensor, *, generator: torch.Generator | None = None,
             num_steps: int | None = None) -> torch.Tensor:
    """Latents [B, C, H, W] for `labels`, with cfg.sample's sampler, guidance, time shift and state
    precision (returned in it). The initial noise is drawn in fp32 and cast, as the release does;
    the SDE's noise is drawn in the state's precision."""
    m, s = cfg.model, cfg.sample
    device, dtype = labels.device, STATE_DTYPES[s.state_precision]
    shape = (labels.shape[0], m.in_channels, m.input_size, m.input_size)
    x = torch.randn(shape, generator=generator, device=device).to(dtype)
    state = (x, torch.randn((labels.shape[0], m.teacher_dim), generator=generator, device=device).to(dtype)) \
        if m.reg_token else x
    fn = guided(model_call(model, cfg), labels, s.guidance_scale, s.guidance_low, s.guidance_high, kind=s.guidance,
                null_label=m.num_classes, cls_scale=s.cls_guidance_scale)
    steps = num_steps or s.num_steps
    if s.sampler == "sde":
        state = euler_maruyama(fn, state, steps, t_min=s.t_min, shift=s.time_shift, generator=generator)
    else:
        state = ode(fn, state, steps, method=s.sampler, shift=s.time_shift)
    return state[0] if m.reg_token else state


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [N, 3, H, W] (SPEC 5 quantisation; grey images get 3 channels)."""
    u8 = to_uint8(pixels)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


def decode_uint8(latents: torch.Tensor, cfg: Config, vae=None) -> torch.Tensor:
    """Sampled latents -> uint8 [B, 3, H, W] (SPEC 5): latent / data.latent_scale (0.3099) -> INVAE decoder ->
    clamp(255 (x + 1) / 2, 0, 255) -> truncation. The quickstart's identity tokenizer (1 channel,
    pixel space) has no decoder: pixels = latents / data.latent_scale (1.0 there)."""
    latents = latents.float()  # the sampler's state may be float64; the decoder and the quantisation are fp32
    if cfg.model.in_channels == 1:
        return pixels_to_uint8(latents / cfg.data.latent_scale)
    if vae is None:
        raise ValueError("decoding latents needs the INVAE decoder: give data.invae (or --vae) the path of "
                         "e2e-invae-400k.pt")
    return pixels_to_uint8(vae.decode_scaled(latents, cfg.data.latent_scale))


def save_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """uint8 [N, 3, H, W] -> one PNG with `nrow` images per row."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.full((3, rows * (h + 2) + 2, nrow * (w + 2) + 2), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = images[i].cpu()
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(path)

"""Shared by the step tests: a StepRunner for a config on a device, and synthetic batches."""
import torch

from srdit.config import apply_overrides, preset
from srdit.model import build_model
from srdit.train.loss import draw_step_noise
from srdit.train.optim import EMA, Optimizers
from srdit.train.step import StepRunner


def build_runner(device, *overrides, teacher=False, optimizers=None, seed=0):
    """(cfg, runner) for the quickstart preset with `overrides`; random-init DINOv2 teacher if asked."""
    from srdit.model.dinov2 import build_dinov2

    cfg = apply_overrides(preset("quickstart"), list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    net = None
    if teacher:
        net = build_dinov2(cfg.data.teacher_arch, cfg.data.teacher_resolution, cfg.data.teacher_pos_interp)
        net = net.freeze().to(device)
    optimizers = optimizers if optimizers is not None else Optimizers(model, cfg.train, device)
    runner = StepRunner(cfg, model, model, net, optimizers, EMA(model, cfg.train.ema_decay), rank=0, world=1,
                        device=device)
    return cfg, runner


def synthetic_batch(cfg, batch, device, *, images=False, generator=None) -> dict:
    """Latents, labels and either uint8 images (online teacher) or fp16 teacher targets."""
    m = cfg.model
    kw = dict(device=device, generator=generator)
    out = {"latent": torch.randn(batch, m.in_channels, m.input_size, m.input_size, **kw),
           "label": torch.randint(0, m.num_classes, (batch,), **kw)}
    if images:
        r = cfg.data.resolution
        out["image"] = torch.randint(0, 256, (batch, 3, r, r), dtype=torch.uint8, **kw)
    else:
        out["teacher"] = torch.randn(batch, m.num_tokens, m.teacher_dim, **kw).half()
    return out


def step_noise(cfg, batch, device, *, generator=None, host_generator=None):
    return draw_step_noise(batch, (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size), cfg.model,
                           cfg.train, generator=generator, host_generator=host_generator, device=device)

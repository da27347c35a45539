"""Shared by the step tests: a StepRunner for a config on a device, and the step's noise. Batches
and the random-init teacher are bench/throughput.py's, so tests and benchmark feed the same step."""
import os
import sys

import torch

from srdit.config import apply_overrides, preset
from srdit.model import build_model
from srdit.train.loss import draw_step_noise
from srdit.train.optim import EMA, Optimizers
from srdit.train.step import StepRunner

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from throughput import build_teacher, synthetic_batch  # noqa: E402, F401  (re-exported for the tests)


def build_runner(device, *overrides, teacher=False, optimizers=None, seed=0):
    """(cfg, runner) for the quickstart preset with `overrides`; random-init DINOv2 teacher if asked."""
    cfg = apply_overrides(preset("quickstart"), list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    optimizers = optimizers if optimizers is not None else Optimizers(model, cfg.train, device)
    runner = StepRunner(cfg, model, model, build_teacher(cfg, device) if teacher else None, optimizers,
                        EMA(model, cfg.train.ema_decay), rank=0, world=1, device=device)
    return cfg, runner


def step_noise(cfg, batch, device, *, generator=None, host_generator=None):
    return draw_step_noise(batch, (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size), cfg.model,
                           cfg.train, generator=generator, host_generator=host_generator, device=device)

"""Shared by the step tests: the training step of a config on a device (srdit.train.assemble's
build_step, what srdit.train and bench/throughput.py run), and the step's noise. Batches and the
random-init teacher are srdit.train.inputs', the ones the benchmark feeds."""
import torch

from srdit.config import apply_overrides, preset
from srdit.model import build_model
from srdit.train.assemble import build_step
from srdit.train.inputs import build_teacher, synthetic_batch  # noqa: F401  (re-exported for the tests)
from srdit.train.loss import draw_step_noise


def build_runner(device, *overrides, teacher=False, optimizers=None, seed=0, graph_type=None,
                 compile_backend="aot_eager", reduce=None):
    """(cfg, step) for the quickstart preset with `overrides`; random-init DINOv2 teacher if asked.
    The step is a StepRunner, or a GraphedStep (captured with graph_type) with train.cuda_graphs;
    train.compile uses compile_backend (aot_eager: dynamo and AOT autograd without inductor's
    CPU codegen, seconds instead of minutes)."""
    cfg = apply_overrides(preset("quickstart"), list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    frozen = build_teacher(cfg, device, random_init=True)[0] if teacher else None
    return cfg, build_step(cfg, model, frozen, device=device, optimizers=optimizers, graph_type=graph_type,
                           compile_backend=compile_backend, reduce=reduce)


def step_noise(cfg, batch, device, *, generator=None, host_generator=None):
    return draw_step_noise(batch, (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size), cfg.model,
                           cfg.train, generator=generator, host_generator=host_generator, device=device)

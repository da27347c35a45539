"""No host sync in a training step (DESIGN.md "One training step"), checked without a GPU.

On the meta device a tensor has no data, so every operation that would read a device value on
the host (.item(), bool(t), .tolist(), data-dependent shapes such as nonzero or boolean
indexing, a 0-dim tensor passed where a Python number is expected) raises. A step that runs
through on meta tensors is therefore free of host syncs: the property CUDA-graph capture needs.
The fused AdamW kernel has no meta implementation; the runner is given an optimizer that records
the skip flag instead (torch's fused AdamW takes that flag on the device, see srdit.train.optim).
"""
from types import SimpleNamespace

import pytest
import torch

from srdit.config import apply_overrides, preset
from srdit.train.loss import draw_step_noise
from srdit.train.optim import EMA
from srdit.train.step import DeviceMetrics, StepRunner

META = torch.device("meta")


def _runner(kernels: str, cached: bool):
    from srdit.model import build_model
    from srdit.model.dinov2 import build_dinov2

    cfg = apply_overrides(preset("quickstart"), [f"model.kernels={kernels}", f"model.batched_adaln={kernels == 'triton'}",
                                                 f"data.cached_teacher={cached}"])
    model = build_model(cfg).to(META)
    teacher = None if cached else build_dinov2(cfg.data.teacher_arch, cfg.data.teacher_resolution,
                                               cfg.data.teacher_pos_interp).freeze().to(META)
    flags = []
    optimizers = SimpleNamespace(step=flags.append)
    runner = StepRunner(cfg, model, model, teacher, optimizers, EMA(model, cfg.train.ema_decay), rank=0, world=1,
                        device=META)
    return cfg, runner, flags


def _batch(cfg, batch: int, cached: bool) -> dict:
    m = cfg.model
    out = {"latent": torch.randn(batch, m.in_channels, m.input_size, m.input_size, device=META),
           "label": torch.randint(0, m.num_classes, (batch,), device=META)}
    if cached:
        out["teacher"] = torch.randn(batch, m.num_tokens, m.teacher_dim, device=META, dtype=torch.float16)
    else:
        r = cfg.data.resolution
        out["image"] = torch.randint(0, 256, (batch, 3, r, r), device=META, dtype=torch.uint8)
    return out


@pytest.mark.parametrize("kernels,cached", [("eager", False), ("eager", True), ("triton", True)])
def test_a_training_step_reads_nothing_on_the_host(kernels, cached):
    cfg, runner, flags = _runner(kernels, cached)
    micro, accum = 2, 2
    batches = [_batch(cfg, micro, cached) for _ in range(accum)]
    host = torch.Generator().manual_seed(0)
    metrics = DeviceMetrics(META)
    for path_drop in (False, True):  # both graphs a path-drop run captures
        noise = draw_step_noise(micro * accum, batches[0]["latent"].shape[1:], cfg.model, cfg.train,
                                host_generator=host, device=META)
        noise.path_drop = path_drop
        values = runner.run(batches, noise)
        metrics.add(values)
    assert len(flags) == 2 and all(f.device == META and f.dim() == 0 for f in flags)
    assert {k: v.device for k, v in values.items()} == {k: META for k in values}


def test_the_detector_catches_a_host_read():
    """The premise of the tests above: reading a meta tensor on the host raises."""
    x = torch.ones((), device=META)
    for read in (lambda: x.item(), lambda: bool(x > 0), lambda: torch.ones(3, device=META)[torch.ones(3, device=META) > 0],
                 lambda: torch._foreach_lerp_([torch.ones(2, device=META)], [torch.ones(2, device=META)], x)):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()

"""No host sync in a training step (DESIGN.md "One training step"), checked without a GPU.

On the meta device a tensor has no data, so every operation that would read a device value on
the host (.item(), bool(t), .tolist(), data-dependent shapes such as nonzero or boolean
indexing, a 0-dim tensor passed where a Python number is expected) raises. A step that runs
through on meta tensors is therefore free of host syncs: the property CUDA-graph capture needs.
The fused AdamW kernel has no meta implementation; the runner is given an optimizer that records
the skip flag and the clip's grad_scale instead (torch's fused AdamW takes both on the device, see
srdit.train.optim).
"""
from types import SimpleNamespace

import pytest
import torch
from runners import build_runner, step_noise, synthetic_batch

from srdit.train.step import DeviceMetrics

META = torch.device("meta")


@pytest.mark.parametrize("kernels,cached", [("eager", False), ("eager", True), ("triton", True)])
def test_a_training_step_reads_nothing_on_the_host(kernels, cached):
    flags = []  # the skip flag and the clip's grad_scale each step hands to fused AdamW
    cfg, runner = build_runner(META, f"model.kernels={kernels}", f"model.batched_adaln={kernels == 'triton'}",
                               teacher=not cached, optimizers=SimpleNamespace(
                                   step=lambda found_inf, grad_scale: flags.append((found_inf, grad_scale)),
                                   device_skip=True, sharded=False, gather_weights=lambda wait=True: [],
                                   attach_gradients=lambda gradients: None))
    micro, accum = 2, 2
    batches = [synthetic_batch(cfg, micro, META, cached=cached) for _ in range(accum)]
    host = torch.Generator().manual_seed(0)
    metrics = DeviceMetrics(META)
    for path_drop in (False, True):  # both graphs a path-drop run captures
        noise = step_noise(cfg, micro * accum, META, host_generator=host)
        noise.path_drop = path_drop
        values = runner.run(batches, noise)
        metrics.add(values)
    assert len(flags) == 2 and all(t.device == META and t.dim() == 0 for pair in flags for t in pair)
    assert {k: v.device for k, v in values.items()} == {k: META for k in values}


def test_the_detector_catches_a_host_read():
    """The premise of the tests above: reading a meta tensor on the host raises."""
    x = torch.ones((), device=META)
    mask = torch.ones(3, device=META) > 0
    for read in (lambda: x.item(), lambda: bool(x > 0), lambda: torch.ones(3, device=META)[mask],
                 lambda: torch._foreach_lerp_([torch.ones(2, device=META)], [torch.ones(2, device=META)], x)):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()

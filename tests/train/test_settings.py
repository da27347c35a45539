"""Settings whose value 0 means "off" are off, not a degenerate version of on."""
import os

import pytest
import torch
from runners import build_runner, step_noise, synthetic_batch
from test_train import run

CPU = torch.device("cpu")


def one_update(clip: str) -> list[torch.Tensor]:
    cfg, step = build_runner(CPU, "data.cached_teacher=true", f"train.grad_clip={clip}")
    batch = synthetic_batch(cfg, 4, CPU, cached=True, generator=torch.Generator().manual_seed(1))
    values = step.run([batch], step_noise(cfg, 4, CPU, generator=torch.Generator().manual_seed(2),
                                          host_generator=torch.Generator().manual_seed(3)))
    assert values["grad_norm"] > 1e-3  # measured and logged either way
    adamw = step.optimizers.optimizers[0]
    return [adamw.state[p]["exp_avg"].clone() for p in step.model.parameters() if p.requires_grad]  # (1 - b1) g


def test_grad_clip_zero_turns_clipping_off():
    off, huge, tight = one_update("0"), one_update("1e30"), one_update("1e-3")
    assert all(torch.equal(a, b) for a, b in zip(off, huge))  # the unclipped gradient
    norm = lambda grads: torch.cat([g.flatten() for g in grads]).norm()  # noqa: E731
    assert norm(tight) < 1e-2 * norm(off)  # (a tight clip does scale it down)


def test_sample_every_zero_draws_no_sample_grid(tmp_path):
    assert run(tmp_path, "train.max_steps=2", "train.sample_every=0") == 0
    assert not os.path.exists(tmp_path / "samples") or not os.listdir(tmp_path / "samples")


def test_ema_release_arithmetic_is_the_releases_and_lerp_the_exact_average():
    from srdit.train.optim import EMA

    model = torch.nn.Linear(7, 5)
    for rule in ("release", "lerp"):
        ema = EMA(model, 0.9999, rule)
        expected = [p.detach().clone() for p in ema.model.parameters()]
        for step in range(4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            skipped = step == 2
            ema.update(torch.tensor(float(skipped)))
            if not skipped:
                for e, p in zip(expected, model.parameters()):
                    if rule == "release":  # the release's update_ema, literally
                        e.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)
                    else:
                        e.lerp_(p.detach(), 1 - 0.9999)
            assert all(torch.equal(e, a) for e, a in zip(expected, ema.model.parameters())), (rule, step)
    # the release's fp32 coefficients do not sum to 1: a constant weight is not its own average
    constant = torch.nn.Linear(3, 3)
    release, lerp = EMA(constant, 0.9999, "release"), EMA(constant, 0.9999, "lerp")
    for _ in range(50):
        release.update(torch.zeros(()))
        lerp.update(torch.zeros(()))
    assert torch.equal(lerp.model.weight, constant.weight)
    assert not torch.equal(release.model.weight, constant.weight)


def test_lr_decay_steps_zero_keeps_the_lr_and_n_decays_it_over_the_last_n_updates(tmp_path):
    import json

    from srdit.train.optim import lr_factor

    assert [lr_factor(s, 10, 0) for s in range(10)] == [1.0] * 10  # the release's constant lr
    assert [lr_factor(s, 10, 4) for s in range(10)] == [1.0] * 7 + [0.75, 0.5, 0.25]
    assert run(tmp_path, "train.max_steps=4", "train.log_every=1", "train.lr=1e-3", "train.lr_decay_steps=3") == 0
    with open(tmp_path / "metrics.jsonl") as f:
        logged = [json.loads(line)["lr"] for line in f]
    assert logged == pytest.approx([1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3], rel=1e-6)  # a tensor lr is fp32

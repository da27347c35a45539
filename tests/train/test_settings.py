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
    state = step.optimizers.state_dict()[0]["state"]  # per parameter, as a checkpoint holds it
    return [state[i]["exp_avg"].clone() for i in sorted(state)]  # (1 - b1) g


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


def test_flat_parameters_make_the_ema_one_kernel_with_the_same_arithmetic():
    """flatten_parameters keeps every value and key; the EMA over flat weights computes what the
    per-parameter lists compute, bit for bit (both rules, with a skipped step), in a handful of
    ops instead of several per parameter, and stays flat through a checkpoint load."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    from srdit.config import preset
    from srdit.model import build_model
    from srdit.train.flat import flat_view, flatten_parameters
    from srdit.train.optim import EMA

    class CountOps(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.calls += 1
            return func(*args, **(kwargs or {}))

    flat, lists = build_model(preset("quickstart")), None
    lists = copy.deepcopy(flat)
    before = {k: v.clone() for k, v in flat.state_dict().items()}
    flatten_parameters(flat)
    assert flat_view(list(flat.parameters())) is not None and flat_view(list(lists.parameters())) is None
    base = next(flat.parameters()).data_ptr()  # each view aligned as a tensor of its own (Triton, GEMMs)
    assert all((p.data_ptr() - base) % 256 == 0 for p in flat.parameters())
    assert all(torch.equal(before[k], v) for k, v in flat.state_dict().items())
    for rule in ("release", "lerp"):
        a, b = EMA(flat, 0.99, rule), EMA(lists, 0.99, rule)
        for step in range(4):
            with torch.no_grad():
                for p, q in zip(flat.parameters(), lists.parameters()):
                    d = torch.randn_like(p)
                    p.add_(d)
                    q.add_(d)
            skipped = torch.tensor(float(step == 2))
            CountOps.calls = 0
            with CountOps():
                a.update(skipped)
            assert CountOps.calls <= 8, CountOps.calls  # a few scalar ops and one or two passes
            b.update(skipped)
            assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters())), (rule, step)
        a.load_state_dict(b.state_dict())
        assert flat_view(list(a.model.parameters())) is not None


def test_grad_clip_as_adamw_grad_scale_is_clip_grad_norm_then_the_step():
    """The clip rides in fused AdamW's grad_scale (no pass of its own over the gradients): the
    update equals torch's clip_grad_norm_ followed by the plain step, to fp32 rounding (a division
    by the scale instead of a product with its inverse)."""
    import copy

    from srdit.config import preset
    from srdit.train.optim import Optimizers
    from srdit.train.step import StepRunner

    cfg = preset("quickstart")
    folded, plain = torch.nn.Linear(16, 8), None
    plain = copy.deepcopy(folded)
    for model in (folded, plain):
        for p in model.parameters():
            p.grad = torch.full_like(p, 3.0) + torch.arange(p.numel()).view_as(p) / 7  # norm >> the clip
    opt_folded, opt_plain = Optimizers(folded, cfg.train, CPU), Optimizers(plain, cfg.train, CPU)
    runner = StepRunner.__new__(StepRunner)  # only .clip is used: its config and optimizers
    runner.cfg, runner.optimizers, runner.params = cfg, opt_folded, list(folded.parameters())
    norm = torch.nn.utils.get_total_norm([p.grad for p in folded.parameters()])
    scale = runner.clip(norm)
    assert scale is not None and scale > 1
    opt_folded.step(torch.zeros(()), scale)
    torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip)
    opt_plain.step(torch.zeros(()))
    for a, b in zip(folded.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(opt_folded.optimizers[0].state.values(), opt_plain.optimizers[0].state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-6, atol=1e-9)

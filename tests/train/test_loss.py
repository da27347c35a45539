"""Every loss term against a hand computation (SPEC section 3)."""
import math

import pytest
import torch

from srdit import flow
from srdit.config import NULL_CLASS, apply_overrides, preset
from srdit.model import build_model
from srdit.train import loss as L


def test_interpolant_and_target():
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t, v = flow.interpolate(x, eps, t)
    for i, ti in enumerate(t.tolist()):
        assert torch.allclose(x_t[i], (1 - ti) * x[i] + ti * eps[i])
    assert torch.equal(v, eps - x)


def test_time_shift_matches_formula_and_clamps():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_time(10_000, math.sqrt(2), generator=g)
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    s = math.sqrt(2)
    assert torch.allclose(t, s * u / (1 + (s - 1) * u))
    assert t.min() >= 0 and t.max() <= 1
    assert t.mean() > u.mean()  # s > 1 moves mass toward noise
    assert torch.equal(flow.sample_time(5, 1.0, generator=torch.Generator().manual_seed(3)),
                       torch.rand(5, generator=torch.Generator().manual_seed(3)))


def test_velocity_mse_is_per_sample_mean_then_batch_mean():
    a, b = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    per_sample = [((a[i] - b[i]) ** 2).sum().item() / 12 for i in range(4)]
    assert math.isclose(L.mean_flat((a - b) ** 2).mean().item(), sum(per_sample) / 4, rel_tol=1e-6)


def test_repa_loss_is_negative_mean_cosine():
    pred, target = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64)
    expected = torch.zeros(2, dtype=torch.float64)
    for b in range(2):
        for n in range(5):
            p, q = pred[b, n], target[b, n]
            expected[b] -= (p @ q) / (p.norm() * q.norm()) / 5
    assert torch.allclose(L.repa_loss(pred, target), expected, atol=1e-14)
    assert torch.allclose(L.repa_loss(target, target), -torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("time_weighted", [False, True])
def test_cfm_negatives_are_the_batch_rolled_targets(time_weighted):
    pred, target = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    total = 0.0
    for i in range(4):  # sample i's negative is sample i-1's target (roll by one)
        w = t[i] if time_weighted else 1.0
        total += (w * (pred[i] - target[(i - 1) % 4]) ** 2).sum()
    expected = -total / pred.numel()
    assert torch.allclose(L.cfm_loss(pred, target, t if time_weighted else None), expected, atol=1e-14)


def test_dispersive_loss_against_double_loop():
    h = torch.randn(5, 3, 4, dtype=torch.float64)
    z = h.reshape(5, -1)
    acc = 0.0
    for i in range(5):
        for j in range(5):
            acc += math.exp(-((z[i] - z[j]) ** 2).sum().item() / z.shape[1] / 0.5)
    assert math.isclose(L.dispersive_loss(h, 0.5).item(), math.log(acc / 25), rel_tol=1e-10)


def test_x0_prediction_as_velocity():
    x0, eps = torch.randn(3, 2, 2, 2, dtype=torch.float64), torch.randn(3, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.5, 0.9, 0.01], dtype=torch.float64)
    x_t, v = flow.interpolate(x0, eps, t)
    recovered = flow.velocity_from_x0(x0, x_t, t, t_min=0.05)
    assert torch.allclose(recovered[:2], v[:2], atol=1e-12)  # exact where t >= t_min
    assert torch.allclose(recovered[2], (x_t[2] - x0[2]) / 0.05)


def test_label_dropout_uses_the_null_class():
    y = torch.arange(6)
    drop = torch.tensor([True, False, True, False, False, True])
    assert L.drop_labels(y, drop).tolist() == [NULL_CLASS, 1, NULL_CLASS, 3, 4, NULL_CLASS]


def test_step_noise_is_reproducible_sliceable_and_path_drop_coin_is_host_side():
    cfg = apply_overrides(preset("quickstart"), ["train.path_drop_prob=0.5", "train.label_dropout=0.5"])

    def draw(seed_dev, seed_host, batch=64):
        return L.draw_step_noise(batch, (1, 16, 16), cfg.model, cfg.train, generator=torch.Generator().manual_seed(seed_dev),
                                 host_generator=torch.Generator().manual_seed(seed_host))

    a, b = draw(1, 2), draw(1, 2)
    assert torch.equal(a.t, b.t) and torch.equal(a.eps, b.eps) and torch.equal(a.eps_cls, b.eps_cls)
    assert torch.equal(a.keep_ids, b.keep_ids) and a.keep_ids.shape == (64, cfg.model.num_kept)
    assert isinstance(a.path_drop, bool) and a.path_drop == b.path_drop
    coins = {draw(1, s).path_drop for s in range(20)}
    assert coins == {True, False}  # the host generator alone decides the coin
    assert 0.3 < a.drop_label.float().mean() < 0.7
    part = a.rows(16, 32)
    assert torch.equal(part.eps, a.eps[16:32]) and torch.equal(part.keep_ids, a.keep_ids[16:32])
    assert part.path_drop == a.path_drop


@pytest.mark.parametrize("variant", ["default", "x0", "dispersive", "time-weighted-cfm"])
def test_total_loss_is_the_weighted_sum_of_hand_computed_parts(variant):
    overrides = {"x0": ["train.prediction=x0"], "dispersive": ["train.dispersive_weight=0.25"],
                 "time-weighted-cfm": ["train.cfm_time_weighted=true", "train.cfm_weight=0.1"]}.get(variant, [])
    cfg = apply_overrides(preset("quickstart"), overrides)
    model = build_model(cfg).double().train()
    with torch.no_grad():  # leave the zero init so the output depends on every layer
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    B, m = 6, cfg.model
    x = torch.randn(B, m.in_channels, m.input_size, m.input_size, dtype=torch.float64)
    y = torch.randint(0, m.num_classes, (B,))
    teacher = torch.randn(B, m.num_tokens, m.teacher_dim, dtype=torch.float64)
    noise = L.draw_step_noise(B, x.shape[1:], cfg.model, cfg.train, generator=torch.Generator().manual_seed(0),
                              host_generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise.path_drop = False
    total, parts = L.diffusion_loss(model, x, y, teacher, noise, cfg.train)

    # by hand: same inputs, same routing generator
    t = noise.t.view(B, 1, 1, 1)
    x_t, v_target = (1 - t) * x + t * noise.eps, noise.eps - x
    c = teacher[:, 0]
    c_t, c_target = (1 - noise.t[:, None]) * c + noise.t[:, None] * noise.eps_cls, noise.eps_cls - c
    y_in = torch.where(noise.drop_label, m.num_classes, y)  # the null label is the last row
    out = model(x_t, noise.t, y_in, c_t, keep_ids=noise.keep_ids)
    v, v_cls = out.v, out.v_cls
    if variant == "x0":
        v = (x_t - v) / noise.t.clamp(min=0.05).view(B, 1, 1, 1)
        v_cls = (c_t - v_cls) / noise.t.clamp(min=0.05)[:, None]
    vel = sum(((v[i] - v_target[i]) ** 2).mean() for i in range(B)) / B
    cos = torch.nn.functional.cosine_similarity(out.repa, teacher, dim=-1)
    repa = -cos.mean()
    cls = sum(((v_cls[i] - c_target[i]) ** 2).mean() for i in range(B)) / B
    w = t if variant == "time-weighted-cfm" else 1.0
    cfm = -(w * (v - v_target.roll(1, 0)) ** 2).mean()
    expected = vel + 0.5 * repa + 0.03 * cls + cfg.train.cfm_weight * cfm
    if variant == "dispersive":
        expected = expected + 0.25 * parts["disp"]
        assert parts["disp"] != 0
    for name, value in [("vel", vel), ("repa", repa), ("cls", cls), ("cfm", cfm)]:
        assert torch.allclose(parts[name], value, rtol=1e-10), name
    assert torch.allclose(total, expected, rtol=1e-10)
    total.backward()
    assert model.projectors[0][0].weight.grad is not None

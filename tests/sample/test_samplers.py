"""Samplers against a Gaussian data distribution whose velocity field is known in closed form.

Data x_0 ~ N(m, diag(s^2)), x_t = a x_0 + t eps with a = 1 - t. Per dimension x_t ~ N(a m, S2),
S2 = a^2 s^2 + t^2, and by Gaussian conditioning
    E[x_0 | x_t] = m + (a s^2 / S2)(x_t - a m),   E[eps | x_t] = (t / S2)(x_t - a m),
so the exact velocity v = E[eps - x_0 | x_t] is affine in x_t:
    v(x, t) = alpha(t) x + beta(t),  alpha = (t - a s^2) / S2,  beta = -a m alpha - m.
(Check: t = 1 gives v = x - m, i.e. E[eps - x_0 | eps = x].)

Because v is affine, every sampler step is an affine map plus Gaussian noise, so starting from
N(0, 1) the sampler's output is exactly Gaussian with mean/variance given by a scalar recursion
(`discrete_moments`). That splits the check in two, each with its own tolerance:
  1. Monte-Carlo: samples vs the recursion. The output is exactly Gaussian, so with n samples the
     standard errors are sqrt(var / n) for the mean and var sqrt(2 / (n - 1)) for the variance;
     we allow 5 standard errors (two-sided false-alarm rate 6e-7 per check; seeds are fixed
     anyway, so the test is deterministic).
  2. Discretisation: the recursion vs the data moments (deterministic). The mean is exact for
     every scheme (E[v] = -m is constant along the path, so the mean path (1 - t) m is linear in
     t and Euler integrates it exactly). The variance error is derived per scheme in
     `test_discretisation_error_and_order`.
"""
import math

import pytest
import torch

from srdit.config import NULL_CLASS
from srdit.flow import ode_grid, sde_grid, time_shift
from srdit.sample.samplers import balanced_labels, euler_maruyama, guided, ode

N_SAMPLES = 20_000
SHIFTS = (1.0, math.sqrt(2.0))
# latent: 3 dims; class-token component: 2 dims (integrated jointly in the tuple tests)
LATENT = ((1.0, 0.5), (-2.0, 1.0), (0.5, 2.0))
TOKEN = ((0.0, 1.5), (3.0, 0.7))
# (scheme, steps); NFE = steps, except Heun: 2 steps - 1
SCHEMES = (
    ("sde_mean", 250),  # release final step
    ("sde_velocity", 250),
    ("euler", 250),
    ("heun", 50),  # NFE 99
)
# Relative variance error allowed for the recursion vs the data, at the steps above (derived in
# test_discretisation_error_and_order): Euler is first order, err ~ C / N with C <= 3.5 for these
# s and shifts -> 1.4% at N = 250; Heun second order, err ~ C / N^2 with C <= 7.6 -> 0.3% at N = 50;
# the SDE is exact down to the shifted t_min and then pays the final-step floor computed in
# `sde_floor_var` (up to 4.3% for s = 0.5, shift sqrt 2, with "sde_mean"), plus < 1% of
# Euler-Maruyama error at N = 250.
VAR_BUDGET = {"euler": 0.015, "heun": 0.004}


def coeffs(t: float, m: float, s: float) -> tuple[float, float]:
    a = 1.0 - t
    s2 = a * a * s * s + t * t
    alpha = (t - a * s * s) / s2
    return alpha, -a * m * alpha - m


def gaussian_velocity(params):
    m = torch.tensor([p[0] for p in params], dtype=torch.float64)
    s = torch.tensor([p[1] for p in params], dtype=torch.float64)

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t[:, None]
        a = 1.0 - t
        s2 = a * a * s * s + t * t
        alpha = (t - a * s * s) / s2
        return alpha * x - a * m * alpha - m

    return v


def run(scheme: str, steps: int, model_fn, state, shift: float, seed: int = 0):
    if scheme.startswith("sde"):
        gen = torch.Generator().manual_seed(seed)
        final = "sde_mean" if scheme == "sde_mean" else "velocity"
        return euler_maruyama(model_fn, state, steps, shift=shift, generator=gen, final_step=final)
    return ode(model_fn, state, steps, method=scheme, shift=shift)


def discrete_moments(scheme: str, steps: int, m: float, s: float, shift: float):
    """Exact mean/variance of the scheme's output for one dimension (start N(0, 1))."""
    mu, var = 0.0, 1.0
    if scheme.startswith("sde"):
        ts = sde_grid(steps, shift=shift).tolist()
        for tc, tn in zip(ts[:-2], ts[1:-1]):
            dt = tn - tc
            al, be = coeffs(tc, m, s)
            amp, off = 1 + dt * (1 + (2 - tc) * al), dt * (2 - tc) * be  # drift x + (2 - t) v
            mu, var = amp * mu + off, amp * amp * var + 2 * tc * abs(dt)
        tc = ts[-2]
        al, be = coeffs(tc, m, s)
        if scheme == "sde_mean":
            amp, off = 1 - tc * (1 + (2 - tc) * al), -tc * (2 - tc) * be
        else:
            amp, off = 1 - tc * al, -tc * be
        return amp * mu + off, amp * amp * var
    ts = ode_grid(steps, shift).tolist()
    for i, (tc, tn) in enumerate(zip(ts[:-1], ts[1:])):
        dt = tn - tc
        a0, b0 = coeffs(tc, m, s)
        if scheme == "heun" and i < steps - 1:
            a1, b1 = coeffs(tn, m, s)
            amp = 1 + 0.5 * dt * (a0 + a1 * (1 + dt * a0))
            off = 0.5 * dt * (b0 + a1 * dt * b0 + b1)
        else:
            amp, off = 1 + dt * a0, dt * b0
        mu, var = amp * mu + off, amp * amp * var
    return mu, var


def sde_floor_var(scheme: str, s: float, shift: float) -> float:
    """Output variance of an SDE run with infinitely many steps: x_t exact at t = shifted t_min,
    then the final deterministic step, a linear map of x_t (centred): "velocity" gives
    x0_hat = x - t v with slope a s^2 / S2; "sde_mean" gives x0_hat - t eps_hat with slope
    (a s^2 - t^2) / S2. Variance = slope^2 S2."""
    t = time_shift(0.04, shift)
    a = 1 - t
    s2 = a * a * s * s + t * t
    slope = (a * s * s - (t * t if scheme == "sde_mean" else 0.0)) / s2
    return slope * slope * s2


def check_moments(x: torch.Tensor, params, scheme, steps, shift):
    n = x.shape[0]
    for d, (m, s) in enumerate(params):
        mu_ex, var_ex = discrete_moments(scheme, steps, m, s, shift)
        mean, var = x[:, d].mean().item(), x[:, d].var().item()
        # 1. Monte-Carlo vs the exact discrete moments (5 standard errors)
        assert abs(mean - mu_ex) <= 5 * math.sqrt(var_ex / n), (scheme, d, mean, mu_ex)
        assert abs(var - var_ex) <= 5 * var_ex * math.sqrt(2 / (n - 1)), (scheme, d, var, var_ex)
        # 2. discrete moments vs the data
        assert abs(mu_ex - m) < 1e-9
        if scheme.startswith("sde"):
            floor = sde_floor_var(scheme, s, shift)
            assert abs(var_ex / floor - 1) < 0.01, (scheme, d, var_ex, floor)
        else:
            assert abs(var_ex / (s * s) - 1) < VAR_BUDGET[scheme], (scheme, d, var_ex, s * s)
        # and directly: samples vs data, 5 MC standard errors + the discretisation budget
        if scheme.startswith("sde"):
            budget = abs(sde_floor_var(scheme, s, shift) / (s * s) - 1) + 0.01
        else:
            budget = VAR_BUDGET[scheme]
        assert abs(mean - m) <= 5 * s / math.sqrt(n)  # var_ex <= s^2 here, so s bounds the std
        assert abs(var / (s * s) - 1) <= 5 * math.sqrt(2 / (n - 1)) + budget


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("scheme,steps", SCHEMES)
def test_gaussian_moments(scheme, steps, shift):
    torch.manual_seed(1)
    x1 = torch.randn(N_SAMPLES, len(LATENT), dtype=torch.float64)
    out = run(scheme, steps, gaussian_velocity(LATENT), x1, shift)
    assert out.shape == x1.shape and out.dtype == torch.float64
    check_moments(out, LATENT, scheme, steps, shift)


@pytest.mark.parametrize("scheme,steps", SCHEMES)
def test_tuple_state_integrated_jointly(scheme, steps):
    shift = math.sqrt(2.0)
    torch.manual_seed(2)
    state = (torch.randn(N_SAMPLES, len(LATENT), dtype=torch.float64),
             torch.randn(N_SAMPLES, len(TOKEN), dtype=torch.float64))
    v_lat, v_tok = gaussian_velocity(LATENT), gaussian_velocity(TOKEN)
    calls = []

    def model_fn(st, t):
        assert isinstance(st, tuple) and len(st) == 2 and t.shape == (N_SAMPLES,)
        calls.append(t[0].item())
        return v_lat(st[0], t), v_tok(st[1], t)

    out = run(scheme, steps, model_fn, state, shift)
    assert isinstance(out, tuple) and len(out) == 2
    check_moments(out[0], LATENT, scheme, steps, shift)
    check_moments(out[1], TOKEN, scheme, steps, shift)
    # the two components draw different noise (tuple leaves are not aliased)
    if scheme.startswith("sde"):
        c = torch.corrcoef(torch.stack([out[0][:, 0], out[1][:, 0]]))[0, 1]
        assert abs(c) < 5 / math.sqrt(N_SAMPLES)


def test_discretisation_error_and_order():
    """Where VAR_BUDGET comes from: the recursion's relative variance error at the steps used,
    and the convergence order that justifies calling it discretisation error (halving h halves
    Euler's error and quarters Heun's; the SDE converges to its t_min floor)."""
    for shift in SHIFTS:
        for m, s in LATENT + TOKEN:
            def err(scheme, n):
                return discrete_moments(scheme, n, m, s, shift)[1] / (s * s) - 1

            assert abs(err("euler", 250)) < VAR_BUDGET["euler"]
            assert abs(err("heun", 50)) < VAR_BUDGET["heun"]
            assert 0.4 < err("euler", 1000) / err("euler", 500) < 0.6
            assert 0.15 < err("heun", 200) / err("heun", 100) < 0.35
            for scheme in ("sde_mean", "sde_velocity"):
                floor = sde_floor_var(scheme, s, shift)
                gap250 = abs(discrete_moments(scheme, 250, m, s, shift)[1] / floor - 1)
                gap2000 = abs(discrete_moments(scheme, 2000, m, s, shift)[1] / floor - 1)
                assert gap250 < 0.01 and gap2000 < gap250 / 4


# ----------------------------------------------------------------------------- grids, NFE


@pytest.mark.parametrize("shift", SHIFTS)
def test_sde_grid(shift):
    g = sde_grid(250, 0.04, shift)
    assert g.dtype == torch.float64 and g.shape == (251,)
    assert g[0].item() == 1.0 and g[-1].item() == 0.0
    base = torch.cat([torch.linspace(1, 0.04, 250, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(g, base * shift / (1 + (shift - 1) * base), rtol=0, atol=1e-15)
    assert g[-2].item() == pytest.approx(time_shift(0.04, shift))
    assert bool((g[1:] < g[:-1]).all())


def test_time_shift():
    assert time_shift(0.0, 3.0) == 0.0 and time_shift(1.0, 3.0) == 1.0
    assert time_shift(0.5, 1.0) == 0.5 and time_shift(0.5, 2.0) == pytest.approx(2 / 3)
    t = torch.rand(10, dtype=torch.float64)
    torch.testing.assert_close(time_shift(time_shift(t, 2.0), 0.5), t)  # s and 1/s are inverses


@pytest.mark.parametrize("shift", SHIFTS)
def test_ode_grid_and_model_calls(shift):
    g = ode_grid(10, shift)
    assert g[0].item() == 1.0 and g[-1].item() == 0.0 and g.shape == (11,)
    torch.testing.assert_close(g, time_shift(torch.linspace(1, 0, 11, dtype=torch.float64), shift))
    x = torch.zeros(4, 3, dtype=torch.float64)
    for method, nfe in (("euler", 10), ("heun", 19)):
        seen = []
        ode(lambda s, t: (seen.append(t[0].item()), s)[1], x, 10, method=method, shift=shift)
        assert len(seen) == nfe
        assert 0.0 not in seen  # Heun's last step has no corrector: t = 0 is never evaluated
        assert seen[-1] == pytest.approx(g[-2].item())
    seen = []
    gen = torch.Generator().manual_seed(0)
    euler_maruyama(lambda s, t: (seen.append(t[0].item()), s)[1], x, 250, shift=shift, generator=gen)
    assert len(seen) == 250 and seen[0] == 1.0 and seen[-1] == pytest.approx(time_shift(0.04, shift))


def test_sde_noise_comes_from_generator():
    x = torch.randn(8, 4, dtype=torch.float64)
    v = gaussian_velocity(((0.0, 1.0),) * 4)
    outs = [euler_maruyama(v, x, 20, generator=torch.Generator().manual_seed(k)) for k in (3, 3, 4)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    out32 = euler_maruyama(lambda s, t: -s, x.float(), 5, generator=torch.Generator().manual_seed(0))
    assert out32.dtype == torch.float32  # noise is drawn in the state's dtype


def test_bad_arguments():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="final_step"):
        euler_maruyama(lambda s, t: s, x, 5, final_step="noisy")
    with pytest.raises(ValueError, match="method"):
        ode(lambda s, t: s, x, 5, method="rk4")
    with pytest.raises(ValueError, match="num_steps"):
        sde_grid(1)


# ----------------------------------------------------------------------------- guidance

B = 4


class Recorder:
    """model_call whose velocity encodes its inputs: per leaf, x + label value + 100 * path_drop,
    where the label value is the label for real classes and -7 for the null label."""

    def __init__(self):
        self.calls = []

    def __call__(self, state, t, y, *, path_drop):
        x = state[0] if isinstance(state, tuple) else state
        self.calls.append(dict(n=x.shape[0], y=y.clone(), t=t.clone(), path_drop=path_drop))
        lab = torch.where(y == NULL_CLASS, torch.full_like(y, -7), y).to(x.dtype)[:, None]
        if isinstance(state, tuple):
            return tuple(leaf + lab + 100.0 * path_drop for leaf in state)
        return x + lab + 100.0 * path_drop


def _state():
    return torch.arange(B * 2, dtype=torch.float64).reshape(B, 2)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0, -2.0])
def test_guidance_scale_up_to_one_is_conditional(scale):
    """The release guides only when cfg_scale > 1: scale 1, a scale in (0, 1) and below make the
    conditional call alone, for the latent and the class token (whatever cls_scale says)."""
    rec = Recorder()
    y = torch.tensor([1, 2, 3, 4])
    state = (_state(), _state() * 10)
    for kind in ("cfg", "pdg", "none"):
        out = guided(rec, y, scale if kind != "none" else 4.0, kind=kind, cls_scale=3.0)(state, torch.full((B,), 0.5))
        for leaf_in, leaf_out in zip(state, out):
            torch.testing.assert_close(leaf_out, leaf_in + y[:, None].double())
    assert len(rec.calls) == 3 and all(c["n"] == B and not c["path_drop"] for c in rec.calls)


def test_guidance_outside_interval_never_calls_uncond():
    rec = Recorder()
    y = torch.tensor([1, 2, 3, 4])
    fn = guided(rec, y, 3.0, 0.1, 0.8, kind="cfg")
    for t in (0.05, 0.9, 1.0):
        out = fn(_state(), torch.full((B,), t))
        torch.testing.assert_close(out, _state() + y[:, None].double())
    assert len(rec.calls) == 3
    assert all(c["n"] == B and not (c["y"] == NULL_CLASS).any() for c in rec.calls)


def test_cfg_batches_cond_and_uncond_in_one_call():
    rec = Recorder()
    y = torch.tensor([1, 2, 3, 4])
    g = 2.5
    out = guided(rec, y, g, 0.1, 0.8, kind="cfg")(_state(), torch.full((B,), 0.5))
    assert len(rec.calls) == 1
    c = rec.calls[0]
    assert c["n"] == 2 * B and not c["path_drop"]
    assert torch.equal(c["y"], torch.tensor([1, 2, 3, 4] + [NULL_CLASS] * B))
    v_c, v_u = _state() + y[:, None].double(), _state() - 7
    torch.testing.assert_close(out, v_u + g * (v_c - v_u))
    # interval ends are inclusive
    rec.calls.clear()
    guided(rec, y, g, 0.1, 0.8, kind="cfg")(_state(), torch.full((B,), 0.8))
    assert rec.calls[0]["n"] == 2 * B


def test_pdg_uses_path_drop_for_uncond():
    rec = Recorder()
    y = torch.tensor([1, 2, 3, 4])
    g = 2.5
    out = guided(rec, y, g, 0.1, 0.8, kind="pdg")(_state(), torch.full((B,), 0.5))
    assert [(c["n"], c["path_drop"]) for c in rec.calls] == [(B, False), (B, True)]
    assert not (rec.calls[0]["y"] == NULL_CLASS).any() and (rec.calls[1]["y"] == NULL_CLASS).all()
    v_c, v_u = _state() + y[:, None].double(), _state() - 7 + 100
    torch.testing.assert_close(out, v_u + g * (v_c - v_u))


@pytest.mark.parametrize("kind", ("cfg", "pdg"))
def test_guidance_interval_per_sample_and_tuple_state(kind):
    rec = Recorder()
    y = torch.tensor([1, 2, 3, 4])
    g = 3.0
    t = torch.tensor([0.05, 0.5, 0.9, 0.3])  # samples 1 and 3 inside [0.1, 0.8]
    state = (_state(), _state() * 10)
    out = guided(rec, y, g, 0.1, 0.8, kind=kind)(state, t)
    inside = torch.tensor([False, True, False, True])
    uncond_call = rec.calls[-1]
    if kind == "cfg":
        assert len(rec.calls) == 1 and uncond_call["n"] == B + 2
        torch.testing.assert_close(uncond_call["t"], torch.cat([t, t[inside]]))
    else:
        assert len(rec.calls) == 2 and uncond_call["n"] == 2 and uncond_call["path_drop"]
        torch.testing.assert_close(uncond_call["t"], t[inside])
    drop = 100.0 if kind == "pdg" else 0.0
    for leaf_in, leaf_out in zip(state, out):  # every leaf is guided with the same scale
        v_c = leaf_in + y[:, None].double()
        v_u = leaf_in - 7 + drop
        want = torch.where(inside[:, None], v_u + g * (v_c - v_u), v_c)
        torch.testing.assert_close(leaf_out, want)


def test_guided_model_fn_runs_in_sampler():
    rec = Recorder()
    y = torch.tensor([1, 2, 3, 4])
    state = (torch.randn(B, 2, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64))
    fn = guided(lambda s, t, yy, path_drop: rec(s, t, yy, path_drop=path_drop), y, 2.0, 0.1, 0.8, kind="pdg")
    out = euler_maruyama(fn, state, 50, generator=torch.Generator().manual_seed(0))
    assert out[0].shape == (B, 2) and out[1].shape == (B, 3)
    grid = sde_grid(50)[:-1]
    n_inside = int(((grid >= 0.1) & (grid <= 0.8)).sum())
    assert len(rec.calls) == 50 + n_inside


# ----------------------------------------------------------------------------- labels


def test_balanced_labels():
    lab = balanced_labels(50_000)
    assert lab.dtype == torch.int64 and lab.shape == (50_000,)
    assert torch.equal(torch.bincount(lab, minlength=1000), torch.full((1000,), 50))
    # sharded over ranks by global offset: the union is the single-process labelling
    parts = [balanced_labels(12_500, offset=r * 12_500) for r in range(4)]
    assert torch.equal(torch.cat(parts), lab)
    assert balanced_labels(3, num_classes=10, offset=9).tolist() == [9, 0, 1]


def _release_em(v_of, x, c, y, steps, scale, cls_scale, low, high, kind, generator):
    """The release's euler_maruyama_sampler(_path_drop) update, transcribed step by step in float64:
    drifts d = v - w s / 2 from the score, guided as drifts (image by cfg_scale, class token by
    cls_cfg_scale, <= 0: its conditional drift) when cfg_scale > 1 and low <= t <= high; noise
    randn_like(x) then randn_like(cls); the last step noise-free."""
    ts = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    null = torch.full_like(y, NULL_CLASS)

    def drift(v, z, t):
        score = (-(1 - t) * v - z) / t  # get_score_from_velocity, linear path
        return v - 0.5 * (2 * t) * score

    def guided_drifts(z, zc, t):
        v, vc = v_of(z, zc, y, False)
        d, dc = drift(v, z, t), drift(vc, zc, t)
        if scale > 1.0 and low <= t <= high:
            vu, vcu = v_of(z, zc, null, kind == "pdg")
            du, dcu = drift(vu, z, t), drift(vcu, zc, t)
            d = du + scale * (d - du)
            dc = dcu + cls_scale * (dc - dcu) if cls_scale > 0 else dc
        return d, dc

    for t_cur, t_next in zip(ts[:-2].tolist(), ts[1:-1].tolist()):
        dt = t_next - t_cur
        d, dc = guided_drifts(x, c, t_cur)
        eps, ceps = (torch.randn(z.shape, generator=generator, dtype=torch.float64) for z in (x, c))
        x = x + d * dt + math.sqrt(2 * t_cur) * eps * math.sqrt(abs(dt))
        c = c + dc * dt + math.sqrt(2 * t_cur) * ceps * math.sqrt(abs(dt))
    t_cur = ts[-2].item()
    d, dc = guided_drifts(x, c, t_cur)
    return x + d * (0.0 - t_cur), c + dc * (0.0 - t_cur)


@pytest.mark.parametrize("kind", ["cfg", "pdg"])
@pytest.mark.parametrize("scale,cls_scale", [(3.0, 2.0), (3.0, 0.0), (3.0, 0.5), (0.5, 2.0), (0.5, 0.5)])
def test_class_token_guidance_scale_is_the_releases_update(kind, scale, cls_scale):
    """sample.guidance_scale and sample.cls_guidance_scale against the release's --cfg-scale and
    --cls-cfg-scale on a toy velocity field where the label and the path drop both change the
    velocity: no guidance at all for a scale <= 1 (0.5), the class token's own scale applied
    whenever it is > 0 (0.5 too)."""
    B = 4
    y = torch.tensor([0, 3, 5, 9])
    A, Ac = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-0.4, dtype=torch.float64)
    bias = torch.linspace(-1, 1, 1001, dtype=torch.float64)

    def v_of(x, c, labels, path_drop):
        shift = bias[labels].view(-1, 1) + (0.3 if path_drop else 0.0)
        return A * x + shift, Ac * c - 2 * shift

    def model_call(state, t, labels, *, path_drop=False):
        x, c = state
        return v_of(x, c, labels, path_drop)

    x0 = torch.randn(B, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fn = guided(model_call, y, scale, 0.1, 0.8, kind=kind, cls_scale=cls_scale)
    ours = euler_maruyama(fn, (x0, c0), 8, generator=torch.Generator().manual_seed(3))
    release = _release_em(v_of, x0, c0, y, 8, scale, cls_scale, 0.1, 0.8, kind, torch.Generator().manual_seed(3))
    for a, b in zip(ours, release):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    same = euler_maruyama(guided(model_call, y, scale, 0.1, 0.8, kind=kind), (x0, c0), 8,
                          generator=torch.Generator().manual_seed(3))
    # the class token's scale changes its result exactly when the latent is guided
    assert torch.allclose(same[1], ours[1]) == (scale <= 1.0)

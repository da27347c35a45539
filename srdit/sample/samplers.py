"""Samplers for the linear flow x_t = (1 - t) x_0 + t eps (t = 0 data, t = 1 noise), and guidance.

A sampler integrates a `state` from t = 1 to t = 0. The state is one tensor (the latent) or a
tuple of tensors (latent, REG class token) integrated jointly with the same grid and the same
rules; `model_fn(state, t) -> velocity` returns the same structure, with t a [B] tensor of the
time the model sees (already time-shifted).

Math (SPEC 5). The network predicts v(x, t) = E[eps - x_0 | x_t = x]. Since
x_t = (1 - t) x_0 + t eps and x_0 = eps - v (per sample),

    x_t = eps - (1 - t) v   =>   E[eps | x_t] = x + (1 - t) v,
    score s = grad log p_t(x) = -E[eps | x_t] / t = -(x + (1 - t) v) / t.

The reverse-time SDE with diffusion coefficient w(t) that keeps the marginals p_t is

    dx = (v - w s / 2) dt + sqrt(w) dW,   integrated with dt < 0,

and with w(t) = 2t its drift is

    d = v - t s = v + x + (1 - t) v = x + (2 - t) v.

Euler-Maruyama: x <- x + d dt + sqrt(w |dt|) eps, eps ~ N(0, I). The probability-flow ODE is
dx = v dt (w = 0); `ode` integrates it with Euler or Heun.

Guidance and the drift: d is affine in v, d = x + (2 - t) v, and a guided velocity
v_u + g (v_c - v_u) is an affine combination of two velocities (weights 1 - g and g sum to 1),
so guiding the velocity and then forming the drift equals guiding the two drifts
d_u + g (d_c - d_u) as the release code does. The same holds for the ODE (d = v). `guided`
therefore wraps the model call and every sampler stays guidance-agnostic.

Numerics: the grids are built in float64 and each step size is a Python float (float64); the
state keeps the dtype it is given (the release code integrates in float64: pass float64 states
for that). The model sees t in the state's dtype.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from srdit.config import NULL_CLASS
from srdit.flow import ode_grid, sde_grid

State = Union[Tensor, tuple[Tensor, ...]]
ModelFn = Callable[[State, Tensor], State]

FINAL_STEPS = ("sde_mean", "velocity")
ODE_METHODS = ("euler", "heun")
GUIDANCE_KINDS = ("none", "cfg", "pdg")


# ----------------------------------------------------------------------------- helpers


def _leaves(state: State) -> tuple[Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _map(fn, *states: State) -> State:
    """Apply fn leaf-wise over states of the same structure (tensor or tuple of tensors)."""
    if isinstance(states[0], tuple):
        return tuple(fn(*parts) for parts in zip(*states))
    return fn(*states)


def _time(state: State, t: float) -> Tensor:
    first = _leaves(state)[0]
    return torch.full((first.shape[0],), t, device=first.device, dtype=first.dtype)


def _noise(state: State, generator: torch.Generator | None) -> State:
    """One standard normal draw per leaf, in leaf order (latent first, then class token)."""
    return _map(
        lambda x: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), state
    )


# ----------------------------------------------------------------------------- samplers


@torch.no_grad()
def euler_maruyama(
    model_fn: ModelFn,
    state: State,
    num_steps: int = 250,
    *,
    t_min: float = 0.04,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    final_step: str = "sde_mean",
) -> State:
    """SDE sampler (SPEC 5): num_steps - 1 Euler-Maruyama steps on `sde_grid`, then one
    deterministic step from the shifted t_min to 0. NFE = num_steps.

    Stochastic step, w(t) = 2t, dt = t_next - t < 0:
        x <- x + (x + (2 - t) v) dt + sqrt(2 t |dt|) eps.

    final_step (both noise-free):
      "sde_mean"  x <- x + (x + (2 - t) v) dt, the SDE drift without the noise term. This is what
                  the REPA/REG release samplers do (`mean_x = x_cur + dt * d_cur` with
                  d_cur = v - w s / 2); with dt = -t it gives x0_hat - t * eps_hat.
      "velocity"  x <- x + v dt, the probability-flow Euler step; with dt = -t it is exactly
                  the posterior mean x0_hat = x - t v = E[x_0 | x_t].
    Noise: per step one `torch.randn(..., generator=generator)` per leaf, in leaf order.
    """
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step={final_step!r} is not one of {FINAL_STEPS}")
    ts = sde_grid(num_steps, t_min, shift).tolist()
    x = state
    for t_cur, t_next in zip(ts[:-2], ts[1:-1]):
        dt = t_next - t_cur
        v = model_fn(x, _time(x, t_cur))
        eps = _noise(x, generator)
        sigma = (2.0 * t_cur * abs(dt)) ** 0.5
        x = _map(lambda xi, vi, ei: xi + (xi + (2.0 - t_cur) * vi) * dt + sigma * ei, x, v, eps)
    t_cur = ts[-2]
    dt = ts[-1] - t_cur
    v = model_fn(x, _time(x, t_cur))
    if final_step == "sde_mean":
        return _map(lambda xi, vi: xi + (xi + (2.0 - t_cur) * vi) * dt, x, v)
    return _map(lambda xi, vi: xi + vi * dt, x, v)


@torch.no_grad()
def ode(
    model_fn: ModelFn,
    state: State,
    num_steps: int,
    *,
    method: str = "euler",
    shift: float = 1.0,
) -> State:
    """Probability-flow ODE dx = v dt on `ode_grid`. Euler: NFE = num_steps. Heun (explicit
    trapezoid: predictor x + v dt, corrector averages v at both ends) skips its corrector on the
    last step, whose end point t = 0 the model never sees: NFE = 2 num_steps - 1."""
    if method not in ODE_METHODS:
        raise ValueError(f"method={method!r} is not one of {ODE_METHODS}")
    ts = ode_grid(num_steps, shift).tolist()
    x = state
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t_cur
        v = model_fn(x, _time(x, t_cur))
        x_pred = _map(lambda xi, vi: xi + vi * dt, x, v)
        if method == "heun" and i < num_steps - 1:
            v_next = model_fn(x_pred, _time(x, t_next))
            x = _map(lambda xi, a, b: xi + (a + b) * (0.5 * dt), x, v, v_next)
        else:
            x = x_pred
    return x


# ----------------------------------------------------------------------------- guidance


def guided(
    model_call: Callable[..., State],
    y: Tensor,
    scale: float,
    low: float = 0.0,
    high: float = 1.0,
    *,
    kind: str = "cfg",
    null_label: int = NULL_CLASS,
    cls_scale: float | None = None,
) -> ModelFn:
    """Wrap `model_call(state, t, y, *, path_drop: bool) -> velocity` into a guided
    `model_fn(state, t)` for the samplers (see the module docstring: guiding v = guiding the
    drift).

    v = v_u + scale (v_c - v_u) for the samples with low <= t <= high (t is the shifted time the
    model sees, compared per sample); outside the interval the conditional velocity alone, and
    when no sample of the batch is inside, no unconditional call is made.
      kind="cfg": v_u is the same model with the null label (`null_label`, the last row of the
                  label table: NULL_CLASS for ImageNet, model.num_classes in general); conditional and
                  unconditional inputs are concatenated along the batch into ONE model call.
      kind="pdg": path-drop guidance; v_u uses the null label AND path_drop=True (the sparse
                  stream replaced by [MASK]): a different computation, so a second call.
      kind="none", or scale <= 1: the conditional call only. The release guides only when
                  its cfg_scale > 1 (samplers.py): a scale in (0, 1), a pull toward v_u, is no
                  guidance there, so none here either.
    The second leaf of a (latent, class token) state is guided with `cls_scale` (None: `scale`),
    as the release's --cls-cfg-scale: only when the latent is (scale > 1), with any cls_scale > 0
    (below 1 too, as there), and cls_scale <= 0 means its conditional velocity alone.
    """
    if kind not in GUIDANCE_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {GUIDANCE_KINDS}")
    if low > high:
        raise ValueError(f"guidance interval is empty: low={low} > high={high}")

    def cond(state: State, t: Tensor) -> State:
        return model_call(state, t, y, path_drop=False)

    if kind == "none" or scale <= 1.0:  # the release's cfg_scale > 1.0 test
        return cond

    def model_fn(state: State, t: Tensor) -> State:
        inside = (t >= low) & (t <= high)  # [B]
        n_in = int(inside.sum())  # one host sync per step
        if n_in == 0:
            return cond(state, t)
        batch = t.shape[0]
        idx = None if n_in == batch else inside.nonzero().squeeze(1)

        def sub(z: Tensor) -> Tensor:
            return z if idx is None else z.index_select(0, idx)

        y_null = sub(torch.full_like(y, null_label))
        if kind == "cfg":
            out = model_call(
                _map(lambda a: torch.cat([a, sub(a)]), state),
                torch.cat([t, sub(t)]),
                torch.cat([y, y_null]),
                path_drop=False,
            )
            v_c = _map(lambda o: o[:batch], out)
            v_u = _map(lambda o: o[batch:], out)
        else:  # pdg
            v_c = cond(state, t)
            v_u = model_call(_map(sub, state), sub(t), y_null, path_drop=True)

        def mix(c: Tensor, u: Tensor, s: float) -> Tensor:
            if s <= 0:  # the release: cls_cfg_scale <= 0 keeps the conditional drift
                return c
            g = u + s * (sub(c) - u)
            return g if idx is None else c.index_copy(0, idx, g)

        if isinstance(v_c, tuple):
            scales = (scale, *([scale if cls_scale is None else cls_scale] * (len(v_c) - 1)))
            return tuple(mix(c, u, s) for c, u, s in zip(v_c, v_u, scales))
        return mix(v_c, v_u, scale)

    return model_fn


# ----------------------------------------------------------------------------- labels


def balanced_labels(
    n: int, num_classes: int = 1000, offset: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """Labels of global samples offset .. offset + n - 1: (offset + i) mod num_classes, int64.
    Over 50,000 samples from offset 0 every class gets exactly 50 (SPEC 5). Give each rank its
    global offset so that the union over ranks stays balanced."""
    return (torch.arange(n, dtype=torch.int64, device=device) + offset) % num_classes


__all__: Sequence[str] = (
    "euler_maruyama", "ode", "guided", "balanced_labels",
)

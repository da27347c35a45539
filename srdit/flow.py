"""The time convention of SR-DiT's linear flow, in one place for training and sampling (SiT keeps
this in its `transport/`). t = 0 is data, t = 1 is noise (SPEC 3, 5):

    x_t = (1 - t) x + t eps            the interpolant
    v   = eps - x                      the velocity target (what the network predicts)
    t'  = s t / (1 + (s - 1) t)        the resolution time shift, on training times and on the
                                       sampling grid alike (s = sqrt(C H W / 4096), config)

An x0-prediction becomes a velocity through x_t = (1 - t) x0 + t eps  =>  v = (x_t - x0) / t.
The sampling grids are built in float64 (the samplers take Python floats from them).
"""
from __future__ import annotations

import torch
from torch import Tensor


def time_shift(t, s: float):
    """Resolution time shift t -> s t / (1 + (s - 1) t); s = 1 is the identity, s > 1 spends
    more of the grid at high noise. Works on floats and tensors; keeps 0 -> 0 and 1 -> 1."""
    return s * t / (1 + (s - 1) * t)


def interpolate(x: Tensor, eps: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """x_t = (1 - t) x + t eps and the velocity target eps - x, t [B] broadcast over x."""
    tb = t.reshape(-1, *([1] * (x.dim() - 1)))
    return (1 - tb) * x + tb * eps, eps - x


def sample_time(batch: int, shift: float, *, generator=None, device=None, dtype=torch.float32) -> Tensor:
    """Training times: t ~ U(0, 1), then t' = s t / (1 + (s - 1) t), clamped to [0, 1] as the
    release does."""
    t = torch.rand(batch, generator=generator, device=device, dtype=dtype)
    if shift != 1.0:
        t = time_shift(t, shift).clamp(0.0, 1.0)
    return t


def velocity_from_x0(x0: Tensor, x_t: Tensor, t: Tensor, t_min: float) -> Tensor:
    """An x0-prediction as a velocity: x_t = (1 - t) x0 + t eps  =>  v = (x_t - x0) / t, with t
    clamped below at t_min so the division stays bounded near the data end."""
    tb = t.clamp(min=t_min).reshape(-1, *([1] * (x0.dim() - 1)))
    return (x_t - x0) / tb


def sde_grid(num_steps: int, t_min: float = 0.04, shift: float = 1.0) -> Tensor:
    """[num_steps + 1] float64 times: linspace(1, t_min, num_steps), then 0, time-shifted.

    The first num_steps - 1 intervals are stochastic steps, the last one (shifted t_min -> 0)
    is the deterministic final step; one model call per interval (NFE = num_steps)."""
    if num_steps < 2:
        raise ValueError(f"sde_grid needs num_steps >= 2 (got {num_steps}): one stochastic step "
                         "and the final step")
    if not 0.0 < t_min < 1.0:
        raise ValueError(f"t_min must be in (0, 1), got {t_min}")
    t = torch.linspace(1.0, t_min, num_steps, dtype=torch.float64)
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    return time_shift(t, shift)


def ode_grid(num_steps: int, shift: float = 1.0) -> Tensor:
    """[num_steps + 1] float64 times: linspace(1, 0, num_steps + 1), time-shifted."""
    if num_steps < 1:
        raise ValueError(f"ode_grid needs num_steps >= 1, got {num_steps}")
    return time_shift(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)

"""Optimizers (AdamW default; Muon and Prodigy for the appendix ablation) and the EMA.

A step whose loss or gradient is not finite is skipped on the device: the fused AdamW kernel
takes a `found_inf` flag (the mechanism AMP's GradScaler uses) and leaves parameters, moments
and step count untouched, and the EMA lerps with weight 0. No host sync is needed for that.
Muon and Prodigy have no such flag; with them the flag is read on the host (one sync per step).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from srdit.config import TrainConfig
from srdit.train.flat import flat_view, flatten_parameters, layout_order, same_layout

MUON_LR = 1e-3  # the SR-DiT author's Muon run (FID 3.40)


def _muon_params(model: nn.Module):
    """2-D weight matrices of the transformer body go to Muon; embeddings, the output layers,
    biases, norms and scalars stay on AdamW (Muon is defined for hidden matrices only)."""
    muon, adam = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden = name.startswith(("blocks.", "fusion_proj.", "projectors.")) and p.dim() == 2
        (muon if hidden else adam).append(p)
    return muon, adam


def lr_factor(step: int, max_steps: int, decay_steps: int) -> float:
    """The learning rate of the update after `step` updates, as a fraction of train.lr: 1, then
    (with decay_steps > 0) falling linearly over the last decay_steps updates, to 1/decay_steps
    at the last (train.lr_decay_steps; 0 keeps it constant, as the release does)."""
    if decay_steps <= 0:
        return 1.0
    return min(1.0, max(max_steps - step, 1) / decay_steps)


class Optimizers:
    """One or two torch optimizers stepped together, with a device-side skip flag."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device):
        params = [p for p in model.parameters() if p.requires_grad]
        # capturable: fused AdamW's math is the same either way; torch only refuses graph capture
        # without it (and warns when a capturable optimizer steps outside a graph)
        self.capturable = cfg.cuda_graphs
        # a decaying lr is a device tensor that set_lr_factor fills in place: a captured CUDA
        # graph reads it at every replay (a float would be baked into the graph)
        lr = torch.tensor(cfg.lr, device=device) if cfg.lr_decay_steps > 0 else cfg.lr
        adam_kw = dict(lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                       capturable=self.capturable)
        if cfg.optimizer == "adamw":
            self.optimizers = [torch.optim.AdamW(params, **adam_kw, fused=True)]
        elif cfg.optimizer == "muon":
            if not hasattr(torch.optim, "Muon"):
                raise RuntimeError(f"train.optimizer=muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
            muon, adam = _muon_params(model)
            self.optimizers = [torch.optim.Muon(muon, lr=MUON_LR, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"),
                               torch.optim.AdamW(adam, **adam_kw, fused=True)]
        else:  # prodigy
            try:
                from prodigyopt import Prodigy
            except ImportError:
                raise RuntimeError("train.optimizer=prodigy needs the package prodigyopt: pip install prodigyopt") from None
            self.optimizers = [Prodigy(params, lr=1.0, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)]
        self.device_skip = all(isinstance(o, torch.optim.AdamW) for o in self.optimizers)
        self.base_lrs = [[float(g["lr"]) for g in o.param_groups] for o in self.optimizers]

    @property
    def lr(self) -> float:
        return float(self.optimizers[-1].param_groups[0]["lr"])

    def set_lr_factor(self, factor: float) -> None:
        """Every group's lr = its initial lr * factor (no host sync: a tensor lr is filled)."""
        for opt, bases in zip(self.optimizers, self.base_lrs):
            for group, base in zip(opt.param_groups, bases):
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(base * factor)
                else:
                    group["lr"] = base * factor

    def step(self, found_inf: torch.Tensor, grad_scale: torch.Tensor | None = None) -> None:
        """Apply the update unless found_inf (a float 0-dim device tensor) is 1. grad_scale (a
        0-dim device tensor, fused AdamW only: device_skip) divides every gradient as the kernel
        reads it: the step's gradient clipping, at no pass of its own."""
        if grad_scale is not None and not self.device_skip:
            raise ValueError("grad_scale needs fused AdamW (Optimizers.device_skip)")
        if self.device_skip:
            for opt in self.optimizers:
                opt.found_inf, opt.grad_scale = found_inf, grad_scale
                opt.step()
        elif not bool(found_inf):  # host sync: these optimizers cannot skip on the device
            for opt in self.optimizers:
                opt.step()
        # no zero_grad: the gradients are views of one flat buffer (srdit.train.flat) that the step
        # zeroes with one fill before its backward; set_to_none would cut them loose from it

    def state_dict(self) -> list:
        return [o.state_dict() for o in self.optimizers]

    def load_state_dict(self, states: list) -> None:
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)
            for group in opt.param_groups:  # a checkpoint's own setting would win: this run's must
                if "capturable" in group:
                    group["capturable"] = self.capturable


class EMA:
    """fp32 exponential moving average of every parameter (also the frozen pos_embed, as the
    release's EMA does) and a copy of the buffers. `update="release"` computes it as the
    release does, ema * decay + p * (1 - decay) in fp32 (quirk Q5: the coefficients do not sum to
    exactly 1); "lerp" is the exact average. The skip flag is applied on the device (no host
    sync). Over flat parameters (flatten_parameters) that is two or one kernels for the whole
    model; otherwise per-parameter multi-tensor ops, whose 0-dim weights make CUDA launch one
    kernel per parameter and op."""

    def __init__(self, model: nn.Module, decay: float, update: str = "release"):
        if update not in ("release", "lerp"):
            raise ValueError(f"EMA update {update!r} is not 'release' or 'lerp'")
        self.decay, self.update_rule = decay, update
        # laid out as the model is (deepcopy clones parameter by parameter): then the flat views of
        # the two correspond element for element
        self.model = flatten_parameters(copy.deepcopy(model).float().eval().requires_grad_(False),
                                        layout_order(model))
        self._ema = list(self.model.parameters())
        # detached views of the master weights, made once: optimizer steps and checkpoint loads
        # write in place, so they stay current without a per-step list of new tensors
        self._src = [p.detach() for p in model.parameters()]
        self._upcast = any(p.dtype != torch.float32 for p in self._src)  # fp32 masters (the trainer): no copies
        # flat parameters (the model's from flatten_parameters, the copy's made so): the lists
        # become one tensor each, so every update below is one kernel for the whole model, the
        # same arithmetic per element as over the per-parameter lists
        flat = (flat_view(self._ema), None if self._upcast else flat_view(self._src))
        if None not in flat and same_layout(self._ema, self._src):
            self._ema, self._src = [flat[0]], [flat[1]]
        device = self._ema[0].device if self._ema else torch.device("cpu")
        # the release's fp32 coefficients: decay and (1 - decay) computed in float64, then rounded
        self._keep = torch.tensor(decay, dtype=torch.float32, device=device)
        self._take = torch.tensor(1.0 - decay, dtype=torch.float32, device=device)

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor) -> None:
        """One step; found_inf (a float 0-dim device tensor) = 1 leaves the average unchanged."""
        take = self._take * (1.0 - found_inf)  # 0 on skipped steps
        src = [p.float() for p in self._src] if self._upcast else self._src
        # one weight tensor per parameter: a bare 0-dim tensor would bind to the Scalar overload,
        # whose conversion reads it on the host (a sync per step, and no CUDA-graph capture)
        if self.update_rule == "lerp":
            torch._foreach_lerp_(self._ema, src, [take] * len(self._ema))
            return
        keep = torch.where(found_inf > 0, torch.ones_like(self._keep), self._keep)
        torch._foreach_mul_(self._ema, [keep] * len(self._ema))
        torch._foreach_addcmul_(self._ema, src, [take] * len(self._ema))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=True)

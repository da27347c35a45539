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
from srdit.train.flat import (ShardLayout, flat_buffer, flat_view, flatten_like, flatten_parameters, same_layout,
                              span)
from srdit.train.reduce import gather_pieces, wait_for

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
    """One or two torch optimizers stepped together, with a device-side skip flag.

    AdamW over flat weights (srdit.train.flat) updates runs of the flat buffer, not parameters:
    the whole buffer's trainable runs, or with a ShardLayout of several ranks
    (train.shard_optimizer) this rank's pieces' runs, whose gradients are then the reducer's
    reduce-scattered shard (attach_gradients); gather_weights brings every rank's pieces back.
    Either way the state_dict is the per-parameter one torch's AdamW writes (gathered from every
    rank when sharded: a collective), so a checkpoint loads at any number of ranks, sharded or
    not, and old checkpoints load too. (Fused AdamW's arithmetic per element does not depend on
    which tensor an element is in: runs cut anywhere give the same bits, checked on the CPU, so
    the sharded update is the unsharded one.)"""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, layout: ShardLayout | None = None):
        params = [p for p in model.parameters() if p.requires_grad]
        self.layout, self.model_params = None, params
        if cfg.optimizer == "adamw" and flat_buffer(model) is not None:
            self.layout = layout if layout is not None else ShardLayout.whole(model)
            self.buffer = flat_buffer(model)
            self.runs = self.layout.trainable_runs()
            params = [self.buffer[a:b] for a, b, _ in self.runs]  # views: the update writes the weights
        elif layout is not None:
            raise ValueError(f"a sharded optimizer is AdamW over flat weights (train.optimizer={cfg.optimizer})")
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

    @property
    def sharded(self) -> bool:
        return self.layout is not None and self.layout.world > 1

    def attach_gradients(self, gradients: torch.Tensor) -> None:
        """Over flat weights: each run's gradient is its fixed view of `gradients`, the flat
        gradient buffer or, sharded, the reducer's reduce-scattered shard (compact offsets)."""
        if self.layout is None:
            return
        for p, (a, b, compact) in zip(self.optimizers[0].param_groups[0]["params"], self.runs):
            p.grad = gradients[compact: compact + (b - a)]

    def gather_weights(self, wait: bool = True) -> list:
        """Sharded: every rank's updated pieces into every rank's weights (a collective); the
        works when not `wait`. Nothing to do unsharded."""
        if not self.sharded:
            return []
        works = gather_pieces(self.buffer, self.layout)
        if wait:
            wait_for(works)
            return []
        return works

    def state_dict(self) -> list:
        if self.layout is not None:
            return [self._per_parameter_state()]
        return [o.state_dict() for o in self.optimizers]

    def load_state_dict(self, states: list) -> None:
        if self.layout is not None:
            states = [self._runs_state(states[0])]
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)
            for group in opt.param_groups:  # a checkpoint's own setting would win: this run's must
                if "capturable" in group:
                    group["capturable"] = self.capturable

    def _per_parameter_state(self) -> dict:
        """The flat AdamW's state as torch's AdamW over the parameters writes it: moments per
        parameter (sharded: gathered from every rank's pieces, a collective), the same step and
        hyperparameters, indexed as the parameters are."""
        opt = self.optimizers[0]
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.model_params)))
        shard_params = opt.param_groups[0]["params"]
        if not opt.state:
            return {"state": {}, "param_groups": [group]}
        full = {}
        for key in ("exp_avg", "exp_avg_sq"):
            flat = torch.zeros_like(self.buffer)
            for p, (a, b, _) in zip(shard_params, self.runs):
                flat[a:b] = opt.state[p][key]
            if self.sharded:
                wait_for(gather_pieces(flat, self.layout))
            full[key] = flat
        step = opt.state[shard_params[0]]["step"]
        state = {i: {"step": step.clone(), **{k: full[k][a:b].view_as(p).clone() for k in full}}
                 for i, (p, (a, b)) in enumerate(zip(self.model_params, map(span, self.model_params)))}
        return {"state": state, "param_groups": [group]}

    def _runs_state(self, unsharded: dict) -> dict:
        """A per-parameter AdamW state dict (any checkpoint's) as the state of this one's runs."""
        shard_params = self.optimizers[0].param_groups[0]["params"]
        group = {**unsharded["param_groups"][0], "params": list(range(len(shard_params)))}
        if not unsharded["state"]:
            return {"state": {}, "param_groups": [group]}
        if len(unsharded["state"]) != len(self.model_params):
            raise ValueError(f"the checkpoint's optimizer holds {len(unsharded['state'])} parameters' state, "
                             f"this model has {len(self.model_params)}")
        full = {}
        for key in ("exp_avg", "exp_avg_sq"):
            flat = torch.zeros_like(self.buffer)
            for i, (a, b) in enumerate(map(span, self.model_params)):
                flat[a:b] = unsharded["state"][i][key].reshape(-1).to(flat)
            full[key] = flat
        step = unsharded["state"][0]["step"]
        state = {j: {"step": torch.as_tensor(step).clone(), **{k: full[k][a:b].clone() for k in full}}
                 for j, (a, b, _) in enumerate(self.runs)}
        return {"state": state, "param_groups": [group]}


class EMA:
    """fp32 exponential moving average of every parameter (also the frozen pos_embed, as the
    release's EMA does) and a copy of the buffers. `update="release"` computes it as the
    release does, ema * decay + p * (1 - decay) in fp32 (quirk Q5: the coefficients do not sum to
    exactly 1); "lerp" is the exact average. The skip flag is applied on the device (no host
    sync). Over flat parameters (flatten_parameters) the update runs on the whole buffers (two or
    one kernels for the whole model) or, sharded, on this rank's pieces of them; otherwise
    per-parameter multi-tensor ops, whose 0-dim weights make CUDA launch one kernel per parameter
    and op."""

    def __init__(self, model: nn.Module, decay: float, update: str = "release", layout: ShardLayout | None = None):
        if update not in ("release", "lerp"):
            raise ValueError(f"EMA update {update!r} is not 'release' or 'lerp'")
        self.decay, self.update_rule, self.layout = decay, update, layout
        # laid out as the model is, padding included (deepcopy clones parameter by parameter):
        # then the flat views of the two correspond element for element
        source = flat_buffer(model)
        copied = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.model = flatten_like(copied, model) if source is not None else flatten_parameters(copied)
        self._ema = list(self.model.parameters())
        # detached views of the master weights, made once: optimizer steps and checkpoint loads
        # write in place, so they stay current without a per-step list of new tensors
        self._src = [p.detach() for p in model.parameters()]
        self._upcast = any(p.dtype != torch.float32 for p in self._src)  # fp32 masters (the trainer): no copies
        # flat parameters (the model's from flatten_parameters, the copy's made so): the lists
        # become the buffers' pieces, so every update below is one kernel per piece, the same
        # arithmetic per element as over the per-parameter lists
        flat = flat_view(self._ema) is not None and not self._upcast and flat_view(self._src) is not None
        if flat and same_layout(self._ema, self._src):
            # the whole buffers, or sharded this rank's pieces of them (gather() brings the rest)
            self.layout = layout if layout is not None else ShardLayout.whole(model)
            self._ema, self._src = (self.layout.pieces(flat_buffer(self.model), tail=True),
                                   self.layout.pieces(source, tail=True))
        elif layout is not None:
            raise ValueError("a sharded EMA needs the model's flat fp32 parameters (flatten_for_training)")
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

    def gather(self) -> None:
        """Sharded: every rank's averaged pieces into every rank's copy (a collective), before the
        whole average is read (checkpoint, sample grid, evaluation). Nothing to do unsharded."""
        if self.layout is not None and self.layout.world > 1:
            wait_for(gather_pieces(flat_buffer(self.model), self.layout, tail=True))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=True)

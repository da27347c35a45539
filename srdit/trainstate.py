"""The training checkpoint's format, owned by one class (torchtitan's TrainState): `srdit.train`
writes and resumes it, `srdit.sample` reads its EMA weights and config. Nothing else knows its
keys.

A checkpoint holds everything a resumed run needs to continue the same trajectory: model, EMA,
optimizer, step, the step and host generators (which draw all noise, routing and path-drop
coins), every rank's global RNG states (torch, CUDA, numpy, python), the data position (the
step: the loaders' order depends on nothing else; and the world size and micro-batch it was
written with, which a resume compares: the micro-batch defines the math) and the resolved
config. It loads with `torch.load(weights_only=True)`: RNG states are stored as plain Python
values.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from srdit import distributed

FORMAT = "srdit-train-v1"
KEYS = ("format", "step", "config", "model", "ema", "optimizer", "step_generator", "host_generator", "rng", "data")


def capture_rng() -> dict:
    """This process's global RNG states as plain Python values: they survive both
    torch.load(weights_only=True) and all_gather_object (which cannot carry tensors here)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class TrainState:
    """The live objects of a run and the step they are at; `state_dict()` / `load_state_dict()`
    turn them into the checkpoint dict and back. `model`, `ema` and `optimizers` are anything
    with state_dict/load_state_dict (srdit.train.optim's EMA and Optimizers)."""

    def __init__(self, cfg, model, ema, optimizers, step_generator: torch.Generator,
                 host_generator: torch.Generator, step: int = 0):
        self.cfg, self.model, self.ema, self.optimizers = cfg, model, ema, optimizers
        self.step_generator, self.host_generator, self.step = step_generator, host_generator, step

    def state_dict(self) -> dict:
        """The checkpoint dict. A collective under torchrun: every rank calls it (each rank's
        RNG states are gathered into it; with a sharded optimizer, so are the weights, the
        average and AdamW's moments: the file holds them whole, at any number of ranks)."""
        self.optimizers.gather_weights()
        self.ema.gather()
        rng = distributed.all_gather_objects(capture_rng())
        t = self.cfg.train
        return {"format": FORMAT, "step": self.step, "config": self.cfg.to_dict(),
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizers.state_dict(), "step_generator": self.step_generator.get_state(),
                "host_generator": self.host_generator.get_state(), "rng": rng,
                "data": {"step": self.step, "seed": t.seed, "world": len(rng),
                         "micro_batch": t.global_batch // (len(rng) * t.grad_accum)}}

    def load_state_dict(self, sd: dict, *, rank: int = 0, world: int = 1) -> None:
        """Put a checkpoint back into the live objects, in place. Each rank takes its own RNG
        states when the world size is the checkpoint's (else the step generators alone carry
        the trajectory, which they do: they draw every random number of a step)."""
        check(sd)
        for part, target in (("model", self.model), ("ema", self.ema), ("optimizer", self.optimizers)):
            try:
                target.load_state_dict(sd[part])
            except (RuntimeError, ValueError, KeyError, IndexError) as error:  # torch's words for a misfit
                details = [line.strip().rstrip(". ") for line in str(error).strip().splitlines()]
                raise ValueError(f"its {part} does not fit this run's: {'; '.join(details[1:] or details)}") from None
        self.step_generator.set_state(sd["step_generator"])
        self.host_generator.set_state(sd["host_generator"])
        if len(sd["rng"]) == world:
            restore_rng(sd["rng"][rank])
        self.step = int(sd["step"])


def written_layout(sd: dict) -> tuple[int, int]:
    """(world size, micro-batch) a checkpoint was written with; a checkpoint from before they
    were stored has them in its RNG states (one per rank) and its config."""
    world = sd["data"].get("world", len(sd["rng"]))
    t = sd["config"]["train"]
    return world, sd["data"].get("micro_batch", t["global_batch"] // (world * t.get("grad_accum", 1)))


def is_checkpoint(obj) -> bool:
    """True for an srdit training checkpoint (also for one missing keys: `check` says which)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def check(obj) -> dict:
    """obj itself when it is a complete srdit training checkpoint, else a ValueError saying why."""
    if not is_checkpoint(obj):
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"not an srdit training checkpoint (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in KEYS if k not in obj]
    if missing:
        raise ValueError(f"an srdit training checkpoint without {', '.join(missing)}")
    return obj


def for_sampling(obj) -> tuple[dict, dict, int]:
    """(config dict, EMA weights, step) of a training checkpoint: what srdit.sample needs."""
    check(obj)
    return obj["config"], obj["ema"], int(obj["step"])

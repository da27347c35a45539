"""One optimizer step: teacher targets, losses, backward, clip, update, EMA (DESIGN.md "One
training step"). Nothing here reads a device value on the host (with the default AdamW):
loss parts, gradient norm and the skip flag are accumulated on the device and read only by
the logger every log_every steps.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from srdit.config import Config
from srdit.model.dinov2 import repa_targets
from srdit.train.fixed_sum import MicroBatchTree, whole_norm
from srdit.train.flat import FlatGradients
from srdit.train.loss import StepNoise, diffusion_loss
from srdit.train.optim import EMA, Optimizers
from srdit.train.reduce import GradReducer, wait_for

LOSS_PARTS = ("vel", "repa", "cls", "cfm", "disp")


@contextlib.contextmanager
def phase(name: str):
    """A named range for torch.profiler and, on a GPU, for Nsight (NVTX): profiling/ reads them."""
    nvtx = torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


class DeviceMetrics:
    """Sums of per-step device scalars since the last read; `read()` is the only host sync."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.bad_streak = torch.zeros((), device=self.device)  # consecutive skipped steps (kept across reads)
        self.worst_streak = torch.zeros((), device=self.device)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.steps += 1
        self.bad_streak = (self.bad_streak + 1) * values["skipped"]
        self.worst_streak = torch.maximum(self.worst_streak, self.bad_streak)

    def read(self) -> dict[str, float]:
        """Means over the steps since the last read, the number of skipped steps and the longest
        run of consecutive skipped steps seen."""
        names = list(self.sums)
        means = torch.stack([self.sums[n].float() for n in names])
        worst = self.worst_streak.clone()
        if dist.is_initialized():  # the loss of the global batch, not of rank 0's share
            dist.all_reduce(means)
            means /= dist.get_world_size()
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        values = torch.cat([means, worst[None]]).tolist()  # host sync
        out = {n: v / max(1, self.steps) for n, v in zip(names, values)}
        out["skipped"] = round(out.get("skipped", 0.0) * self.steps)
        out["worst_bad_streak"] = int(values[-1])
        self.sums, self.steps = {}, 0
        self.worst_streak = self.bad_streak.clone()
        return out


def step_autocast(cfg: Config, device: torch.device):
    """What the teacher and the forward run under: bf16 autocast on a GPU with train.precision=bf16
    (fp32 master weights, gradients and optimizer), a context factory; None: fp32, no autocast."""
    if device.type == "cuda" and cfg.train.precision == "bf16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return None


class StepRunner:
    """One optimizer step over the micro-batches of this rank. The gradients are views of one
    flat buffer (srdit.train.flat); with several ranks `reducer` (srdit.train.reduce) sums them
    across ranks during the last backward."""

    def __init__(self, cfg: Config, model: nn.Module, train_model: nn.Module, teacher: nn.Module | None,
                 optimizers: Optimizers, ema: EMA, *, rank: int, world: int, device: torch.device, autocast=None,
                 grads: FlatGradients | None = None, reducer: GradReducer | None = None):
        self.cfg, self.model, self.train_model, self.teacher = cfg, model, train_model, teacher
        self.optimizers, self.ema = optimizers, ema
        self.rank, self.world, self.device = rank, world, device
        self.grads = grads if grads is not None else FlatGradients(model)
        self.reducer = reducer
        if world > 1 and reducer is None:
            raise ValueError(f"{world} ranks need a GradReducer")
        self.params = self.grads.params
        # train.reduce_order=fixed: the micro-batches summed by pairs (srdit.train.fixed_sum); the
        # reducer collapses the saved pairs into each chunk before it goes out
        self.fixed = cfg.train.reduce_order == "fixed"
        self.tree = MicroBatchTree(self.grads.buffer, cfg.train.grad_accum, self.grads.used) if self.fixed else None
        if self.tree is not None and reducer is not None:
            reducer.before_launch = self.tree.collapse
        # autocast: a context factory (build_step resolves it: step_autocast by default), None for fp32
        self.autocast = autocast if autocast is not None else contextlib.nullcontext

    def norm_and_skip(self, total_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global gradient norm and the skip flag (1.0: a non-finite loss or gradient). Where
        this rank holds the whole summed buffer, its norm (train.reduce_order=fixed: in the fixed
        order, the same bits at any world size); a non-finite loss on one rank makes the summed
        gradients non-finite too. Sharded, each rank holds 1/world of them: the norm comes from
        every rank's shard (summed in another order than one norm over the whole buffer: equal to
        rounding; fixed: the same bits), and a non-finite loss on any rank skips everywhere."""
        reducer = self.reducer
        if reducer is None or reducer.shard is None or reducer.gather_back:
            grad_norm = whole_norm(self.grads.buffer, self.grads.used) if self.fixed else self.grads.norm()
            return grad_norm, (~(torch.isfinite(grad_norm) & torch.isfinite(total_sum))).float()
        if self.fixed:
            return reducer.fixed_norm_and_skip(total_sum)
        local = torch.stack([torch.linalg.vector_norm(reducer.shard).square(), (~torch.isfinite(total_sum)).float()])
        dist.all_reduce(local)  # a device collective: captured with the step
        grad_norm = local[0].sqrt()
        return grad_norm, ((~torch.isfinite(grad_norm)) | (local[1] > 0)).float()

    def clip(self, grad_norm: torch.Tensor) -> torch.Tensor | None:
        """Gradient clipping to train.grad_clip, as torch's clip_grad_norm_: g * min(1, c / (|g| +
        1e-6)). Fused AdamW takes it as its grad_scale (it divides each gradient by it as it reads
        it: no pass of its own over the gradients); other optimizers get clipped gradients."""
        c = self.cfg.train.grad_clip
        if c <= 0:
            return None
        if self.optimizers.device_skip:
            return torch.clamp((grad_norm + 1e-6) / c, min=1.0)
        torch.nn.utils.clip_grads_with_norm_(self.params, c, grad_norm)  # foreach
        return None

    @torch.no_grad()
    def teacher_targets(self, batch: dict) -> torch.Tensor | None:
        """[B, 1 + P, d] DINOv2 class + patch tokens: cached in the batch (as stored, fp16: the loss
        casts what it needs cast, diffusion_loss), or computed from images (fp32)."""
        if "teacher" in batch:
            return batch["teacher"]
        if self.teacher is None:
            return None
        with self.autocast():
            cls, patches = self.teacher(batch["image"])
        return repa_targets(cls, patches).float()

    def run(self, micro_batches: list[dict], noise: StepNoise) -> dict[str, torch.Tensor]:
        accum = len(micro_batches)
        if self.tree is not None and accum != self.tree.accum:
            raise ValueError(f"the fixed-order sum was planned for train.grad_accum={self.tree.accum} micro-batches, "
                             f"the step got {accum}")
        micro = micro_batches[0]["latent"].shape[0]
        offset = self.rank * micro * accum  # this rank's first row of the global batch
        parts_sum = {k: torch.zeros((), device=self.device) for k in LOSS_PARTS}
        total_sum = torch.zeros((), device=self.device)
        self.grads.zero()  # one fill; backward accumulates into the buffer's views in place
        # sharded: the last step updated only this rank's pieces of the weights; gather the rest
        # behind the teacher's forward, which does not read them
        gathering = self.optimizers.gather_weights(wait=False)
        for i, batch in enumerate(micro_batches):
            rows = noise.rows(offset + i * micro, offset + (i + 1) * micro)
            with phase("teacher"):
                teacher = self.teacher_targets(batch)
            if gathering:
                wait_for(gathering)
                gathering = []
            if self.reducer is not None and i == accum - 1:
                self.reducer.arm()  # chunks go out as their gradients complete in this backward
            with phase("forward+loss"), self.autocast():
                total, parts = diffusion_loss(self.train_model, batch["latent"], batch["label"], teacher, rows,
                                              self.cfg.train, kernels=self.cfg.model.kernels)
            with phase("backward"):
                # the mean over the global batch: each rank's share arrives divided by the world
                # size, so the reduction only sums (srdit.train.reduce)
                (total / (accum * self.world)).backward()
            if self.tree is not None:
                self.tree.after_backward(i)
            total_sum += total.detach() / accum
            for k in LOSS_PARTS:
                parts_sum[k] += parts[k].float() / accum
        if self.reducer is not None:
            with phase("reduce"):
                self.reducer.finish()
        elif self.tree is not None:
            self.tree.collapse()
        if self.tree is not None:
            self.tree.reset()
        with phase("clip"):
            # measured also with clipping off (train.grad_clip=0): the log and the skip flag use it
            grad_norm, found_inf = self.norm_and_skip(total_sum)
            grad_scale = self.clip(grad_norm)
        with phase("optimizer"):
            self.optimizers.step(found_inf, grad_scale)
        with phase("ema"):
            self.ema.update(found_inf)
        return {"loss": total_sum, **parts_sum, "grad_norm": grad_norm, "skipped": found_inf}

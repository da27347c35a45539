"""srdit's own gradient reduction across ranks, in place of DistributedDataParallel.

The flat gradient buffer (srdit.train.flat) is cut into CHUNKS contiguous chunks at parameter
boundaries. A post-accumulate-grad hook counts the gradients that land in each chunk during the
last micro-batch's backward; when a chunk's last gradient lands, its all_reduce is launched
asynchronously, so it runs while autograd computes the rest. The buffer is laid out in
gradient-ready order, so the chunks complete from the first to the last. `finish()` launches what
is left (a chunk whose parameters got no gradient this step) and waits for all: on a GPU the wait
is a stream dependency, not a host block, and everything here is captured in the step's CUDA
graph (srdit.train.graphs) with the rest of the step.

Arithmetic: the step seeds each rank's backward with 1 / (grad_accum x world) (srdit.train.step),
so a rank's gradient arrives already divided by the world size and the all_reduce sums. DDP
multiplies each gradient by 1 / world, then sums: the same bits for power-of-two world sizes
(a scaling by 2^-k is exact through the whole backward), within a rounding otherwise.

dtype: float32 (default) reduces the buffer itself. bfloat16 halves the bytes on the wire: each
chunk is rounded into a bf16 staging buffer, summed in bf16 and copied back. bf16 keeps 8
significant bits, so a rounding moves a value by at most 2^-8 of it. With g_r rank r's gradient
(undivided) the world's terms are g_r / world: rounding each costs at most 2^-8 |g_r| / world,
and each of the world - 1 additions at most 2^-8 of a partial sum, itself at most
sum_r |g_r| / world. In all, to first order: |error| <= 2^-8 sum_r |g_r| per element, whatever
the world size (tests/train/test_ranks.py checks it). Where the ranks' gradients agree, that is
up to world x 2^-8 of the result: fp32 stays the default.

Why not a library's: DDP copies every fresh gradient into its buckets (a pass over the buffer and
a launch per parameter each step) and re-broadcasts buffers before each forward unless told not
to; captured whole, it needs its own warm-up ritual (MULTI_GPU.md). FSDP2 shards parameters,
which a 140M model does not need, and gathers them per layer on the critical path.
ZeroRedundancyOptimizer steps per-parameter optimizers outside any graph. apex's
DistributedFusedAdam, MLPerf's choice, is on no package registry. This reducer is one buffer,
a few collectives and hooks: capturable as it is, overlapped with backward, and ready to become
a reduce-scatter for a sharded optimizer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from srdit.train.flat import FlatGradients

CHUNKS = 4  # a few, so the first all_reduce starts a quarter into the backward; fewer launches than DDP's 25 MB buckets
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def chunk_bounds(spans: list[tuple[int, int]], total: int, chunks: int) -> list[int]:
    """Chunk boundaries [0, b1, ..., total] over a buffer of `total` elements, cut only where a
    parameter's span ends and near equal sizes; `spans` are the parameters' [start, end) in
    buffer order. Fewer chunks when there are fewer parameters."""
    ends = sorted(end for _, end in spans)
    bounds = [0]
    for k in range(1, chunks):
        target = total * k // chunks
        cut = min(ends, key=lambda e: abs(e - target), default=total)
        if bounds[-1] < cut < total:
            bounds.append(cut)
    bounds.append(total)
    return bounds


class GradReducer:
    """Sum the flat gradients of every rank in place (each already divided by the world size)."""

    def __init__(self, grads: FlatGradients, *, dtype: str = "fp32", chunks: int = CHUNKS, group=None):
        self.grads, self.group = grads, group
        self.dtype = REDUCE_DTYPES[dtype]
        spans = {id(p): grads.span(p) for p in grads.params}
        self.bounds = chunk_bounds(list(spans.values()), grads.buffer.numel(), chunks)
        self.chunks = [grads.buffer[a:b] for a, b in zip(self.bounds, self.bounds[1:])]
        self.staging = (None if self.dtype == grads.buffer.dtype else
                        [torch.empty(c.numel(), dtype=self.dtype, device=c.device) for c in self.chunks])
        self.chunk_of = {key: self._chunk_index(start) for key, (start, _) in spans.items()}
        self.members = [sum(1 for k in self.chunk_of.values() if k == i) for i in range(len(self.chunks))]
        self.armed, self.remaining, self.works = False, [], []
        # of the last reduction: the chunks in the order they went out, and how many gradients had
        # landed when each did (the overlap with the backward: bench/traffic.py models it)
        self.launch_order: list[int] = []
        self.landed_at_launch: list[int] = []
        self.landed = 0
        self.hooks = [p.register_post_accumulate_grad_hook(self._landed) for p in grads.params]

    def _chunk_index(self, start: int) -> int:
        return max(i for i, b in enumerate(self.bounds[:-1]) if b <= start)

    def arm(self) -> None:
        """The next backward is the step's last: reduce each chunk as it completes."""
        self.armed, self.remaining, self.works = True, list(self.members), [None] * len(self.chunks)
        self.launch_order, self.landed_at_launch, self.landed = [], [], 0

    def _landed(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        i = self.chunk_of[id(p)]
        self.landed += 1
        self.remaining[i] -= 1
        if self.remaining[i] == 0:
            self._launch(i)

    def _launch(self, i: int) -> None:
        tensor = self.chunks[i]
        if self.staging is not None:
            self.staging[i].copy_(tensor)
            tensor = self.staging[i]
        self.works[i] = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self.launch_order.append(i)
        self.landed_at_launch.append(self.landed)

    def finish(self) -> None:
        """Launch the chunks still waiting (parameters without a gradient this step: the same on
        every rank, which run the same branch), then wait for every chunk."""
        if not self.armed:
            raise RuntimeError("GradReducer.finish without arm(): the step's last backward was not reduced")
        for i, work in enumerate(self.works):
            if work is None:
                self._launch(i)
        for i, work in enumerate(self.works):
            work.wait()
            if self.staging is not None:
                self.chunks[i].copy_(self.staging[i])
        self.armed, self.works = False, []

"""srdit's own gradient reduction across ranks, in place of DistributedDataParallel, and the
collectives of the sharded update.

The flat gradient buffer (srdit.train.flat) is cut into CHUNKS contiguous chunks. A
post-accumulate-grad hook counts the gradients that land in each chunk during the last
micro-batch's backward; when a chunk's last gradient lands, its collective is launched
asynchronously, so it runs while autograd computes the rest. The buffer is laid out in
gradient-ready order, so the chunks complete from the first to the last. `finish()` launches what
is left (a chunk whose parameters got no gradient this step) and waits for all: on a GPU the wait
is a stream dependency, not a host block, and everything here is captured in the step's CUDA
graph (srdit.train.graphs) with the rest of the step.

Unsharded, each chunk is all-reduced in place. Sharded (train.shard_optimizer; a ShardLayout:
each chunk cut into world equal pieces, rank r owning the r-th), each chunk is reduce-scattered:
rank r receives the sum of its pieces only, in `shard`, the gradients of its part of the update
(srdit.train.optim: AdamW and the EMA on the pieces). The updated pieces go back to every rank by
an all-gather (gather_pieces) launched at the start of the next step, behind the teacher's forward,
and waited for before the student's forward (srdit.train.step). A reduce-scatter and an all-gather
move what an all-reduce moves; the update's bytes per rank fall by the world size.

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

Order: the collectives add the ranks' terms in their own order (NCCL's ring or tree, gloo's),
which changes with the world size. train.reduce_order=fixed replaces the reduce-scatter by an
all-to-all and adds the pieces by pairs in rank order here, and the clip's norm comes from tile
sums in one tree (srdit.train.fixed_sum): the same bits at any world size with the same
micro-batch.

Why not a library's: DDP copies every fresh gradient into its buckets (a pass over the buffer and
a launch per parameter each step) and re-broadcasts buffers before each forward unless told not
to; captured whole, it needs its own warm-up ritual (MULTI_GPU.md). FSDP2 shards parameters,
which a 140M model does not need, and gathers them per layer on the critical path.
ZeroRedundancyOptimizer steps per-parameter optimizers outside any graph. apex's
DistributedFusedAdam, MLPerf's choice, is on no package registry. This reducer is one buffer,
a few collectives and hooks: capturable as it is, overlapped with backward, and the same chunks
reduce-scattered for the sharded update.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from srdit.train.fixed_sum import TILE, pairwise_sum, tile_order, tile_sums
from srdit.train.flat import FlatGradients, ShardLayout, chunk_bounds, span

CHUNKS = 4  # a few, so the first all_reduce starts a quarter into the backward; fewer launches than DDP's 25 MB buckets
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _all_reduce(tensor, group):
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)


def _reduce_scatter(output, input, group):
    # torch 2.14 renames reduce_scatter_tensor (the GPU image's torch 2.11 has only the old name)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, op=dist.ReduceOp.SUM, group=group, async_op=True)


def _all_to_all(output, input, group):
    return dist.all_to_all_single(output, input, group=group, async_op=True)


def _all_gather(output, input, group):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=True)


def gather_pieces(buffer: torch.Tensor, layout: ShardLayout, group=None, tail: bool = False) -> list:
    """Launch the all-gather of every rank's pieces of a flat buffer into every rank's copy, in
    place (each rank's input is its own piece of the output), chunk by chunk (with `tail`, the
    frozen region's pieces too: the EMA's); returns the works to wait for. What the weights and
    the EMA go through after a sharded update."""
    return [_all_gather(buffer[a:b], buffer[p:q], group) for (a, b), (p, q) in layout.gathers(tail)]


def wait_for(works: list) -> None:
    """Wait for collectives (on a GPU: the current stream waits, the host does not); a profiler
    range marks the point, where bench/traffic.py's model makes the step wait too. A collective
    that failed (another rank stopped answering) is raised as torch.distributed's DistError: gloo
    raises a plain RuntimeError from an async work's wait ("Application timeout caused pair
    closure"), which srdit.distributed.run_command could not tell from a bug."""
    with torch.profiler.record_function("wait"):
        for work in works:
            try:
                work.wait()
            except dist.DistError:
                raise
            except RuntimeError as error:
                raise dist.DistError(str(error)) from error


class GradReducer:
    """Sum the flat gradients of every rank (each already divided by the world size): in place
    with all_reduce, or, with a ShardLayout, reduce-scattered into `shard`, a compact buffer of
    this rank's pieces (the sharded optimizer's gradients).

    order="fixed" (train.reduce_order; srdit.train.fixed_sum): the sum is the same pairwise tree
    over ranks whatever the library does: each chunk goes out by an all-to-all (rank r receives
    every rank's r-th piece, the bytes of a reduce-scatter), and the received pieces are added by
    pairs in rank order into `shard`; with gather_back (an unsharded optimizer) the summed pieces
    are all-gathered back into the buffer (the all-reduce's second half). It needs a ShardLayout
    and fp32."""

    def __init__(self, grads: FlatGradients, *, dtype: str = "fp32", chunks: int = CHUNKS, group=None,
                 layout: ShardLayout | None = None, order: str = "library", gather_back: bool = False):
        self.grads, self.group, self.layout = grads, group, layout
        self.dtype = REDUCE_DTYPES[dtype]
        self.fixed, self.gather_back = order == "fixed", gather_back
        self.before_launch = None  # (start, end) -> None, run before a chunk goes out: MicroBatchTree.collapse
        if self.fixed and (layout is None or self.dtype != grads.buffer.dtype):
            raise ValueError("the fixed-order reduction needs a ShardLayout and fp32 (train.grad_reduce_dtype=fp32)")
        spans = {id(p): span(p) for p in grads.params}
        # unsharded, up to the trainable parameters' end: past it the buffer is zero on every rank
        self.bounds = layout.bounds if layout is not None else chunk_bounds(list(spans.values()), grads.used, chunks)
        self.chunks = [grads.buffer[a:b] for a, b in zip(self.bounds, self.bounds[1:])]
        self.staging = (None if self.dtype == grads.buffer.dtype else
                        [torch.empty(c.numel(), dtype=self.dtype, device=c.device) for c in self.chunks])
        self.shard = self.shard_staging = None
        if layout is not None:
            self.shard = torch.zeros(layout.shard_size, dtype=grads.buffer.dtype, device=grads.buffer.device)
            offsets = layout.compact_offsets() + [self.shard.numel()]
            self.shard_pieces = [self.shard[a:b] for a, b in zip(offsets, offsets[1:])]
            if self.staging is not None:
                self.shard_staging = [torch.empty(p.numel(), dtype=self.dtype, device=p.device) for p in self.shard_pieces]
        if self.fixed:  # every rank's copy of this rank's pieces, and where the norm's tile sums go
            self.received = [torch.empty(layout.world, p.numel(), dtype=p.dtype, device=p.device)
                             for p in self.shard_pieces]
            self.tiles = layout.shard_size // TILE + 1  # a rank's tile sums and its non-finite-loss flag
            self.tile_order = tile_order(layout, self.tiles).to(grads.buffer.device)
            self.gathered = torch.empty(layout.world * self.tiles, dtype=grads.buffer.dtype, device=grads.buffer.device)
        # a parameter belongs to every chunk it overlaps (a sharded chunk may cut one)
        self.chunks_of = {key: [i for i, (a, b) in enumerate(zip(self.bounds, self.bounds[1:])) if start < b and a < end]
                          for key, (start, end) in spans.items()}
        self.members = [sum(1 for ks in self.chunks_of.values() if i in ks) for i in range(len(self.chunks))]
        self.armed, self.remaining, self.works = False, [], []
        # of the last reduction, for the tests: the chunks in the order they went out, and how many
        # gradients had landed when each did (how far into the backward it overlapped)
        self.launch_order: list[int] = []
        self.landed_at_launch: list[int] = []
        self.landed = 0
        # through a weak reference: a parameter keeps its hooks on the C++ side, where the garbage
        # collector cannot see the cycle parameter -> hook -> reducer -> gradients -> parameter, so
        # a hook holding the reducer would keep every buffer of a finished step alive (bench
        # scripts build one step after another)
        this = weakref.ref(self)

        def landed(p: torch.Tensor) -> None:
            reducer = this()
            if reducer is not None:
                reducer._landed(p)

        self.hooks = [p.register_post_accumulate_grad_hook(landed) for p in grads.params]

    def arm(self) -> None:
        """The next backward is the step's last: reduce each chunk as it completes."""
        self.armed, self.remaining, self.works = True, list(self.members), [None] * len(self.chunks)
        self.launch_order, self.landed_at_launch, self.landed = [], [], 0

    def _landed(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        self.landed += 1
        for i in self.chunks_of[id(p)]:
            self.remaining[i] -= 1
            if self.remaining[i] == 0:
                self._launch(i)

    def _launch(self, i: int) -> None:
        if self.before_launch is not None:
            self.before_launch(self.bounds[i], self.bounds[i + 1])
        tensor = self.chunks[i]
        if self.staging is not None:
            self.staging[i].copy_(tensor)
            tensor = self.staging[i]
        if self.fixed:
            self.works[i] = _all_to_all(self.received[i].view(-1), tensor, self.group)
        elif self.layout is None:
            self.works[i] = _all_reduce(tensor, self.group)
        else:
            out = self.shard_pieces[i] if self.shard_staging is None else self.shard_staging[i]
            self.works[i] = _reduce_scatter(out, tensor, self.group)
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
        wait_for(self.works)
        if self.fixed:  # the ranks' copies of each piece added by pairs, in rank order
            for received, piece in zip(self.received, self.shard_pieces):
                pairwise_sum(received, out=piece)
            if self.gather_back:
                wait_for([_all_gather(chunk, piece, self.group)
                          for chunk, piece in zip(self.chunks, self.shard_pieces)])
        elif self.staging is not None:  # back from bf16
            for i in range(len(self.chunks)):
                if self.layout is None:
                    self.chunks[i].copy_(self.staging[i])
                else:
                    self.shard_pieces[i].copy_(self.shard_staging[i])
        self.armed, self.works = False, []

    def fixed_norm_and_skip(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """order="fixed", sharded (not gathered back): the global gradient norm in the fixed order
        (srdit.train.fixed_sum) and the skip flag (1.0: a non-finite norm, or a non-finite `loss`
        on any rank). Each rank's tile sums and loss flag are all-gathered (a few MB) and summed
        in buffer order."""
        bad_loss = (~torch.isfinite(loss)).float()
        mine = torch.cat([tile_sums(self.shard), bad_loss[None]])
        wait_for([_all_gather(self.gathered, mine, self.group)])
        norm = pairwise_sum(self.gathered[self.tile_order]).sqrt()
        flags = self.gathered.view(self.layout.world, self.tiles)[:, -1]
        return norm, ((~torch.isfinite(norm)) | (flags.sum() > 0)).float()

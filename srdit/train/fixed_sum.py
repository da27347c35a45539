"""Sums in one fixed order that does not depend on how many ranks share the work
(train.reduce_order=fixed): a run resumed on another number of ranks, with the same micro-batch,
then takes the same steps bit for bit.

Why the default cannot: floating-point addition is not associative. Four micro-batch gradients
summed by 4 ranks' all-reduce, by 2 ranks with 2 micro-batches each, or by one rank with 4 come
out as (g0+g1)+(g2+g3), ((g0+g1)+(g2+g3)) in the library's own order, or ((g0+g1)+g2)+g3: equal
to rounding, not in their bits. And the clip's norm, summed over shards whose edges move with the
world size, differs the same way.

The fixed order is one tree: adjacent pairs, level by level (pairwise_sum: x0+x1, x2+x3, ...; an
odd last node goes up as it is), over the global batch's micro-batches in order (rank r holds
micro-batches r x accum ... (r + 1) x accum - 1, srdit.train.step). A rank sums its own
micro-batches by that tree (MicroBatchTree); when accum is a power of two its block of
micro-batches is a whole subtree, so the ranks' partial sums, combined by the same pairing over
ranks, give the global tree's sum whatever the split. The ranks' partial sums meet through an
all-to-all (each rank receives every rank's copy of its pieces: the bytes of a reduce-scatter)
and are added by pairwise_sum in rank order on the receiving rank (srdit.train.reduce), not in
the collective's own order.

The clip's norm is the same kind of tree over fixed tiles of the flat gradient buffer: each
tile's sum of squares by pairs (tile_sums), then the tiles' sums by pairs in buffer order
(whole_norm on one rank; sharded, the reducer all-gathers every rank's tile sums and puts them in
buffer order with tile_order). Tiles are ALIGN elements, where every rank's piece starts whatever
the world size, so no tile straddles two ranks; the padding that does change with the world size
only appends zero tiles, and appending zeros does not change a pairwise sum (each zero is added
exactly).

What it costs (train.reduce_order=fixed is off by default; bench/RESULTS.md): the all-to-all
moves what the reduce-scatter moves, but the sum is the receiving rank's work (log2(world) levels
of elementwise adds over world pieces) in a receive buffer the size of the gradients; with an
unsharded optimizer an all-gather brings the sums back before the clip; the norm is a square and
six halvings over the rank's shard instead of one reduction; grad_accum > 2 keeps up to
log2(grad_accum) saved partial sums. Counted at 8 x 32, sharded: 7.67 -> 8.07 ms per rank.

Every addition here is an elementwise op of its own: the same bits on any device, thread count or
tensor extent (no reduction kernel whose order depends on the shape), and the step that runs them
is not compiled (torch.compile could contract a square and an add into one fused multiply-add).
"""
from __future__ import annotations

import torch

from srdit.train.flat import ALIGN, ShardLayout, round_up

TILE = ALIGN  # every rank's piece of a chunk starts at a multiple of it, for any world size


def pairwise_sum(x: torch.Tensor, dim: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of `x` over `dim` by adjacent pairs, level by level (x0+x1, x2+x3, ...; an odd
    last one goes up unpaired), into `out` when given. Zeros appended along `dim` do not change
    the result, bit for bit."""
    x = x.movedim(dim, 0)
    while x.shape[0] > 2:
        n = x.shape[0]
        pairs = x[0:n - 1:2] + x[1:n:2]
        x = torch.cat([pairs, x[n - 1:]]) if n % 2 else pairs
    if x.shape[0] == 1:
        return x[0].clone() if out is None else out.copy_(x[0])
    return torch.add(x[0], x[1], out=out)


class MicroBatchTree:
    """A rank's micro-batch gradients summed by adjacent pairs, level by level, in the flat
    gradient buffer. Autograd adds each backward into the buffer, so two micro-batches make a
    pair there ((0 + g0) + g1); after each pair that is not the step's last, the pair is merged
    with the saved partial sums of its level (a binary counter) and saved, and the buffer zeroed.
    The last micro-batch's backward leaves the last pair (or a lone micro-batch) in the buffer;
    collapse() adds the saved partial sums into it, deepest level last, which is where the
    pairwise tree puts them. With accum = 1 or 2 nothing is saved and nothing costs more than the
    default accumulation."""

    def __init__(self, buffer: torch.Tensor, accum: int, used: int):
        self.buffer, self.accum, self.used = buffer, accum, used
        depth = ((accum - 1) // 2).bit_length()  # the most partial sums saved at once
        self.saved = [torch.zeros(used, dtype=buffer.dtype, device=buffer.device) for _ in range(depth)]
        self.levels: list[int] = []

    def after_backward(self, index: int) -> None:
        """After micro-batch `index`'s backward, unless it is the step's last."""
        if index % 2 == 0 or index == self.accum - 1:
            return
        node, level = self.buffer[:self.used], 1
        while self.levels and self.levels[-1] == level:
            self.levels.pop()
            node.add_(self.saved[len(self.levels)])  # the left subtree's sum + the right one's
            level += 1
        self.saved[len(self.levels)].copy_(node)
        self.levels.append(level)
        self.buffer.zero_()

    def collapse(self, start: int = 0, end: int | None = None) -> None:
        """The saved partial sums added into buffer[start:end] (a chunk about to be reduced, or
        all of it): the rank's sum of its micro-batches there. Elementwise, so chunk by chunk
        gives what the whole would."""
        end = self.used if end is None else min(end, self.used)
        for k in reversed(range(len(self.levels))):
            self.buffer[start:end].add_(self.saved[k][start:end])

    def reset(self) -> None:
        """The step's sum is taken: the next step starts with nothing saved."""
        self.levels = []


def tile_sums(x: torch.Tensor) -> torch.Tensor:
    """The sum of squares of each TILE elements of a 1-D tensor, by pairs within the tile."""
    if x.numel() % TILE:
        raise ValueError(f"the fixed-order norm sums tiles of {TILE} elements; {x.numel()} is not a multiple")
    return pairwise_sum(x.square().view(-1, TILE), dim=1)


def whole_norm(gradients: torch.Tensor, used: int) -> torch.Tensor:
    """The fixed-order norm of a whole flat gradient buffer (its first `used` elements hold every
    gradient): pairs within tiles, then the tiles' sums by pairs in buffer order."""
    return pairwise_sum(tile_sums(gradients[:round_up(used, TILE)])).sqrt()


def tile_order(layout: ShardLayout, stride: int) -> torch.Tensor:
    """Where each tile of the chunks lies, in buffer order, in the all-gather of every rank's tile
    sums (rank s's at s x stride onwards, its pieces in chunk order): the index that puts the
    gathered sums back in buffer order."""
    order = torch.empty(layout.end // TILE, dtype=torch.long)
    for s in range(layout.world):
        for k, compact in enumerate(layout.compact_offsets(s)):
            a, b = layout.piece(k, s)
            order[a // TILE: b // TILE] = s * stride + compact // TILE + torch.arange((b - a) // TILE)
    return order

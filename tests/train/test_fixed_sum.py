"""The fixed summation order (srdit.train.fixed_sum, train.reduce_order=fixed), in one process:
the pairwise tree against a plain recursive definition, the micro-batch tree against it, the split
over ranks, and the tile norm over every rank's shard against the whole buffer's. The ranks
themselves, through the reducer's all-to-all: test_sharding.py."""
import pytest
import torch

from srdit.config import ConfigError, apply_overrides, preset
from srdit.model import build_model
from srdit.train.fixed_sum import TILE, MicroBatchTree, pairwise_sum, tile_order, tile_sums, whole_norm
from srdit.train.flat import FlatGradients, ShardLayout, flatten_for_training, span

TINY = ["model.hidden=32", "model.heads=2", "model.depth=5", "model.projector_dim=32"]


def level_pairs(terms: list[torch.Tensor]) -> torch.Tensor:
    """The definition: add neighbours two by two; an odd last term goes up as it is; repeat."""
    while len(terms) > 1:
        paired = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        terms = paired + (terms[-1:] if len(terms) % 2 else [])
    return terms[0]


def terms(n: int, size: int = 4096, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # magnitudes spread over decades: additions in another order round differently
    return [torch.randn(size, generator=g) * 10.0 ** torch.randint(-3, 3, (size,), generator=g) for _ in range(n)]


def sequential(ts: list[torch.Tensor]) -> torch.Tensor:
    out = ts[0].clone()
    for t in ts[1:]:
        out += t
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 11, 16])
def test_pairwise_sum_is_the_level_by_level_tree_and_ignores_appended_zeros(n):
    ts = terms(n)
    stacked = torch.stack(ts)
    expected = level_pairs(ts)
    assert torch.equal(pairwise_sum(stacked), expected)
    assert torch.equal(pairwise_sum(stacked.T.contiguous(), dim=1), expected)
    out = torch.empty_like(expected)
    assert pairwise_sum(stacked, out=out) is out and torch.equal(out, expected)
    for extra in (1, 3, 8):
        padded = torch.cat([stacked, torch.zeros(extra, stacked.shape[1])])
        assert torch.equal(pairwise_sum(padded), expected)
    if n >= 4:  # ((a+b)+c)+d is not (a+b)+(c+d) for these terms: the checks above could fail
        assert not torch.equal(sequential(ts), expected)


@pytest.mark.parametrize("accum", [1, 2, 3, 4, 5, 6, 7, 8])
def test_the_micro_batch_tree_sums_a_ranks_micro_batches_by_pairs(accum):
    """Each 'backward' adds its gradient into the buffer, as autograd does; the tree saves pairs
    and collapses them into the last one, chunk by chunk as the reducer asks."""
    ts = terms(accum)
    used = ts[0].numel()
    buffer = torch.zeros(used + 64)  # the padding past `used` stays zero
    tree = MicroBatchTree(buffer, accum, used)
    assert len(tree.saved) == ((accum - 1) // 2).bit_length()
    for step in range(2):  # a second step starts from nothing saved
        buffer.zero_()
        for i, g in enumerate(ts):
            buffer[:used] += g
            tree.after_backward(i)
        for start in range(0, used, 1000):  # the reducer's chunks
            tree.collapse(start, start + 1000)
        tree.reset()
        assert torch.equal(buffer[:used], level_pairs([torch.zeros(used) + t for t in ts]))
        assert not buffer[used:].any()


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_ranks_summing_their_blocks_then_each_other_give_the_one_tree(world):
    """Eight micro-batches over `world` ranks of 8 / world each: every rank's tree, then the tree
    over ranks (the reducer's pairwise sum of the all-to-all's pieces) is the tree over all 8."""
    ts = terms(8, seed=1)
    accum = 8 // world
    partials = []
    for r in range(world):
        buffer = torch.zeros(ts[0].numel())
        tree = MicroBatchTree(buffer, accum, buffer.numel())
        for i, g in enumerate(ts[r * accum:(r + 1) * accum]):
            buffer += g
            tree.after_backward(i)
        tree.collapse()
        partials.append(buffer)
    assert torch.equal(pairwise_sum(torch.stack(partials)), level_pairs([torch.zeros_like(t) + t for t in ts]))


@pytest.mark.parametrize("world", [2, 4])
def test_the_tile_norm_of_the_shards_is_the_whole_buffers_bit_for_bit(world):
    """The same gradients laid out for 1 and for `world` ranks: the tiles' sums of every rank's
    shard, gathered and put in buffer order, sum to the one rank's norm exactly."""
    cfg = apply_overrides(preset("quickstart"), TINY)
    one = FlatGradients(flatten_for_training(build_model(cfg), cfg, 1))
    many_model = flatten_for_training(build_model(cfg), cfg, world)
    many = FlatGradients(many_model)
    g = torch.Generator().manual_seed(2)
    for p, q in zip(one.params, many.params, strict=True):
        values = torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-4, 1, (), generator=g)
        p.grad.copy_(values)
        q.grad.copy_(values)
    expected = whole_norm(one.buffer, one.used)
    assert torch.equal(whole_norm(many.buffer, many.used), expected)
    # pairwise sums are accurate: within fp32's rounding of the float64 norm
    torch.testing.assert_close(expected.double(), torch.linalg.vector_norm(one.buffer.double()), rtol=2e-7, atol=0)
    rows = []
    for rank in range(world):
        layout = ShardLayout(many_model, rank, world, 4)
        shard = torch.cat(layout.pieces(many.buffer))
        assert shard.numel() == layout.shard_size and shard.numel() % TILE == 0
        rows.append(torch.cat([tile_sums(shard), torch.zeros(1)]))
    gathered = torch.cat(rows)  # what the all-gather leaves on every rank
    order = tile_order(ShardLayout(many_model, 0, world, 4), rows[0].numel())
    assert sorted(order.tolist()) == [i for i in range(gathered.numel()) if (i + 1) % rows[0].numel()]
    assert torch.equal(pairwise_sum(gathered[order]).sqrt(), expected)
    trainable_end = max(span(p)[1] for p in many.params)
    assert order.numel() * TILE >= trainable_end


def test_the_fixed_order_sums_in_fp32_only():
    with pytest.raises(ConfigError, match="grad_reduce_dtype=fp32"):
        apply_overrides(preset("quickstart"), ["train.reduce_order=fixed", "train.grad_reduce_dtype=bf16"])
    with pytest.raises(ConfigError, match="reduce_order"):
        apply_overrides(preset("quickstart"), ["train.reduce_order=sorted"])


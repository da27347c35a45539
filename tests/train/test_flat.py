"""Flat parameters and gradients (srdit.train.flat) and the reducer's chunks (srdit.train.reduce),
in one process (the ranks themselves: test_ranks.py)."""
import copy

import pytest
import torch
import torch.distributed as dist

from srdit.config import apply_overrides, preset
from srdit.model import build_model
from srdit.train.flat import (FlatGradients, chunk_bounds, flat_view, flatten_for_training, flatten_parameters,
                              gradient_ready_order, probe_loss, training_order)
from srdit.train.optim import EMA
from srdit.train.reduce import GradReducer

TINY = ["model.hidden=32", "model.heads=2", "model.depth=5", "model.projector_dim=32"]
CPU = torch.device("cpu")


def tiny(*overrides):
    return apply_overrides(preset("quickstart"), [*TINY, *overrides])


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank in this process, destroyed after the test."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_a_permuted_layout_keeps_values_alignment_and_a_flat_ema():
    model = build_model(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)
    order = list(reversed(range(len(list(model.parameters())))))
    flatten_parameters(model, order)
    params = list(model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    offsets = [params[i].storage_offset() for i in order]
    assert offsets == sorted(offsets)  # laid out in the order asked
    assert all(p.storage_offset() * p.element_size() % 256 == 0 for p in params)
    ema, per_param = EMA(model, 0.9), EMA(reference, 0.9)
    assert len(ema._ema) == 1 and len(ema._src) == 1  # one tensor each: one kernel per update
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            d = torch.randn_like(p)
            p.add_(d)
            q.add_(d)
    ema.update(torch.zeros(()))
    per_param.update(torch.zeros(()))
    for a, b in zip(ema.model.parameters(), per_param.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="each of the"):
        flatten_parameters(build_model(tiny()), [0, 0])


@pytest.mark.parametrize("kernels", ["eager", "triton"])
def test_the_meta_probe_finds_the_order_a_real_backward_has(kernels):
    cfg = tiny(f"model.kernels={kernels}")
    measured = gradient_ready_order(build_model(cfg), probe_loss(cfg, CPU))
    assert training_order(cfg) == measured


def test_in_the_training_layout_gradients_fill_the_buffer_from_its_start():
    """What lets the reducer's chunks go out one after another during the backward."""
    cfg = tiny()
    model = flatten_for_training(build_model(cfg), cfg)
    grads = FlatGradients(model)
    params = list(model.parameters())
    order = gradient_ready_order(model, probe_loss(cfg, CPU))
    starts = [grads.view_of(params[i]).storage_offset() for i in order if params[i].requires_grad]
    assert starts == sorted(starts)


def test_flat_gradients_are_fixed_views_zeroed_by_one_fill_and_normed_by_one_reduction():
    cfg = tiny()
    model = flatten_for_training(build_model(cfg), cfg)
    grads = FlatGradients(model)
    views = {id(p): p.grad.data_ptr() for p in grads.params}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)  # pos_embed
    grads.zero()
    for _ in range(2):
        probe_loss(cfg, CPU)(model).backward()
        assert all(p.grad.data_ptr() == views[id(p)] for p in grads.params)  # accumulated in place
    twice = grads.buffer.clone()
    grads.zero()
    probe_loss(cfg, CPU)(model).backward()
    torch.testing.assert_close(twice, 2 * grads.buffer)
    torch.testing.assert_close(grads.norm(), torch.nn.utils.get_total_norm([p.grad for p in grads.params]),
                               rtol=1e-6, atol=0)


def test_chunks_are_cut_at_parameter_ends_into_near_equal_parts():
    spans = [(0, 10), (16, 50), (64, 70), (80, 100)]
    assert chunk_bounds(spans, 100, 2) == [0, 50, 100]
    assert chunk_bounds(spans, 100, 4) == [0, 10, 50, 70, 100]  # the ends nearest 25, 50 and 75
    assert chunk_bounds(spans[:1], 10, 4) == [0, 10]
    # the ends nearest 32, 64 and 96 (50, 70, 100) rounded to multiples of 32: 64, 64 (one cut), 96
    assert chunk_bounds(spans, 128, 4, multiple=32) == [0, 64, 96, 128]


def test_chunks_go_out_during_the_backward_in_buffer_order(one_rank_group):
    cfg = tiny()
    model = flatten_for_training(build_model(cfg), cfg)
    grads = FlatGradients(model)
    reducer = GradReducer(grads, chunks=4)
    reducer.arm()
    probe_loss(cfg, CPU)(model).backward()
    expected = grads.buffer.clone()
    reducer.finish()
    assert reducer.launch_order == list(range(len(reducer.chunks))) and len(reducer.chunks) == 4
    landed = reducer.landed_at_launch
    assert landed[0] < len(grads.params) / 2 and landed == sorted(landed)  # the first long before the end
    assert torch.equal(grads.buffer, expected)  # one rank: the sum of one term
    with pytest.raises(RuntimeError, match="without arm"):
        reducer.finish()


def test_bf16_reduction_rounds_through_bf16(one_rank_group):
    cfg = tiny()
    model = flatten_for_training(build_model(cfg), cfg)
    grads = FlatGradients(model)
    reducer = GradReducer(grads, dtype="bf16")
    reducer.arm()
    probe_loss(cfg, CPU)(model).backward()
    expected = grads.buffer.to(torch.bfloat16).float()
    reducer.finish()
    assert torch.equal(grads.buffer, expected)
    assert flat_view(list(model.parameters())) is not None


def test_a_failed_wait_is_a_distributed_error():
    """gloo's async work raises a plain RuntimeError when another rank stops answering; wait_for
    makes it the DistError srdit.distributed.run_command turns into its one-line message."""
    from srdit.distributed import collective_failed
    from srdit.train.reduce import wait_for

    class Failed:
        def wait(self):
            raise RuntimeError("Application timeout caused pair closure")

    with pytest.raises(dist.DistError, match="Application timeout") as raised:
        wait_for([Failed()])
    assert collective_failed(raised.value)


@pytest.mark.parametrize("world", [2, 8])
def test_frozen_weights_lie_apart_so_every_rank_updates_an_equal_share(world):
    """flatten_for_training puts pos_embed after the trainable weights, in a region of its own:
    each rank's AdamW runs then hold exactly 1/world of what the unsharded AdamW updates in the
    same layout, and its EMA pieces 1/world of the whole buffer (issue 23's bytes target)."""
    from srdit.train.flat import ShardLayout, flat_buffer, span

    cfg = tiny()
    model = flatten_for_training(build_model(cfg), cfg, world)
    frozen = [span(p) for p in model.parameters() if not p.requires_grad]
    trainable_end = max(span(p)[1] for p in model.parameters() if p.requires_grad)
    assert frozen and trainable_end <= min(s for s, _ in frozen)
    whole = ShardLayout.whole(model)
    total = flat_buffer(model).numel()
    unsharded_adam = sum(b - a for a, b, _ in whole.trainable_runs())
    unsharded_ema = sum(t.numel() for t in whole.pieces(flat_buffer(model), tail=True))
    assert unsharded_ema == total and len(whole.pieces(flat_buffer(model), tail=True)) == 1  # one EMA launch
    for rank in range(world):
        layout = ShardLayout(model, rank, world, 4)
        assert layout.tail is not None and layout.end % (world * 64) == 0
        assert sum(b - a for a, b, _ in layout.trainable_runs()) * world == unsharded_adam
        assert sum(t.numel() for t in layout.pieces(flat_buffer(model), tail=True)) * world == total
        pieces = [layout.piece(k) for k in range(len(layout.chunks))]
        assert all(a < b for a, b in pieces) and all(b <= layout.end for _, b in pieces)
    # the same parameters lie at the same offsets whatever the world size
    other = flatten_for_training(build_model(cfg), cfg, 1)
    assert [span(p) for p in other.parameters() if p.requires_grad] == \
        [span(p) for p in model.parameters() if p.requires_grad]


def test_a_dropped_reducer_frees_its_buffers(one_rank_group):
    """The reducer's hooks live on the parameters' C++ side, out of the garbage collector's sight:
    a hook holding the reducer kept every buffer of a finished step alive (bench/traffic.py
    counting twelve steps in one process ran out of memory)."""
    import gc
    import weakref

    cfg = tiny()
    model = flatten_for_training(build_model(cfg), cfg)
    grads = FlatGradients(model)
    reducer = GradReducer(grads)
    reducer.arm()
    probe_loss(cfg, CPU)(model).backward()
    reducer.finish()
    buffer, weights = weakref.ref(grads.buffer), weakref.ref(next(model.parameters()))
    del model, grads, reducer
    gc.collect()
    assert buffer() is None and weights() is None

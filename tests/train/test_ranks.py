"""Several ranks (gloo, launched as torchrun launches srdit.train) against one rank: srdit's own
gradient reduction (srdit.train.reduce) over flat gradients (srdit.train.flat), with and without
the graphed step, fp32 and bf16, and against torch's DDP.

Why bit for bit holds where it is asked: 2 ranks seed their backward with 1/2 and sum, one rank
with 2 micro-batches seeds each with 1/2 and accumulates: both compute g1/2 + g2/2 (scaling by a
power of two is exact, addition commutes). With 4 ranks the sum's association differs from the
accumulation's ((g1+g2)+(g3+g4) against ((g1+g2)+g3)+g4, each term /4), so the results agree to
fp32 rounding of the gradients, which AdamW's normalised update carries into the weights at the
lr's scale: FOUR_RANKS_TOL below.

All launches run once per module (each costs a few seconds of torch imports per process) and in
parallel; every rank runs with one thread, as does the one-rank reference (CPU reductions split
by thread count).
"""
import pytest
import torch
from ranks import assert_state_equal, launch
# the reduction alone, unsharded (issue 23's sharded update: test_sharding.py)
ONE_ACCUM2, ONE_ACCUM4 = "train:2:0:fp32:shard=false", "train:4:0:fp32:shard=false"
PLAIN, GRAPHED, BF16 = "train:1:0:fp32:shard=false", "train:1:1:fp32:shard=false", "train:1:0:bf16:shard=false"
LAUNCHES = {  # name: (ranks, scenarios: rank_worker.py)
    "one": (1, [ONE_ACCUM2, ONE_ACCUM4]),
    "two": (2, [PLAIN, GRAPHED, BF16, "ddp:fp32", "ddp:bf16"]),
    "four": (4, [PLAIN, "ddp:fp32"]),
}
# 4 steps at the quickstart's lr 3e-3: weights move by ~lr per step, and a difference of fp32
# rounding in a gradient changes an Adam update by far less than that
FOUR_RANKS_TOL = dict(rtol=1e-4, atol=1e-5)
BF16_UNIT = 2.0 ** -8  # bf16 keeps 8 significant bits: a rounding moves a value by at most 2^-8 of it


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return launch(LAUNCHES, tmp_path_factory)


def test_two_ranks_equal_one_rank_with_two_accumulation_steps_bit_for_bit(runs):
    one, (r0, r1) = runs["one"][0][ONE_ACCUM2], [r[PLAIN] for r in runs["two"]]
    assert set(one["coins"]) == {False, True}  # both path-drop branches were taken
    for rank in (r0, r1):
        assert_state_equal(rank, one)
        for a, b in zip(rank["values"], one["values"], strict=True):
            for k in ("loss", "grad_norm", "skipped"):
                assert torch.equal(a[k], b[k]), k


def test_four_ranks_equal_one_rank_with_four_accumulation_steps_to_rounding(runs):
    one = runs["one"][0][ONE_ACCUM4]
    for rank in runs["four"]:
        rank = rank[PLAIN]
        assert_state_equal(rank, one, **FOUR_RANKS_TOL)
        for a, b in zip(rank["values"], one["values"], strict=True):
            torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=0)
            torch.testing.assert_close(a["grad_norm"], b["grad_norm"], rtol=1e-5, atol=0)


def test_the_graphed_step_on_two_ranks_equals_the_plain_one_through_both_branches(runs):
    for rank in runs["two"]:
        plain, graphed = rank[PLAIN], rank[GRAPHED]
        assert set(graphed["coins"]) == {False, True}
        assert_state_equal(graphed, plain)
        for a, b in zip(graphed["values"], plain["values"], strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_rank_issues_the_same_collectives_and_draws_the_same_coins(runs):
    for name in ("two", "four"):
        for spec in runs[name][0]:
            if not spec.startswith("train"):
                continue
            first = runs[name][0][spec]
            assert any(call[0] == "all_reduce" for call in first["collectives"])
            for other in runs[name][1:]:
                assert other[spec]["collectives"] == first["collectives"], (name, spec)
                assert other[spec]["coins"] == first["coins"], (name, spec)
                assert other[spec]["launch_order"] == first["launch_order"], (name, spec)


def test_gradients_stay_at_the_flat_buffers_addresses_across_steps(runs):
    for spec in (PLAIN, GRAPHED):
        rank = runs["two"][0][spec]
        assert all(step == rank["views"] for step in rank["addresses"])


def test_the_reduction_is_ddps_bit_for_bit_at_two_ranks_and_to_rounding_at_four(runs):
    """Two terms sum alike in any collective; with four, gloo and NCCL associate the sum by where an
    element sits in the buffer they reduce (segments of a ring or of halving-doubling), and DDP's
    buckets are not srdit's chunks: the same terms, summed in another order."""
    for name, tol in (("two", dict(rtol=0, atol=0)), ("four", dict(rtol=1e-6, atol=1e-9))):
        for rank in runs[name]:
            result = rank["ddp:fp32"]
            assert result["flat_params"] and result["ours"].keys() == result["ddp"].keys()
            for k in result["ours"]:
                torch.testing.assert_close(result["ours"][k], result["ddp"][k], **tol, msg=lambda m: f"{name} {k}: {m}")


def test_the_bf16_reduction_is_within_its_stated_bound(runs):
    """|bf16 sum - exact sum| <= 2^-8 sum_r |g_r| per element (srdit/train/reduce.py derives it;
    second-order terms get 2^-6 of slack), and it is not the fp32 sum: the dtype took effect."""
    own = torch.stack([r["ddp:bf16"]["own"] for r in runs["two"]]).double()  # each rank's undivided gradient
    exact = own.sum(0) / len(own)
    bound = BF16_UNIT * own.abs().sum(0) * (1 + 2.0 ** -6)
    for rank in runs["two"]:
        bf16, fp32 = rank["ddp:bf16"]["reduced"], rank["ddp:fp32"]["reduced"]
        assert not torch.equal(bf16, fp32)
        error = (bf16.double() - exact).abs()
        assert (error <= bound).all(), (error - bound).max()


def test_two_bf16_ranks_stay_close_to_fp32(runs):
    for rank in runs["two"]:
        a, b = rank[BF16], rank[PLAIN]
        for x, y in zip(a["values"], b["values"]):
            torch.testing.assert_close(x["loss"], y["loss"], rtol=1e-2, atol=0)
        assert_state_equal(a, b, rtol=5e-2, atol=5e-3)

"""Each rank updates 1/world of the weights (train.shard_optimizer; srdit.train.flat.ShardLayout,
the reducer's reduce-scatter, the sharded AdamW and EMA, the gather of the weights behind the
teacher), on gloo ranks launched as torchrun launches srdit.train (rank_worker.py).

What is equal bit for bit, and why. The update is elementwise: given the same summed gradients
and the same clip coefficient, AdamW and the EMA give the same bits on a piece as on the whole.
At 2 ranks a reduce-scatter sums the same two terms as an all-reduce (a + b), so sharded equals
unsharded bit for bit when the clip is inactive (train.grad_clip huge: its coefficient is then
exactly 1). With the clip active the coefficient comes from the norm summed in another order
(shards, then ranks): equal to fp32 rounding, and the weights with it. A checkpoint holds whole
tensors (gathered), the same format sharded or not, so it resumes at any world size: bit for bit
where the summed gradients are (the same world size, or 2 ranks to 1 rank with 2 micro-batches:
g1/2 + g2/2 either way); from 4 ranks to 2 or 1 the same micro-batches' gradients are summed in
another association (floating-point addition is not associative), so to fp32 rounding.

train.reduce_order=fixed (srdit.train.fixed_sum) sums in one pairwise tree over the global
batch's micro-batches, and the norm in one tree over fixed tiles, whatever the split: 4 ranks x
1, 2 x 2 (sharded or not) and 1 x 4 then take the same steps bit for bit with the clip active,
and a 4-rank checkpoint resumes on 2 and on 1 bit for bit.
"""
import pytest
import torch
from ranks import assert_state_equal, launch

OFF = "clip=1e9"  # the clip's coefficient exactly 1: the update is elementwise end to end
S2, U2 = f"train:1:0:fp32:shard=true:{OFF}:save=ckpt2.pt@2", f"train:1:0:fp32:shard=false:{OFF}"
S2_GRAPHED, S2_BF16 = f"train:1:1:fp32:shard=true:{OFF}", f"train:1:0:bf16:shard=true:{OFF}"
S2_CLIP, U2_CLIP = "train:1:0:fp32:shard=auto:clip=0.3", "train:1:0:fp32:shard=false:clip=0.3"  # norms 0.47-0.73
S4, U4 = f"train:1:0:fp32:shard=true:{OFF}:save=ckpt4.pt@2", f"train:1:0:fp32:shard=false:{OFF}"
FIXED = "fp32:clip=0.3:order=fixed"  # the clip active at every step (norms 0.47-0.73)
F4 = f"train:1:0:{FIXED}:shard=true:save=fixed4.pt@2"
F2, F2_UNSHARDED, F2_GRAPHED = (f"train:2:0:{FIXED}:shard=true", f"train:2:0:{FIXED}:shard=false",
                                f"train:2:1:{FIXED}:shard=true")
F1 = f"train:4:0:{FIXED}"
FIRST = {"two": (2, [S2, U2, S2_GRAPHED, S2_BF16, S2_CLIP, U2_CLIP, F2, F2_UNSHARDED, F2_GRAPHED]),
         "four": (4, [S4, U4, F4]), "one": (1, [F1])}
# the step's clip coefficient: a norm of the same gradients summed in another order
CLIP_TOL = dict(rtol=1e-5, atol=1e-6)
FOUR_RANKS_TOL = dict(rtol=1e-4, atol=1e-5)  # as test_ranks.py: another association of the same sums


FOLDERS = {}  # the first wave's folders, where its checkpoints are


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    return launch(FIRST, tmp_path_factory, FOLDERS)


@pytest.fixture(scope="module")
def resumed(first, tmp_path_factory):
    ckpt4, ckpt2, fixed4 = FOLDERS["four"] / "ckpt4.pt", FOLDERS["two"] / "ckpt2.pt", FOLDERS["four"] / "fixed4.pt"
    assert ckpt4.exists() and ckpt2.exists() and fixed4.exists()
    rest, fixed = f"{OFF}:start=2:steps=2", f"{FIXED}:load={fixed4}:start=2:steps=2"
    return launch({
        "on4": (4, [f"train:1:0:fp32:shard=true:load={ckpt4}:{rest}", f"train:1:0:{fixed}:shard=true"]),
        "on2": (2, [f"train:2:0:fp32:shard=true:load={ckpt4}:{rest}", f"train:2:0:{fixed}:shard=true"]),
        "on1": (1, [f"train:4:0:fp32:load={ckpt4}:{rest}", f"train:2:0:fp32:load={ckpt2}:{rest}",
                    f"train:4:0:{fixed}"]),
    }, tmp_path_factory)


def test_the_sharded_path_ran_and_every_rank_issued_the_same_collectives(first):
    for name, spec in (("two", S2), ("four", S4)):
        calls = first[name][0][spec]["collectives"]
        assert first[name][0][spec]["sharded"] and not first[name][0][U2 if name == "two" else U4]["sharded"]
        names = {c[0] for c in calls}
        assert names & {"reduce_scatter_single", "reduce_scatter_tensor"}, names
        assert names & {"all_gather_single", "all_gather_into_tensor"}, names
        for other in first[name][1:]:
            assert other[spec]["collectives"] == calls and other[spec]["coins"] == first[name][0][spec]["coins"]
        assert set(first[name][0][spec]["coins"]) == {False, True}  # both path-drop branches


def test_sharded_equals_unsharded_bit_for_bit_at_two_ranks_with_the_clip_inactive(first):
    for rank in first["two"]:
        sharded, unsharded = rank[S2], rank[U2]
        assert_state_equal(sharded, unsharded)
        for a, b in zip(sharded["values"], unsharded["values"], strict=True):
            assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["skipped"], b["skipped"])
            torch.testing.assert_close(a["grad_norm"], b["grad_norm"], **CLIP_TOL)


def test_with_the_clip_active_sharded_follows_unsharded_to_the_coefficients_rounding(first):
    for rank in first["two"]:
        sharded, unsharded = rank[S2_CLIP], rank[U2_CLIP]
        norms = [v["grad_norm"].item() for v in unsharded["values"]]
        assert min(norms) > 0.3, norms  # the clip acted at every step
        for a, b in zip(sharded["values"], unsharded["values"], strict=True):
            torch.testing.assert_close(a["grad_norm"], b["grad_norm"], **CLIP_TOL)
        assert_state_equal(sharded, unsharded, **FOUR_RANKS_TOL)


def test_at_four_ranks_sharded_follows_unsharded_to_the_sums_association(first):
    for rank in first["four"]:
        assert_state_equal(rank[S4], rank[U4], **FOUR_RANKS_TOL)


def test_the_graphed_sharded_step_equals_the_plain_sharded_one(first):
    for rank in first["two"]:
        assert_state_equal(rank[S2_GRAPHED], rank[S2])
        for a, b in zip(rank[S2_GRAPHED]["values"], rank[S2]["values"], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_sharded_reduction_stays_close(first):
    for rank in first["two"]:
        for a, b in zip(rank[S2_BF16]["values"], rank[S2]["values"], strict=True):
            torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-2, atol=0)
        assert_state_equal(rank[S2_BF16], rank[S2], rtol=5e-2, atol=5e-3)


def test_a_four_rank_checkpoint_resumes_on_four_bit_for_bit(first, resumed):
    straight = first["four"][0][S4]
    for rank in resumed["on4"]:
        run = next(v for k, v in rank.items() if "ckpt4" in k)
        assert_state_equal(run, straight)
        assert [v["loss"] for v in run["values"]] == [v["loss"] for v in straight["values"][2:]]


def test_a_four_rank_checkpoint_resumes_on_two_and_one_with_the_same_micro_batch(first, resumed):
    straight = first["four"][0][S4]
    for runs in (resumed["on2"], resumed["on1"][:1]):
        run = next(v for k, v in runs[0].items() if "ckpt4" in k)
        assert_state_equal(run, straight, **FOUR_RANKS_TOL)
        for a, b in zip(run["values"], straight["values"][2:], strict=True):
            torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=0)


def test_a_two_rank_checkpoint_resumes_on_one_bit_for_bit(first, resumed):
    straight = first["two"][0][S2]
    run = next(v for k, v in resumed["on1"][0].items() if "ckpt2" in k)
    assert_state_equal(run, straight)
    assert [v["loss"] for v in run["values"]] == [v["loss"] for v in straight["values"][2:]]


def test_in_the_fixed_order_every_split_of_the_batch_takes_the_same_steps_bit_for_bit(first):
    """4 ranks x 1 micro-batch, 2 x 2 (sharded, unsharded, graphed) and 1 x 4, the clip active."""
    straight = first["four"][0][F4]
    norms = [v["grad_norm"].item() for v in straight["values"]]
    assert min(norms) > 0.3, norms  # the clip acted at every step
    names = {c[0] for c in straight["collectives"]}
    assert "all_to_all_single" in names and not names & {"reduce_scatter_single", "reduce_scatter_tensor"}, names
    runs = [rank[F4] for rank in first["four"]] + [rank[spec] for rank in first["two"]
                                                   for spec in (F2, F2_UNSHARDED, F2_GRAPHED)] + [first["one"][0][F1]]
    for run in runs:
        assert_state_equal(run, straight)
        for a, b in zip(run["values"], straight["values"], strict=True):
            assert torch.equal(a["grad_norm"], b["grad_norm"]) and torch.equal(a["skipped"], b["skipped"])
            torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=0)  # the log's mean over ranks


def test_in_the_fixed_order_a_four_rank_checkpoint_resumes_on_four_two_and_one_bit_for_bit(first, resumed):
    straight = first["four"][0][F4]
    for name in ("on4", "on2", "on1"):
        for rank in resumed[name]:
            run = next(v for k, v in rank.items() if "fixed4" in k)
            assert_state_equal(run, straight)
            for a, b in zip(run["values"], straight["values"][2:], strict=True):
                assert torch.equal(a["grad_norm"], b["grad_norm"])
    # the library's order does not give that: the same resume on one rank differs in its bits
    library = next(v for k, v in resumed["on1"][0].items() if "ckpt4" in k)
    assert any(not torch.equal(library["model"][k], first["four"][0][S4]["model"][k]) for k in library["model"])

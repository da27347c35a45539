"""bench/traffic.py counts what a GPU step would move and launch, on the CPU: its counting rules
against closed forms, the fused ops' docstring formulas against the counter, the scaling from
small batches against a direct count, CUDA's autocast policy on the CPU, and the CLI at the
quickstart preset. The counter intercepts compiled Triton launches, so its checks run in
subprocesses without TRITON_INTERPRET (tests/bench/traffic_checks.py)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bench.cuda_autocast import CUDA_POLICY, cuda_autocast_on_cpu, differing_ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SRDIT_LAUNCH")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return result.stdout


@pytest.fixture(scope="module")
def checks():
    stdout = run_python(os.path.join(ROOT, "tests", "bench", "traffic_checks.py"))
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [
    "add", "views_free", "mm", "copy_", "in_place", "broadcast_read_once", "foreach_fast", "foreach_per_tensor",
    "foreach_norm", "launches_closed_form", "split_launch_at_the_counted_batch", "split_launch_saturates",
    "no_tensor_no_launch"])
def test_counting_rules(checks, name):
    counted, expected = checks[name]
    assert counted == expected


@pytest.mark.parametrize("name", [
    "rmsnorm_modulate_fwd", "residual_rmsnorm_modulate_fwd", "residual_rmsnorm_modulate_fwd_autocast", "apply_rope_fwd",
    "apply_rope_bwd", "gather_tokens_fwd", "gather_tokens_bwd", "attention_prologue_fwd", "layer_norm_fwd",
    "residual_layer_norm_fwd", "linear_gelu_fwd", "gelu_mlp_fwd_gemm", "gelu_mlp_bwd_gemm", "gelu_mlp_gemm_flops",
    "repa_cosine_fwd", "repa_cosine_bwd"])
def test_fused_ops_count_their_docstring_formula(checks, name):
    counted, formula = checks[name]
    assert counted == formula


SCALING = """
import json
from bench import traffic
out = {}
for variant in ("eager", "kernels"):
    direct = traffic.count_step("quickstart", variant, 6)
    scaled = traffic.extrapolate({b: traffic.count_step("quickstart", variant, b, launch_batch=6) for b in (2, 4)}, 6)
    out[variant] = [[o.phase, o.name, o.launches, o.bytes, o.flops] for o in direct], \\
                   [[o.phase, o.name, o.launches, o.bytes, o.flops] for o in scaled]
print(json.dumps(out))
"""


def test_counts_scale_linearly_in_the_batch():
    """Every op's bytes and FLOPs at batch 6 lie on the line through batches 2 and 4 (what lets
    the counter run small and report batch 256), and the ops launched do not change."""
    out = json.loads(run_python("-c", SCALING).strip().splitlines()[-1])
    for variant, (direct, scaled) in out.items():
        assert [o[:3] for o in direct] == [o[:3] for o in scaled], variant
        for d, s in zip(direct, scaled):
            assert d[3] == pytest.approx(s[3], rel=1e-9, abs=1e-6), (variant, d, s)
            assert d[4] == pytest.approx(s[4], rel=1e-9, abs=1e-6), (variant, d, s)


def test_cli_at_the_quickstart_preset(tmp_path):
    out = tmp_path / "traffic.json"
    stdout = run_python(os.path.join(ROOT, "bench", "traffic.py"), "--preset", "quickstart", "--batch", "64",
                        "--variants", "eager", "kernels", "--top", "5", "--json", str(out))
    assert "a count and a model, not a measurement" in stdout and "datasheet" in stdout
    data = json.loads(out.read_text())
    assert data["kind"].startswith("count") and data["batch"] == 64
    rows = {v["variant"]: v for v in data["variants"]}
    for row in rows.values():
        assert set(row["phases"]) >= {"teacher", "forward", "loss", "backward", "clip", "optimizer", "ema"}
        assert row["launches"] == sum(p["launches"] for p in row["phases"].values())
        assert len(row["top"]) == 5 and row["model_ms"] > 0 and row["flops"] > 0
    assert rows["kernels"]["bytes_per_image"] < rows["eager"]["bytes_per_image"]
    assert rows["kernels"]["launches"] < rows["eager"]["launches"]
    # gpu_check.sh's traffic_gpu.json (with --measure on a GPU) feeds its own RESULTS.md table
    gpu_check = tmp_path / "gpu_check"
    gpu_check.mkdir()
    shutil.copyfile(out, gpu_check / "traffic_gpu.json")
    results = tmp_path / "RESULTS.md"
    shutil.copyfile(os.path.join(ROOT, "bench", "RESULTS.md"), results)
    run_python(os.path.join(ROOT, "bench", "record.py"), str(gpu_check), "--results", str(results), "--store",
               str(tmp_path / "store"), "--allow-cpu")
    table = results.read_text().split("## Counted vs measured")[1].split("\n## ")[0]
    phases = [p for p, r in rows["kernels"]["phases"].items() if r["launches"]]
    assert table.count("| kernels |") == len(phases) and "No GPU measurement yet" not in table


def test_cuda_autocast_places_every_op_whose_policy_differs():
    cuda_only, _ = differing_ops()
    assert cuda_only <= set(CUDA_POLICY), sorted(cuda_only - set(CUDA_POLICY))


def test_cuda_autocast_on_cpu_gives_cuda_dtypes_and_restores_the_cpu_policy():
    x, w = torch.randn(4, 8).bfloat16(), torch.randn(8, 8)

    def dtypes():
        return {"linear": torch.nn.functional.linear(w, w).dtype, "pow": x.pow(2).dtype, "rsqrt": x.rsqrt().dtype,
                "sum": x.sum(-1).dtype, "softmax": x.softmax(-1).dtype, "exp": x.exp().dtype,
                "normalize": torch.nn.functional.normalize(x, dim=-1).dtype, "mul": (x * x).dtype,
                "cat": torch.cat([x, x]).dtype, "layer_norm": torch.nn.functional.layer_norm(x, (8,)).dtype}

    b16, f32 = torch.bfloat16, torch.float32
    # torch's autocast op reference, "CUDA Ops that can autocast to float32"; elementwise ops and
    # cat keep their inputs' dtype; linear runs in bf16
    cuda = {"linear": b16, "pow": f32, "rsqrt": f32, "sum": f32, "softmax": f32, "exp": f32, "normalize": f32,
            "mul": b16, "cat": b16, "layer_norm": f32}
    with torch.autocast("cpu", dtype=b16):
        cpu = dtypes()
    with cuda_autocast_on_cpu():
        assert dtypes() == cuda
    with torch.autocast("cpu", dtype=b16):
        assert dtypes() == cpu  # the CPU's own policy is back
    assert cpu["pow"] == b16  # the CPU policy does differ: the emulation is needed


OVERLAP = """
import json
from bench import traffic
rates = {"matmul_tflops": 1.0, "copy_gbps": 1.0}  # 1 GB/s: an op of 1e6 bytes takes 1 ms
bwd = lambda: traffic.Op("backward", "mm", 1, 1e6, 0.0)
chunk = lambda: traffic.Op("reduce", "allreduce_", 1, 0.0, 0.0, wire_bytes=3e6)
wait = traffic.Op("reduce", "wait", 0, 0.0, 0.0, wait=True)
ops = [bwd(), chunk(), bwd(), chunk(), wait, traffic.Op("clip", "norm", 1, 1e6, 0.0)]
print(json.dumps(traffic.model_communication(ops, rates, world=4, bus_gbps=3 * 2 * 3 / 4)))
"""


def test_the_reduction_model_overlaps_chunks_with_the_backward_in_closed_form():
    """4 ranks: all_reduce's algorithm bandwidth is bus / (2 (N-1) / N) = 3 GB/s here, so a 3 MB
    chunk takes 1 ms on the wire. Chunk 1 goes out at 1 ms (after the first backward op) and ends
    at 2; chunk 2 at 2 ms, ends at 3; the step waits at 2 (the backward's end): 1 ms exposed, 1 ms
    hidden. Each rank sends 2 (N-1)/N of a chunk with the ring, a chunk with NVLink SHARP."""
    comm = json.loads(run_python("-c", OVERLAP).strip().splitlines()[-1])
    assert [(c["start_ms"], c["end_ms"]) for c in comm["calls"]] == [(1.0, 2.0), (2.0, 3.0)]
    assert comm["exposed_ms"] == pytest.approx(1.0) and comm["overlapped_ms"] == pytest.approx(1.0)
    assert comm["ring_send_mb"] == pytest.approx(2 * 3 * 1.5) and comm["nvls_send_mb"] == pytest.approx(6.0)


def test_world_counts_a_ranks_step_with_its_reduction(tmp_path):
    from srdit.config import preset
    from srdit.model import build_model
    from srdit.train.flat import flatten_for_training, span
    from srdit.train.reduce import CHUNKS

    cfg = preset("quickstart")
    model = flatten_for_training(build_model(cfg), cfg)
    # the reduction stops at the trainable parameters' end: the frozen region never has a gradient
    reduced = max(span(p)[1] for p in model.parameters() if p.requires_grad)
    out = tmp_path / "traffic.json"
    stdout = run_python(os.path.join(ROOT, "bench", "traffic.py"), "--preset", "quickstart", "--batch", "8",
                        "--world", "2", "--variants", "kernels", "--reduce-dtypes", "fp32", "bf16", "--top", "1",
                        "--json", str(out))
    assert "2 ranks: each rank sends" in stdout and "per-rank step" in stdout
    data = json.loads(out.read_text())
    assert data["world"] == 2
    for row, element in zip(data["variants"], (4, 2)):
        comm = row["communication"]
        assert len(comm["calls"]) == CHUNKS and {c["op"] for c in comm["calls"]} == {"allreduce_"}
        assert sum(c["mb"] for c in comm["calls"]) * 1e6 == pytest.approx(reduced * element)
        assert comm["ring_send_mb"] == pytest.approx(comm["nvls_send_mb"])  # 2 (N-1)/N = 1 at N = 2
        assert comm["exposed_ms"] + comm["overlapped_ms"] == pytest.approx(comm["wire_ms"])
        assert row["step_ms"] == pytest.approx(row["model_ms"] + comm["exposed_ms"])
        assert row["run_hours"] == pytest.approx(400_000 * row["step_ms"] / 3.6e6)
        # chunk launches, and with bf16 the copies back, in the reduce phase
        assert row["phases"]["reduce"]["launches"] == CHUNKS * (1 if element == 4 else 2)


def test_shard_counts_a_reduce_scatter_a_gather_and_a_smaller_update(tmp_path):
    """--shard true: the chunks are reduce-scattered and the weights all-gathered (each a chunk's
    whole buffer on the wire, (N-1)/N of it sent), AdamW and the EMA move 1/N of their bytes."""
    out = tmp_path / "traffic.json"
    run_python(os.path.join(ROOT, "bench", "traffic.py"), "--preset", "quickstart", "--batch", "8", "--world", "4",
               "--variants", "kernels", "--shard", "false", "true", "--top", "1", "--json", str(out))
    plain, sharded = json.loads(out.read_text())["variants"]
    assert not plain["sharded"] and sharded["sharded"]
    calls = [c["op"] for c in sharded["communication"]["calls"]]
    assert calls.count("_reduce_scatter_base_") == calls.count("_allgather_base_") > 0
    wire = lambda row, op: sum(c["mb"] for c in row["communication"]["calls"] if c["op"] == op)  # noqa: E731
    # the same buffer, padded for 4 equal aligned pieces (at most 4 x 64 elements more)
    assert 0 <= wire(sharded, "_reduce_scatter_base_") - wire(plain, "allreduce_") <= 4 * 256 / 1e6
    assert wire(sharded, "_allgather_base_") == pytest.approx(wire(sharded, "_reduce_scatter_base_"))
    # the ring moves the same bytes: a reduce-scatter and an all-gather are an all-reduce
    assert sharded["communication"]["ring_send_mb"] == pytest.approx(plain["communication"]["ring_send_mb"], rel=1e-3)
    # each rank's pieces hold an equal share (the frozen pos_embed lies apart, srdit.train.flat):
    # 1/N, but for the few bytes of scalars (step counters, the skip flag) each launch reads
    for phase in ("optimizer", "ema"):
        assert sharded["phases"][phase]["bytes"] == pytest.approx(plain["phases"][phase]["bytes"] / 4, rel=1e-4), phase


def test_the_fixed_order_counts_an_all_to_all_in_place_of_the_reduce_scatter(tmp_path):
    out = tmp_path / "traffic.json"
    run_python(os.path.join(ROOT, "bench", "traffic.py"), "--preset", "quickstart", "--batch", "8", "--world", "4",
               "--variants", "kernels", "--shard", "true", "--reduce-orders", "library", "fixed", "--top", "1",
               "--json", str(out))
    library, fixed = json.loads(out.read_text())["variants"]
    assert (library["reduce_order"], fixed["reduce_order"]) == ("library", "fixed")
    ops = lambda row: [c["op"] for c in row["communication"]["calls"]]  # noqa: E731
    wire = lambda row, op: sum(c["mb"] for c in row["communication"]["calls"] if c["op"] == op)  # noqa: E731
    assert "_reduce_scatter_base_" not in ops(fixed)
    assert ops(fixed).count("alltoall_base_") == ops(library).count("_reduce_scatter_base_") > 0
    assert wire(fixed, "alltoall_base_") == pytest.approx(wire(library, "_reduce_scatter_base_"))
    # the rank adds the pieces itself: more bytes in the reduce phase than the library's none
    assert fixed["phases"]["reduce"]["bytes"] > library["phases"]["reduce"]["bytes"]

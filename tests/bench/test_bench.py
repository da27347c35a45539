"""The benchmarks run on the CPU (their GPU figures come from bench/gpu_check.sh), and the
analytic FLOP count agrees with torch's flop counter."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from srdit.config import apply_overrides, preset
from srdit.model import build_model
from srdit.model.flops import model_flops, teacher_flops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench(script, *args, timeout=300):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], capture_output=True,
                            text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_throughput_runs_on_cpu_and_writes_the_contract_json(tmp_path):
    out = tmp_path / "tp.json"
    stdout = bench("throughput.py", "--preset", "quickstart", "--device", "cpu", "--steps", "3", "--json", str(out))
    assert "images_per_s" in stdout
    data = json.loads(out.read_text())
    for key in ("device_name", "torch", "triton", "commit", "preset", "batch", "matmul_tflops"):
        assert key in data, key
    assert [r["variant"] for r in data["rows"]] == ["eager", "cached-teacher"]
    for row in data["rows"]:
        for key in ("variant", "step_ms", "images_per_s", "model_flops_per_image", "mfu", "peak_mem_gb", "speedup"):
            assert key in row, key
        assert row["step_ms"] > 0 and row["loss"] == row["loss"]


def test_kernel_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "k.json"
    bench("kernels.py", "--device", "cpu", "--batch", "1", "--iters", "2", "--variants", "eager", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"rmsnorm_modulate", "residual_rmsnorm_modulate", "apply_rope",
                                       "attention_prologue", "attention_prologue_routed", "gather_tokens",
                                       "sprint_fuse", "residual_layer_norm", "repa_cosine", "gelu_mlp", "linear_gelu"}
    assert all("ms" in r for r in rows), [r for r in rows if "error" in r]


def _counted(model, *args, **kwargs):
    with FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["sr-dit-b1-256", "reg-invae-b1-256"])
def test_analytic_flops_equal_torch_flop_counter(name):
    # eager attention: torch's flop counter sees its two matmuls (it does not count CPU SDPA)
    cfg = apply_overrides(preset(name), ["model.depth=6" if name.startswith("sr") else "model.depth=5",
                                         "model.attention_backend=eager"])
    model = build_model(cfg).train()
    m = cfg.model
    x = torch.randn(1, m.in_channels, m.input_size, m.input_size)
    args = (x, torch.rand(1), torch.tensor([3]), torch.randn(1, m.teacher_dim))
    ids = torch.randperm(m.num_tokens)[: m.num_kept][None]
    flops = model_flops(m)
    assert _counted(model, *args, keep_ids=ids) == flops.forward
    if m.sprint:
        assert _counted(model, *args, path_drop=True) == flops.forward_path_drop


def test_b1_counts_match_the_issue_figures():
    flops = model_flops(preset("sr-dit-b1-256").model, 0.05)
    assert 80e9 < flops.train < 82e9  # ~81 GFLOP per training image, student fwd + bwd
    assert 46e9 < teacher_flops("vitb14", 224) < 47e9  # ~46 GFLOP per image, DINOv2-B/14 forward


def test_profile_step_writes_a_trace_and_a_top20_table(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "profiling", "profile_step.py"), "--preset",
                             "quickstart", "--steps", "1", "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Self CPU" in result.stdout and "host-device syncs per step" in result.stdout
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"step", "teacher", "forward+loss", "backward", "optimizer", "ema"} <= names

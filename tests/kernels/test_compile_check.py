"""bench/compile_check.py: every Triton kernel a training step (and sampling) launches, with the
GPU's launch settings, compiles ahead of time for sm_90a and sm_100a within the register and
spill budget, at both 256 and 512 px; and what it records stands for the real step.

Compiling needs triton with the interpreter off, so the checks run in a subprocess without
TRITON_INTERPRET (no GPU, no CUDA driver: triton's bundled ptxas). ~1 minute on 2 cores.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = {  # every @triton.jit kernel of srdit/kernels
    "_rmsnorm_modulate_fwd_kernel", "_rmsnorm_modulate_bwd_kernel", "_apply_rope_fwd_kernel", "_apply_rope_bwd_kernel",
    "_attention_prologue_fwd_kernel", "_attention_prologue_bwd_kernel", "_gather_tokens_fwd_kernel",
    "_gather_tokens_bwd_kernel", "_sprint_fuse_fwd_kernel", "_sprint_fuse_bwd_kernel", "_layer_norm_fwd_kernel",
    "_repa_cosine_fwd_kernel", "_repa_cosine_bwd_kernel", "_gemm_act_kernel",
}


def _compiling_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SRDIT_LAUNCH")}
    return {**env, "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")}


def run(*args, code=None, timeout=600):
    command = [sys.executable, "-c", code] if code else [sys.executable, os.path.join(ROOT, "bench", "compile_check.py")]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=_compiling_env(),
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return result.stdout


def test_every_kernel_compiles_within_budget(tmp_path):
    """Both presets, fp32 and bf16 autocast, routed and path-drop steps, the sampler, both targets:
    every specialisation compiles, spills nothing, uses <= 128 registers (>= 16 warps per SM; the
    MLP's GEMM <= 255 and 8 warps).
    Recorded at depth 5, which has every block kind (test below)."""
    out = tmp_path / "compile_check.json"
    stdout = run("--depth", "5", "--check", "--json", str(out))
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["presets"] == ["sr-dit-b1-256", "sr-dit-b1-512"] and data["precisions"] == ["fp32", "bf16"]
    assert {r["kernel"] for r in rows} == KERNELS, stdout
    for target in ("sm_90a", "sm_100a"):
        assert {r["kernel"] for r in rows if r["target"] == target} == KERNELS, target
    over = [f"{r['kernel']} {r['target']} {r['constexprs']}: {r['over_budget']}" for r in rows if r["over_budget"]]
    assert not over, "\n".join(over)
    rows_kernels = [r for r in rows if r["kernel"] != "_gemm_act_kernel"]
    assert all(r["registers"] <= 128 and r["spills"] == 0 and r["warps_per_sm"] >= 16 for r in rows_kernels)
    # the GEMM (mlp.py): compute-bound, one 8-warp program per SM, no spills
    assert all(r["registers"] <= 255 and r["spills"] == 0 and r["warps_per_sm"] >= 8
               for r in rows if r["kernel"] == "_gemm_act_kernel")
    # the 512-px step was recorded too: its routed blocks keep 256 tokens (BLOCK_K of the slot search)
    assert {c for r in rows if r["kernel"] == "_sprint_fuse_bwd_kernel" for c in r["constexprs"].split()
            if c.startswith("BLOCK_K")} == {"BLOCK_K=64", "BLOCK_K=256"}
    # bf16 autocast reached the kernels: bf16 activations next to the fp32 residual stream
    assert any("b" in r["pointers"] and "f" in r["pointers"] for r in rows if "RESIDUAL" in r["constexprs"])
    # and the online teacher's norms: fp32 stream, bf16 GEMM input and output
    teacher_norms = [r["pointers"] for r in rows if r["kernel"] == "_layer_norm_fwd_kernel"]
    assert any("b" in p and "f" in p for p in teacher_norms), teacher_norms


RECORD = """
import json
from bench import compile_check as cc

def keys(part, precisions, depth=None, batch=2, extra=()):
    recorder = cc.Recorder(["sm_90a"])
    part(recorder, cc._config("quickstart", batch, depth, extra), batch, precisions)
    return sorted(repr((s.kernel, s.signature, s.constexprs, s.attrs, s.options)) for s in recorder.launches)

both = ["fp32", "bf16"]
print(json.dumps({
    "step": keys(cc.record_training, both), "step_depth5": keys(cc.record_training, both, depth=5),
    "step_fp32": keys(cc.record_training, ["fp32"]), "step_fp32_batch3": keys(cc.record_training, ["fp32"], batch=3),
    "step_fp32_cached_teacher": keys(cc.record_training, ["fp32"], extra=["data.cached_teacher=true"]),
    "sampling": keys(cc.record_sampling, both), "sampling_depth5": keys(cc.record_sampling, both, depth=5),
}))
"""


def test_what_is_recorded_stands_for_the_real_step():
    """At the quickstart preset (the same model kinds, small): a 5-block model launches the very
    specialisations of the full 6-block one (block 0, dense and routed blocks are all there); a
    batch of 3 those of a batch of 2 (nothing specialises on the batch; a batch of 1 would: an
    expanded [1, N] id row has no stride 0); the step with the online DINOv2 teacher (recorded)
    those of the cached-teacher step and the teacher's LayerNorms and fc1 + GELU, but for the REPA cosine, which
    reads the targets as stored: fp32 online, fp16 cached (bench/compile_check.py --extra
    data.cached_teacher=true compiles those). Sampling compiles nothing the step does not."""
    specs = json.loads(run(code=RECORD).strip().splitlines()[-1])
    assert specs["step"] and specs["sampling"], "nothing recorded"
    assert specs["step_depth5"] == specs["step"] and specs["sampling_depth5"] == specs["sampling"]
    assert specs["step_fp32_batch3"] == specs["step_fp32"]
    teacher_only = set(specs["step_fp32"]) - set(specs["step_fp32_cached_teacher"])
    cached_only = set(specs["step_fp32_cached_teacher"]) - set(specs["step_fp32"])
    repa = {"_repa_cosine_fwd_kernel", "_repa_cosine_bwd_kernel"}
    assert {s.split("'")[1] for s in cached_only} == repa, cached_only  # a spec is repr((kernel, ...))
    teacher = {"_layer_norm_fwd_kernel", "_gemm_act_kernel"}  # its norms, its fc1 + exact GELU
    assert {s.split("'")[1] for s in teacher_only} == repa | teacher, teacher_only
    assert set(specs["sampling"]) <= set(specs["step"])


def test_tiles_option_sets_a_gemm_candidate(tmp_path):
    """--tiles takes a GEMM candidate as BMxBNxBK:WARPS:STAGES (bench/kernels.py's GEMM_SWEEP), and
    names the format when it is wrong."""
    out = tmp_path / "recorded.json"
    run("--preset", "sr-dit-b1-256", "--depth", "5", "--step-only", "--precision", "bf16", "--record-only",
        "--tiles", "gemm_act_bwd=64x128x32:4:4", "--json", str(out))
    gemm = [r for r in json.loads(out.read_text())["rows"] if r["kernel"] == "_gemm_act_kernel"]
    backward = [r for r in gemm if "BACKWARD" in r["constexprs"]]
    assert backward and all("BLOCK_M=64 BLOCK_N=128 BLOCK_K=32" in r["constexprs"] and r["num_warps"] == 4
                            for r in backward), backward
    assert all("BLOCK_M=128" in r["constexprs"] for r in gemm if r not in backward)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_check.py"), "--record-only",
                             "--tiles", "gemm_act_fwd=128x128"], capture_output=True, text=True, env=_compiling_env(),
                            cwd=ROOT)
    assert result.returncode == 2 and "BMxBNxBK:WARPS:STAGES" in result.stderr

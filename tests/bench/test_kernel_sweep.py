"""bench/kernels.py --sweep: its candidate launch settings cover every kernel of GPU_TILES, each
list led by the default the kernels use until a GPU sweep is recorded; the sweep runs (on the CPU
under the interpreter, where its times mean nothing) and bench/record.py files its rows; and
bench/gpu_check.sh, which runs it, still fits one device call."""
import json
import os
import re
import shutil

from test_bench import ROOT, bench

from srdit.kernels.triton_utils import GEMM_TILES, GPU_TILES


def _kernels_bench():
    from bench import kernels

    return kernels


def test_candidates_cover_every_kernel_and_start_with_the_default():
    kernels = _kernels_bench()
    assert set(kernels.SWEEP) == set(GPU_TILES) == set(kernels.SWEPT_BY)
    for name, candidates in kernels.SWEEP.items():
        assert candidates[0] == GPU_TILES[name], name
        assert len(set(candidates)) == len(candidates), name
        for tile in candidates:
            assert tile.elements & (tile.elements - 1) == 0 and tile.warps in (4, 8), (name, tile)
        assert kernels.SWEPT_BY[name] in kernels.CASES, name


def test_gemm_candidates_cover_every_bf16_gemm_and_start_with_the_default():
    kernels = _kernels_bench()
    assert set(kernels.GEMM_SWEEP) == {k for k in GEMM_TILES if not k.endswith("_exact")} == set(kernels.GEMM_SWEPT_BY)
    for name, candidates in kernels.GEMM_SWEEP.items():
        assert candidates[0] == GEMM_TILES[name] and len(set(candidates)) == len(candidates), name
        for tile in candidates:  # tl.dot's and wgmma's shapes: powers of two, >= 16; a warpgroup is 4 warps
            assert all(v >= 16 and v & (v - 1) == 0 for v in (tile.block_m, tile.block_n, tile.block_k)), tile
            assert tile.warps in (4, 8) and tile.stages >= 1, tile
        assert kernels.GEMM_SWEPT_BY[name] in kernels.CASES, name


def test_sweep_runs_on_cpu_and_is_recorded(tmp_path):
    out = tmp_path / "gpu_check"
    out.mkdir()
    bench("kernels.py", "--device", "cpu", "--batch", "1", "--iters", "1", "--variants", "eager", "--ops",
          "gather_tokens", "--sweep", "--json", str(out / "kernels.json"))
    rows = json.loads((out / "kernels.json").read_text())["sweep"]
    assert [(r["elements"], r["warps"]) for r in rows] == [(t.elements, t.warps) for t in _kernels_bench().SWEEP[
        "gather_tokens"]]
    assert all("ms" in r for r in rows) and sum(r["default"] for r in rows) == 1
    # gpu_check.sh's kernels_before.json (an older commit's run) feeds the kernel table only
    shutil.copyfile(out / "kernels.json", out / "kernels_before.json")
    results = tmp_path / "RESULTS.md"
    shutil.copyfile(os.path.join(ROOT, "bench", "RESULTS.md"), results)
    bench("record.py", str(out), "--results", str(results), "--store", str(tmp_path / "store"), "--allow-cpu")
    text = results.read_text()
    sweep = text.split("## Launch settings (`bench/kernels.py --sweep`)")[1].split("\n## ")[0]
    assert sweep.count("| gather_tokens |") == len(rows) and "No GPU measurement yet" not in sweep
    kernels = text.split("## Kernels (`bench/kernels.py`)")[1].split("\n## ")[0]
    assert kernels.count("[kernels_before]") == kernels.count("[kernels]") == 1
    peaks = text.split("## Measured peaks (denominators)")[1].split("\n## ")[0]
    assert "[kernels]" in peaks and "[kernels_before]" not in peaks


def test_gpu_check_fits_one_device_call():
    """Its steps' timeouts add up to <= 500 s (one device call is 10 minutes, the machine's start
    and a rerun need the rest of a lease) and it leaves <= 8 files (what a call brings back)."""
    script = open(os.path.join(ROOT, "bench", "gpu_check.sh")).read()
    timeouts = [int(t) for t in re.findall(r"^run [\w-]+ (\d+) ", script, flags=re.M)]
    assert len(timeouts) >= 8 and sum(timeouts) <= 500, timeouts
    files = set(re.findall(r"\$OUT/([\w.]+)", script)) | {"log.txt"}
    assert len(files) <= 8, files

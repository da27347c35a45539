"""bench/kernels.py --sweep: its candidate launch settings cover every kernel of GPU_TILES, each
list led by the default the kernels use until a GPU sweep is recorded, and the sweep runs (on the
CPU under the interpreter, where its times mean nothing)."""
import importlib.util
import json
import os
import sys

from test_bench import ROOT, bench

from srdit.kernels.triton_utils import GPU_TILES


def _kernels_bench():
    if os.path.join(ROOT, "bench") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "bench"))  # its `import common`, as when run as a script
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "bench", "kernels.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_candidates_cover_every_kernel_and_start_with_the_default():
    kernels = _kernels_bench()
    assert set(kernels.SWEEP) == set(GPU_TILES) == set(kernels.SWEPT_BY)
    for name, candidates in kernels.SWEEP.items():
        assert candidates[0] == GPU_TILES[name], name
        assert len(set(candidates)) == len(candidates), name
        for tile in candidates:
            assert tile.elements & (tile.elements - 1) == 0 and tile.warps in (4, 8), (name, tile)
        assert kernels.SWEPT_BY[name] in kernels.CASES, name


def test_sweep_runs_on_cpu(tmp_path):
    out = tmp_path / "k.json"
    bench("kernels.py", "--device", "cpu", "--batch", "1", "--iters", "1", "--variants", "eager", "--ops",
          "gather_tokens", "--sweep", "--json", str(out))
    rows = json.loads(out.read_text())["sweep"]
    assert [(r["elements"], r["warps"]) for r in rows] == [(t.elements, t.warps) for t in _kernels_bench().SWEEP[
        "gather_tokens"]]
    assert all("ms" in r for r in rows) and sum(r["default"] for r in rows) == 1

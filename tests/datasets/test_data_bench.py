"""bench/data.py runs on the CPU and writes its JSON (its GPU figures come from a GPU run)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_data_bench_runs_on_cpu_and_writes_json(tmp_path):
    out = tmp_path / "data.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "data.py"), "--device", "cpu", "--samples", "24",
                             "--resolution", "64", "--batch", "8", "--steps", "2", "--warmup", "1", "--repeats", "1",
                             "--workers", "1", "--backends", "global", "torch", "torch-nvjpeg", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    for key in ("device_name", "torch", "commit", "rows", "targets_samples_per_s"):
        assert key in data, key
    rows = {(r["config"], r["backend"]): r for r in data["rows"]}
    assert set(rows) == {(c, b) for c in ("cached", "images") for b in ("global", "torch", "torch-nvjpeg")}
    for (config, backend), row in rows.items():
        if backend == "torch-nvjpeg":
            assert "needs a CUDA device" in row["error"]
        else:
            assert row["samples_per_s"] > 0 and row["bytes_per_sample"] > 32 * 4 * 4 * 4, row

"""bench/sample.py runs on the CPU and writes its JSON (its GPU figures come from a GPU run)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sample_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "sample.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sample.py"), "--device", "cpu",
                             "--nfe", "2", "3", "--batch", "4", "--iters", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data["preset"] == "quickstart" and data["sample_gflop_per_nfe"] > 0
    rows = data["rows"]
    assert [(r["stage"], r.get("nfe")) for r in rows] == [("sample", 2), ("sample", 3), ("inception", None)]
    assert all(r["samples_per_s"] > 0 and "error" not in r for r in rows)
    assert data["projection_50k"]["fp32"]["nfe"] == 3 and data["projection_50k"]["fp32"]["hours"] > 0

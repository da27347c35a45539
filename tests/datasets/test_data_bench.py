"""bench/data.py runs on the CPU and writes its JSON (its GPU figures come from a GPU run): the
per-core decode table for every format and decoder, and the loaders over every configuration."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_data_bench_runs_on_cpu_and_writes_json(tmp_path):
    out = tmp_path / "data.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "data.py"), "--device", "cpu", "--samples", "24",
                             "--resolution", "64", "--batch", "8", "--steps", "2", "--warmup", "1", "--repeats", "1",
                             "--workers", "1", "--backends", "global", "torch", "torch-nvjpeg", "--decode-images", "6",
                             "--json", str(out)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    for key in ("device_name", "torch", "commit", "rows", "targets_samples_per_s", "decode", "decode_images"):
        assert key in data, key
    rows = {(r["config"], r["backend"]): r for r in data["rows"]}
    assert set(rows) == {(c, b) for c in ("cached", "raw", "png", "jpeg") for b in ("global", "torch", "torch-nvjpeg")}
    for (config, backend), row in rows.items():
        if backend == "torch-nvjpeg":
            assert "needs a CUDA device" in row["error"]
        else:
            assert row["samples_per_s"] > 0 and row["bytes_per_sample"] > 32 * 4 * 4 * 4, row
    assert rows["raw", "global"]["bytes_per_sample"] > 3 * 64 * 64 + 32 * 4 * 4 * 4  # the crop as it is
    decode = {(r["format"], r["decoder"]): r for r in data["decode"]}
    assert set(decode) == {("raw", "none"), *((f, d) for f in ("png", "png-stored", "jpeg") for d in ("pil", "torchvision"))}
    assert all(r["images_per_s"] > 0 and r["exact"] == (r["format"] != "jpeg") for r in decode.values()), decode
    assert decode["raw", "none"]["bytes_per_image"] == 3 * 64 * 64
    assert decode["jpeg", "pil"]["bytes_per_image"] < decode["png", "pil"]["bytes_per_image"] < 3 * 64 * 64

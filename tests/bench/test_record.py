"""bench/record.py turns what the benchmarks wrote into RESULTS.md rows: fed here with real (CPU)
benchmark output, so a change of a benchmark's JSON that the recorder no longer reads fails."""
import json
import os
import shutil

import pytest
from test_bench import ROOT, bench

RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")


@pytest.fixture(scope="module")
def gpu_check_out(tmp_path_factory):
    """A gpu_check.sh-like folder, from the CPU (what the device machine writes, at toy sizes)."""
    out = tmp_path_factory.mktemp("gpu_check")
    bench("throughput.py", "--preset", "quickstart", "--device", "cpu", "--steps", "2", "--variants", "eager",
          "graphs", "--json", str(out / "throughput_b8.json"))
    bench("kernels.py", "--device", "cpu", "--batch", "2", "--ops", "rmsnorm_modulate", "--variants", "eager",
          "--iters", "2", "--json", str(out / "kernels.json"))
    bench("data.py", "--device", "cpu", "--samples", "64", "--batch", "16", "--steps", "2", "--warmup", "1",
          "--repeats", "1", "--backends", "global", "torch", "--json", str(out / "data.json"))
    bench("sample.py", "--device", "cpu", "--nfe", "2", "--iters", "1", "--batch", "4", "--stages", "sample",
          "--json", str(out / "sample.json"))
    (out / "log.txt").write_text("not a JSON: ignored\n")
    return out


def test_rows_carry_the_measured_figures_and_link_the_stored_json(gpu_check_out, tmp_path):
    results, store = tmp_path / "RESULTS.md", tmp_path / "results"
    shutil.copyfile(RESULTS, results)
    bench("record.py", str(gpu_check_out), "--results", str(results), "--store", str(store), "--allow-cpu")
    text = results.read_text()
    tp = json.loads((gpu_check_out / "throughput_b8.json").read_text())
    eager, graphs = tp["rows"]
    stored = sorted(os.listdir(store))
    assert len(stored) == 4 and all(name.startswith(tp["date"]) for name in stored)
    line = next(x for x in text.splitlines() if f"| {tp['preset']} | 8 | eager |" in x)
    assert line.startswith(f"| {tp['date']} | {tp['device_name']} | {tp['commit']} |")
    assert f"| {eager['images_per_s']:.0f} |" in line and f"| {100 * eager['mfu']:.1f}% |" in line
    assert "throughput_b8](results/" in line
    graphs_line = next(x for x in text.splitlines() if "| graphs |" in x)
    assert "needs a CUDA device" in graphs_line and "error" in graphs  # a failed variant is recorded as such
    kernels = json.loads((gpu_check_out / "kernels.json").read_text())
    assert any(f"| rmsnorm_modulate | 2 | eager | {kernels['rows'][0]['ms']:.3g} |" in x for x in text.splitlines())
    for section in ("## Data loading", "## Sampling", "## Measured peaks"):
        body = text.split(section)[1].split("\n## ")[0]
        assert "No GPU measurement yet" not in body
        assert len([x for x in body.splitlines() if x.startswith("| ")]) >= 2  # the header and rows
    assert "No GPU measurement yet" not in text.split("## Training throughput")[1].split("\n## ")[0]
    # a second record appends below the first rows and leaves them as they were
    before = text
    bench("record.py", str(gpu_check_out), "--results", str(results), "--store", str(store), "--allow-cpu")
    after = results.read_text()
    assert all(x in after.splitlines() for x in before.splitlines()) and len(after) > len(before)


def test_cpu_figures_are_refused_without_the_test_flag(gpu_check_out, tmp_path):
    results = tmp_path / "RESULTS.md"
    shutil.copyfile(RESULTS, results)
    env_out = tmp_path / "empty"
    env_out.mkdir()
    with pytest.raises(AssertionError, match="GPU figures only"):
        bench("record.py", str(gpu_check_out), "--results", str(results), "--store", str(tmp_path / "s"))
    with pytest.raises(AssertionError, match="no benchmark JSON"):
        bench("record.py", str(env_out), "--results", str(results), "--store", str(tmp_path / "s"))
    assert results.read_text() == open(RESULTS).read()

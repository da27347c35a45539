"""The guides stay true to the code: every `section.key` setting and every `--flag` that
README.md, docs/ and profiling/README.md mention exists."""
import contextlib
import glob
import io
import os
import re
import subprocess
import sys

import pytest

from srdit.config import Config, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "profiling", "README.md"),
        *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SCRIPTS = ["bench/throughput.py", "bench/kernels.py", "bench/data.py", "bench/sample.py", "bench/record.py",
           "bench/traffic.py", "bench/compile_check.py", "profiling/profile_step.py"]
# flags of other programs the guides show: torchrun, sbatch, nsys, ncu, the release's generate.py
FOREIGN = {"--cls-cfg-scale", "--nproc_per_node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id", "--nodes",
           "--max-restarts", "--cpus-per-task", "--time", "--signal", "--requeue",
           "--ntasks-per-node", "--gpus-per-node", "--clock-control", "--kernel-name", "--launch-skip",
           "--launch-count", "--set", "--import", "--page", "--section"}
SETTING = re.compile(r"(?<![\w./-])(model|data|train|sample|eval)\.(?!(?:py|md|sh)\b)([a-z][a-z0-9_]*)\b(?!\()")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")


def mentions(pattern) -> dict[str, list[str]]:
    """{mention: [files]} over the guides."""
    found = {}
    for path in DOCS:
        for match in pattern.finditer(open(path).read()):
            found.setdefault(match.group(0), []).append(os.path.relpath(path, ROOT))
    return found


def cli_flags() -> set[str]:
    """The flags of srdit's commands (their parsers' --help) and of the bench/profiling scripts."""
    from srdit.data import prepare
    from srdit.eval import main as eval_main
    from srdit.sample import main as sample_main
    from srdit.train import main as train_main

    text = []
    for module in (train_main, sample_main, eval_main, prepare):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            module.parse_args(["--help"])
        text.append(out.getvalue())
    for script in SCRIPTS:
        result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        text.append(result.stdout)
    return set(FLAG.findall("\n".join(text)))


def test_every_setting_the_guides_mention_exists():
    cfg = preset("sr-dit-b1-256")
    valid = {f"{section}.{key}" for section, values in cfg.to_dict().items() for key in values} | {"model.size"}
    assert {"train.max_steps", "model.kernels"} <= set(mentions(SETTING))  # the detector reads the guides
    unknown = {k: v for k, v in mentions(SETTING).items() if k not in valid}
    assert not unknown, f"settings the guides mention that srdit.config does not have: {unknown}"
    assert set(Config().to_dict()) == {"model", "data", "train", "sample", "eval"}  # the sections SETTING knows


def test_every_flag_the_guides_mention_exists():
    flags = cli_flags()
    assert {"--preset", "--ckpt", "--ref", "--src", "--variants"} <= flags
    unknown = {k: v for k, v in mentions(FLAG).items() if k not in flags | FOREIGN}
    assert not unknown, f"flags the guides mention that no srdit command has: {unknown}"

"""What a run, a sample job or a benchmark says about where it ran (STYLE 11): the code version
(commit, plus a hash of uncommitted changes), the device, the package versions, and the
datasheet peak rate for the MFU estimate in logs.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for the MFU estimate in
# logs only; bench/throughput.py measures the card's real matmul rate instead.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def _git(*args: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def code_version() -> str:
    """Commit, plus a hash of the uncommitted diff when the tree is dirty."""
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    diff = _git("diff", "HEAD")
    return f"{commit}+dirty.{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else commit


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def peak_flops(device: torch.device) -> float | None:
    """The datasheet dense bf16 rate of a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def environment(device: torch.device) -> dict:
    """The record every benchmark JSON starts with: device, versions, commit, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # triton is optional (kernels="eager" runs without it)
        triton_version = None
    return {"device_name": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": code_version(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}

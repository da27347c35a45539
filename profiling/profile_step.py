"""A torch.profiler trace of a few training steps of one bench/throughput.py variant.

    python profiling/profile_step.py --preset sr-dit-b1-256 --variant best --steps 5 --out prof/

Writes `trace.json` (open in https://ui.perfetto.dev or chrome://tracing), prints the top-20
kernels (GPU) or ops (CPU) by self time and the number of host-device synchronisations per
step (a step of the fast variants must have none). Phases of the step appear as named ranges
(teacher, forward+loss, backward, clip, optimizer, ema; plus data/noise here) in the trace and,
on a GPU, as NVTX ranges for Nsight Systems.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script: bench.*
from bench.throughput import VARIANTS, build_variant  # noqa: E402

from srdit.train.step import phase  # noqa: E402


def count_syncs(step, device: torch.device) -> int | None:
    """Host-device synchronisations in one step, from CUDA's sync debug mode (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sr-dit-b1-256")
    parser.add_argument("--variant", default="eager", choices=list(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="prof")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (32 if device.type == "cuda" else 8)
    cfg, step = build_variant(args.preset, args.variant, batch, device)
    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        step()
    syncs = count_syncs(step, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.steps):
            with phase("step"):
                step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    os.makedirs(args.out, exist_ok=True)
    trace = os.path.join(args.out, "trace.json")
    prof.export_chrome_trace(trace)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20))
    print(f"preset {args.preset}  variant {args.variant}  batch {batch}  device {device}")
    print(f"host-device syncs per step: {'n/a on the CPU' if syncs is None else syncs}")
    print(f"trace: {trace}")


if __name__ == "__main__":
    main()

"""What every benchmark shares (STYLE 13), besides srdit.runinfo.environment (the record each
JSON starts with): a timer, the card's measured copy bandwidth and bf16 matmul rate, the JSON
writer and the table printer, and the CPU tools' pieces (environment variables, intercepted
Triton launches, flushed denormals).

Timing: warm-up untimed, then the median (and the interquartile range) of repeated runs, with
CUDA events on a GPU and perf_counter on the CPU.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import srdit.io  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, warmup: int = 5, iters: int = 20) -> tuple[float, float]:
    """(median, interquartile range) of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times[(3 * len(times)) // 4] - times[len(times) // 4]


def copy_bandwidth_gbps(device: torch.device, mib: int = 1024) -> float:
    """Measured device copy rate: bytes read + bytes written per second of a large copy_."""
    n = mib * 2**20 // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    ms, _ = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """Measured dense bf16 matmul rate (the MFU denominator); fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms, _ = time_ms(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


@contextlib.contextmanager
def env_vars(**values: str):
    """Environment variables set for the duration, then restored (or removed again)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def import_kernel_modules() -> None:
    """Import every Triton kernel module of srdit now, so that its kernels are compiled ones
    (JITFunction). The CPU tools build their step with TRITON_INTERPRET=1 set (check_runtime
    allows Triton on the CPU only so; nothing runs), and a kernel module first imported then, by
    whatever the build runs, would be interpreted instead: its launches would run, not compile."""
    import importlib
    import pkgutil

    import srdit.kernels

    for module in pkgutil.iter_modules(srdit.kernels.__path__):
        importlib.import_module(f"srdit.kernels.{module.name}")


@contextlib.contextmanager
def triton_launches_intercepted(on_launch):
    """Every compiled Triton launch goes to on_launch(fn, args, kwargs) (the JITFunction, its
    positional and keyword arguments) instead of a device: nothing runs, outputs keep what their
    allocation held. What bench/compile_check.py records and bench/traffic.py counts."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(fn, *args, grid, warmup, **kwargs):
        on_launch(fn, args, kwargs)

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


@contextlib.contextmanager
def flush_denormals():
    """Denormals flushed to zero on the CPU: tools that intercept kernel launches leave outputs
    uninitialised, and denormals in them make CPU GEMMs slow."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def write_json(path: str | None, payload: dict, quiet: bool = False) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        srdit.io.write_json(path, payload)  # a reader (or a kill) never sees half a file
        if not quiet:
            print(f"wrote {path}")


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)

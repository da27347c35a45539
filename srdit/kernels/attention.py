"""Scaled dot-product attention behind one switch, cfg.model.attention_backend.

q, k, v [B,H,N,Dh] -> [B,H,N,Dh]; no mask, no dropout, scale Dh^-0.5 (as the release).

  "sdpa"   torch's dispatcher (flash / cuDNN / memory-efficient / math, torch's choice)
  "cudnn"  SDPA restricted to cuDNN attention (Hopper with cuDNN >= 9 prefers it anyway)
  "flash"  SDPA restricted to torch's built-in FlashAttention-2 kernel
  "fa3"    FlashAttention-3: torch's registry (activate_flash_attention_impl("FA3"), torch >= 2.13)
           when it works here, else the `flash_attn_interface` package
  "fa4"    FlashAttention-4 (package flash-attn-4, `flash_attn.cute`)
  "xformers" xformers.ops.memory_efficient_attention, xformers' own choice of kernel (package
           xformers >= 0.0.35, which needs torch >= 2.10: both of srdit's stacks). Its Hopper
           FlashAttention-3 operator is not in its wheel: it runs only with the flash_attn_3
           package installed, as "fa3" needs FlashAttention-3 built too.
  "eager"  textbook softmax(q k^T / sqrt(Dh)) v: tests and the slowest baseline
  "auto"   the fastest of the available ones for the shape, measured once per (shape, dtype,
           device) and cached; on the CPU always "sdpa"

Attention is ~3-5% of SR-DiT's FLOPs (257 or 64 tokens, head dim 64), so the backend matters
less than everything around it; it is selectable so that it can be measured (bench/).
An explicitly requested backend that is missing is an error naming what to install, never a
silent fallback.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from srdit.config import ATTENTION_BACKENDS, ConfigError


def eager_attention(q, k, v):
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, N, N]
    return (scores.softmax(dim=-1) @ v.float()).to(v.dtype)


def _sdpa_with(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


@functools.lru_cache(maxsize=None)
def _fa3():
    """FlashAttention-3 as a function of [B,H,N,Dh] tensors, or an ImportError naming the fix."""
    missing = ("attention_backend='fa3' needs the package flash_attn_interface (FlashAttention-3, built from the "
               "flash-attention repo's hopper/ folder), or torch >= 2.13 with that library for its FA3 registry")
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        activate = getattr(torch.nn.attention, "activate_flash_attention_impl", None)
        if activate is None:
            raise ImportError(missing) from None
        try:
            activate("FA3")  # torch's SDPA flash path now runs FA3 (raises if the library is absent)
        except Exception as error:  # the registry's own message names a module, not what to do
            raise ImportError(f"{missing} ({type(error).__name__}: {error})") from None
        return _sdpa_with("flash")

    def run(q, k, v):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out  # some versions also return the LSE
        return out.transpose(1, 2)

    return run


@functools.lru_cache(maxsize=None)
def _fa4():
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        raise ImportError("attention_backend='fa4' needs the package flash-attn-4 (`flash_attn.cute`)") from None

    def run(q, k, v):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return run


@functools.lru_cache(maxsize=None)
def _xformers():
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError:
        raise ImportError("attention_backend='xformers' needs the package xformers (pip install xformers; "
                          "0.0.35 needs torch >= 2.10)") from None

    def run(q, k, v):  # xformers takes [B, N, H, Dh]
        return memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return run


def backend_fn(name: str):
    """The attention function of a backend; raises ConfigError when it is not usable here."""
    if name == "sdpa":
        return F.scaled_dot_product_attention
    if name == "eager":
        return eager_attention
    if name in ("cudnn", "flash", "fa3", "fa4", "xformers") and not torch.cuda.is_available():
        raise ConfigError(f"attention_backend={name!r} needs a CUDA GPU; use 'sdpa' or 'eager' on the CPU")
    if name in ("cudnn", "flash"):
        return _sdpa_with(name)
    try:
        if name == "fa3":
            return _fa3()
        if name == "fa4":
            return _fa4()
        if name == "xformers":
            return _xformers()
    except ImportError as error:
        raise ConfigError(str(error)) from None
    raise ConfigError(f"attention_backend={name!r} is not one of {', '.join(map(repr, ATTENTION_BACKENDS))}")


_AUTO: dict[tuple, str] = {}


def _measure(fn, q, k, v, iters: int = 20) -> float:
    """Median ms of forward + backward of `fn` on copies of q, k, v (CUDA events). Grad mode is
    forced: the first use may come under no_grad (sampling), and backward is what training pays."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    times = []
    with torch.enable_grad():
        for i in range(3 + iters):  # 3 untimed warm-up runs
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(q, k, v).sum().backward()
            end.record()
            end.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def resolve_auto(q, k, v) -> str:
    """The fastest usable backend for this shape (measured on first use, then cached). A step
    that is compiled or captured resolves its shapes before (resolve_auto_for), so a traced graph
    finds its choice here; a shape first met while tracing gets sdpa (never timed in a trace)."""
    if q.device.type == "meta":
        return "sdpa"  # a run of shapes only (srdit.train.flat's probe): nothing to time or remember
    key = (q.device.type, tuple(q.shape), q.dtype)
    if key not in _AUTO:
        if q.device.type != "cuda":
            _AUTO[key] = "sdpa"  # nothing to choose on the CPU
            return _AUTO[key]
        if torch.compiler.is_compiling():
            return "sdpa"
        timings = {}
        for name in ("sdpa", "cudnn", "flash", "fa3", "fa4", "xformers"):
            try:
                timings[name] = _measure(backend_fn(name), q, k, v)
            except Exception:  # not installed or not supported for this shape/dtype: not a candidate
                continue
        if not timings:
            raise RuntimeError(f"attention_backend=auto: no backend ran for q {tuple(q.shape)} {q.dtype}; name one")
        _AUTO[key] = min(timings, key=timings.get)
    return _AUTO[key]


def resolve_auto_for(shapes, dtype: torch.dtype, device: torch.device) -> dict[tuple, str]:
    """Resolve `auto` for q, k, v of each [B, H, N, Dh] shape now, on random inputs: what a
    compiled or graph-captured step must do before tracing. Returns shape -> backend."""
    chosen = {}
    for shape in shapes:
        q, k, v = (torch.randn(shape, dtype=dtype, device=device) for _ in range(3))
        chosen[tuple(shape)] = resolve_auto(q, k, v)
    return chosen


def remember_auto(chosen: dict[tuple, str], dtype: torch.dtype, device: torch.device) -> None:
    """Take `chosen` (resolve_auto_for's result, possibly another process's) as this process's
    choice for those shapes: ranks that run one step together must run the same kernels."""
    for shape, backend in chosen.items():
        _AUTO[(torch.device(device).type, tuple(shape), dtype)] = backend


def _auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return backend_fn(resolve_auto(q, k, v))(q, k, v)


def attention_fn(backend: str = "sdpa"):
    """`attention(q, k, v)` of a backend, checked now: an unavailable one is a ConfigError here.
    "auto" picks per shape on first use (resolve_auto)."""
    return _auto_attention if backend == "auto" else backend_fn(backend)

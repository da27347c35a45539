"""Bytes, launches and FLOPs of one training step, COUNTED on the CPU, and a roofline MODEL of
its time on an H200. Not a measurement of speed: bench/throughput.py measures on a GPU.

    python bench/traffic.py [--preset sr-dit-b1-256] [--batch 256] [--variants eager kernels ...]
                            [--top 20] [--measure] [--json OUT]
    python bench/traffic.py --world 8 --batch 32 [--reduce-dtypes fp32 bf16] [--bus-gbps 370]

What runs. The training step srdit trains with (srdit.train.assemble.build_step, the variants of
bench/throughput.py that need no GPU: eager, kernels, cached-teacher, kernels+cached), one routed
step (the path-drop branch, 5% of steps, is counted with --path-drop), at two small batches on
the CPU, with the dtypes of a GPU run: bf16 autocast with CUDA's per-op policy
(bench/cuda_autocast.py) around the teacher and the forward, fp32 master weights, gradients and
optimizer. Each op's bytes and FLOPs are then extrapolated to --batch along the line through the
two small batches (every op's shapes are affine in the batch once the norm backwards' split
launches, whose partial-sum rows saturate with the batch, are those of --batch: split_launches_of;
tests/bench/test_traffic.py checks the line against a third batch). Launches do not depend on the
batch.

What counts (a TorchDispatchMode below autograd and autocast sees every op a GPU would run):
  - launched ops: views and metadata ops (a result that only aliases an input, empty tensors,
    profiler marks) count zero; a multi-tensor op (torch._foreach_*, fused AdamW) counts the
    launches CUDA's multi_tensor_apply makes (chunks of 65,536 elements, 320 blocks and a depth-
    dependent number of tensors per launch); a Triton kernel of srdit's fused ops is intercepted
    at its launch (nothing runs: its outputs stay uninitialised, which no count depends on) and
    counts one launch, the aten ops around it (cuBLAS GEMMs inside sprint_fuse) count as themselves;
    an SDPA forward or backward counts one launch (FlashAttention's backward is 2 to 3 kernels).
  - bytes: what each op reads (its tensor inputs, the elements a strided view covers; not the
    destination of copy_/fill_ or an out= argument) plus what it writes (its new outputs and the
    inputs it mutates). A Triton kernel moves its tensor arguments once each (srdit's kernels read
    or write each argument once), so a fused op counts its kernel's reads and writes: the formula
    in the op's docstring (tests/bench/test_traffic.py checks the two agree).
  - FLOPs: torch's flop counter's formulas (GEMMs, attention), 2*M*N*K for srdit's Triton GEMMs
    (TRITON_FLOPS); elementwise FLOPs are left out (their time is their bytes).
  - model: sum over ops of max(FLOPs / matmul rate, bytes / copy bandwidth), H200 rates measured by
    bench/kernels.py when bench/results/ holds such a JSON, else the datasheet's (printed).
Phases: teacher, forward (the model), loss (noising, losses), backward, reduce, clip, optimizer,
ema; "other" is the step's own bookkeeping (its loss sums, the gradient buffer's zero fill).
--world N: the per-rank step of an N-rank run at --batch per rank, counted with srdit's gradient
reducer (srdit.train.reduce, in a one-rank gloo group: its local ops are counted, each chunk's
all_reduce is marked where the backward launches it). The reduction is then MODELLED: each chunk's
bytes on the wire per rank (ring: 2 (N-1)/N of its size sent and as much received; NVLink SHARP:
its size sent and its size received), its time at --bus-gbps (NCCL's bus bandwidth, whose
all_reduce algorithm bandwidth is bus x N / (2 (N-1))), chunks one after another on the
communicator's stream, each starting when the step has reached its launch and the previous one
is done; where the step waits for them (the reduction before the clip; sharded, the weights'
all-gather before the student's forward) whatever has not ended is exposed, the rest overlaps
(the model assumes the collectives take no SM time or memory bandwidth from the kernels they
overlap). The per-rank step is the ops' modelled time plus the exposed part, and 400K such steps
the run's modelled wall-clock. --shard counts the sharded update (train.shard_optimizer=true):
reduce-scatter, AdamW and EMA on the rank's 1/N, the weights' all-gather behind the teacher.
--reduce-orders fixed counts train.reduce_order=fixed: an all-to-all (the reduce-scatter's wire
bytes, no NVLink SHARP) and the rank's own pairwise sums in place of each reduce-scatter, and the
norm's tile sums all-gathered.
--measure (a GPU): the same step's device time per phase from torch.profiler, printed next to
the model (bench/gpu_check.sh runs it; bench/record.py files it), so the model meets the hardware.
"""
from __future__ import annotations

import os

# before triton or a kernel file is imported: compiled kernels (JITFunction), whose launches the
# counter intercepts; under the interpreter they would run, and their numpy copies would count
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script: bench.*
from bench.common import (ROOT, env_vars, flush_denormals, import_kernel_modules, table,  # noqa: E402
                          triton_launches_intercepted, write_json)
from bench.cuda_autocast import cuda_autocast_on_cpu  # noqa: E402
from bench.throughput import VARIANTS, build_variant_step  # noqa: E402

import_kernel_modules()  # compiled, before count_step builds a step under TRITON_INTERPRET=1

PHASES = ("teacher", "forward", "loss", "backward", "reduce", "clip", "optimizer", "ema")
# srdit.train.step's phase names (torch.profiler ranges) -> the phases above; the model's own
# forward inside "forward+loss" is marked by hooks on the model
STEP_PHASES = {"teacher": "teacher", "forward+loss": "loss", "backward": "backward", "reduce": "reduce",
               "clip": "clip", "optimizer": "optimizer", "ema": "ema"}
COUNTED_VARIANTS = {**{v: VARIANTS[v] for v in ("eager", "kernels", "cached-teacher")},
                    "kernels+cached": dict(kernels="triton", compile=False, cached=True, graphs=False)}
H200_DATASHEET = {"matmul_tflops": 989.0, "copy_gbps": 4800.0, "source": "H200 SXM datasheet: 989 TFLOP/s dense "
                  "bf16, 4.8 TB/s HBM3e"}
SMALL_BATCHES = (2, 4)
# NCCL all_reduce bus bandwidth on 8 NVLink4 GPUs (H100/H200, 900 GB/s NVLink each): ~370 GB/s with
# the ring algorithm, and what the other collectives reach; NVLink SHARP peaks near 480 GB/s but
# only above ~256 MB per call (NVIDIA/nccl-tests#212, sjeaugey; shared/MULTI_GPU.md section 4)
BUS_GBPS = 370.0
BUS_SOURCE = "NCCL busBw on 8x NVLink4 H100/H200, ring: ~370 GB/s (NVIDIA/nccl-tests#212)"
# NCCL's bus bandwidth convention: algorithm bandwidth = bus bandwidth / this (nccl-tests PERFORMANCE.md)
BUS_FACTOR = {"allreduce_": lambda n: 2 * (n - 1) / n, "reduce_scatter_tensor_coalesced_": lambda n: (n - 1) / n,
              "_reduce_scatter_base_": lambda n: (n - 1) / n, "_allgather_base_": lambda n: (n - 1) / n,
              "allgather_into_tensor_coalesced_": lambda n: (n - 1) / n, "alltoall_base_": lambda n: (n - 1) / n}
RUN_STEPS = 400_000  # the paper's run

# CUDA's multi_tensor_apply (ATen/native/cuda/MultiTensorApply.cuh): tensors per launch by list depth
MULTI_TENSOR_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
MULTI_TENSOR_MAX_BLOCKS = 320
MULTI_TENSOR_CHUNK = 65536
# Triton kernels that touch a [B, T, ...] or [B*T, D] tensor argument only at the token rows an
# index argument selects: pointer argument -> (index argument, "r" read or written once | "rw" both)
GATHERED = {
    "_attention_prologue_fwd_kernel": {"v0_ptr": ("v0_ids_ptr", "r")},
    "_attention_prologue_bwd_kernel": {"v0_ptr": ("v0_ids_ptr", "r"), "dv0_ptr": ("v0_ids_ptr", "r")},
    "_gather_tokens_fwd_kernel": {"x_ptr": ("ids_ptr", "r")},
    "_gather_tokens_bwd_kernel": {"dx_ptr": ("ids_ptr", "r")},
    "_sprint_fuse_fwd_kernel": {"out_ptr": ("ids_ptr", "rw")},
}
# Triton kernels that multiply matrices: their FLOPs from the launch's arguments (the others' are
# elementwise: left out, as for aten ops)
TRITON_FLOPS = {"_gemm_act_kernel": lambda a: 2 * a["M"] * a["N"] * a["K"]}
WRITE_ONLY_FIRST = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_"}
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "resize_",
             "set_", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
             "is_same_size", "_has_compatible_shallow_copy_type"}


@dataclasses.dataclass
class Op:
    phase: str
    name: str
    launches: int
    bytes: float
    flops: float
    wire_bytes: float = 0.0  # a collective's buffer (modelled on the wire, not in memory: model_communication)
    wait: bool = False  # where the step waits for the collectives launched before (srdit.train.reduce.wait_for)


def unique_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements a strided view covers (a broadcast dimension is read once)."""
    if t.numel() == 0:
        return 0
    n = t.element_size()
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def multi_tensor_launches(numels: list[int], depth: int) -> int:
    """Kernels CUDA's multi_tensor_apply launches for tensors of these sizes: it fills a launch
    with up to MAX_TENSORS[depth] tensors and MAX_BLOCKS chunks, then launches."""
    max_tensors = MULTI_TENSOR_MAX_TENSORS[min(depth, 5)]
    launches = tensors = blocks = 0
    for numel in numels:
        if numel == 0:
            continue
        tensors += 1
        chunks = -(-numel // MULTI_TENSOR_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            last_chunk = chunk == chunks - 1
            if blocks == MULTI_TENSOR_MAX_BLOCKS or (tensors == max_tensors and last_chunk):
                launches += 1
                blocks = 0
                tensors = 1 if not last_chunk else 0  # a tensor cut mid-way carries on in the next launch
    return launches + (1 if blocks else 0)


def foreach_launches(name: str, lists: list[list[torch.Tensor]]) -> int:
    """Kernels a CUDA multi-tensor op launches. torch's fast route (multi_tensor_apply) needs the
    lists to agree tensor by tensor in shape, stride and dtype; otherwise it runs one op per tensor
    (as the EMA's per-parameter 0-dim weights make it: a launch per parameter). Fused AdamW always
    takes the fast route (its step counts are not a list of the kernel). _foreach_norm adds the
    kernel that finishes its per-tensor sums."""
    first = lists[0]
    fast = name.startswith("_fused_") or all(
        len(other) == len(first) and all(a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
                                         for a, b in zip(first, other)) for other in lists[1:])
    if not fast:
        return len(first)
    return multi_tensor_launches([t.numel() for t in first], len(lists)) + int(name.startswith("_foreach_norm"))


def _flops(func, args, kwargs, out) -> float:
    name = func._schema.name.split("::")[-1]
    if name == "_scaled_dot_product_flash_attention_for_cpu":  # torch counts the CUDA kernels only
        q, k, v = args[:3]
        return sdpa_flop_count(q.shape, k.shape, v.shape)
    if name == "_scaled_dot_product_flash_attention_for_cpu_backward":
        grad_out, q, k, v = args[:4]
        return sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)
    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0
    return formula(*args, **(kwargs or {}), out_val=out)


class Counter(TorchDispatchMode):
    """Counts every op (and every intercepted Triton launch) into `ops`, by phase."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.phases: list[str | None] = []  # the stack of profiler ranges (None: not a phase)
        self.model_depth = 0  # > 0 inside the model's forward

    @property
    def phase(self) -> str:
        if self.model_depth and "loss" in self.phases:
            return "forward"
        named = [p for p in self.phases if p]
        return named[-1] if named else "other"

    def launch(self, name: str, arguments: dict) -> None:
        """A Triton kernel: one launch, each tensor argument moved once (GATHERED: only the rows
        its ids select)."""
        seen, moved = set(), 0
        gathered = GATHERED.get(name, {})
        for arg, t in arguments.items():
            if not isinstance(t, torch.Tensor):
                continue
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            ids = arguments.get(gathered[arg][0]) if arg in gathered else None
            if ids is None:
                moved += unique_bytes(t)
            else:
                rows = t.shape[0] if t.dim() == 2 else t.shape[0] * t.shape[1]
                moved += unique_bytes(t) / rows * ids.numel() * (2 if gathered[arg][1] == "rw" else 1)
        flops = TRITON_FLOPS[name](arguments) if name in TRITON_FLOPS else 0
        self.ops.append(Op(self.phase, name, 1, moved, flops))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":
            return self._profiler_mark(func, args, kwargs)
        if func.namespace == "srdit":  # a fused op: its Triton launches and the aten ops around them
            opdef = torch._library.custom_ops._maybe_get_opdef(func._schema.name)
            with self:
                return opdef._init_fn(*args, **kwargs)
        if func.namespace == "c10d":  # a collective: one NCCL kernel, its buffer modelled on the wire
            out = func(*args, **kwargs)
            size = sum(unique_bytes(t) for t in _tensors(args[0]))
            self.ops.append(Op("reduce", func._schema.name.split("::")[-1], 1, 0.0, 0.0, size))
            return out
        out = func(*args, **kwargs)
        self.ops.append(self._count(func, args, kwargs, out))
        return out

    def _profiler_mark(self, func, args, kwargs):
        out = func(*args, **kwargs)
        if func._overloadpacket.__name__ == "_record_function_enter_new" and args[0] == "wait":
            self.ops.append(Op(self.phase, "wait", 0, 0.0, 0.0, wait=True))
        if func._overloadpacket.__name__ == "_record_function_enter_new":
            self.phases.append(STEP_PHASES.get(args[0]))
        elif func._overloadpacket.__name__ == "_record_function_exit" and self.phases:
            self.phases.pop()
        return out

    def _count(self, func, args, kwargs, out) -> Op:
        schema = func._schema
        name = schema.name.split("::")[-1]
        op_name = f"{name}.{func._overloadname}" if func._overloadname != "default" else name
        returns = schema.returns
        views_only = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        if views_only or name in NO_KERNEL or func.namespace == "prim":
            return Op(self.phase, op_name, 0, 0, 0)
        read = written = 0
        lists = []  # the tensor lists of a multi-tensor op, inputs then outputs
        bound = list(zip(schema.arguments, args)) + [(a, kwargs[a.name]) for a in schema.arguments if a.name in kwargs]
        for i, (arg, value) in enumerate(bound):
            mutated = arg.alias_info is not None and arg.alias_info.is_write
            write_only = mutated and (arg.kwarg_only or (i == 0 and name in WRITE_ONLY_FIRST))
            tensors = list(_tensors(value))
            if isinstance(value, (list, tuple)) and tensors and arg.name != "state_steps":
                lists.append(tensors)
            for t in tensors:
                size = unique_bytes(t)
                read += 0 if write_only else size
                written += size if mutated else 0
        for ret, value in zip(returns, out if isinstance(out, (list, tuple)) and len(returns) > 1 else (out,)):
            if ret.alias_info is None:
                tensors = list(_tensors(value))
                written += sum(unique_bytes(t) for t in tensors)
                # an output list is an operand of the kernel (depth) unless it holds per-tensor results
                if isinstance(value, (list, tuple)) and tensors and lists and \
                        [t.shape for t in tensors] == [t.shape for t in lists[0]]:
                    lists.append(tensors)
        launches = 1
        if not any(True for _ in _tensors(list(args) + list(kwargs.values()) + [out])):
            launches = 0  # a dtype or shape computation (promote_types): no tensor in or out, no kernel
        elif name.startswith(("_foreach_", "_fused_")) and lists:
            launches = foreach_launches(name, lists)
        return Op(self.phase, op_name, launches, read + written, _flops(func, args, kwargs, out))

    @contextlib.contextmanager
    def counting(self, model: torch.nn.Module):
        """Count while active: dispatched ops, Triton launches (intercepted, not run) and the
        model's forward (hooks) as its own phase."""
        def launch(fn, args, kwargs):
            self.launch(fn.fn.__qualname__, {**dict(zip(fn.arg_names, args)), **kwargs})

        def enter(module, inputs):
            self.model_depth += 1

        def leave(module, inputs, output):
            self.model_depth -= 1

        hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
        try:
            with triton_launches_intercepted(launch), collectives_counted(self), self:
                yield self
        finally:
            for hook in hooks:
                hook.remove()


class _Launched:
    """What a collective counted, not run, returns: nothing to wait for."""

    def wait(self) -> None:
        pass


@contextlib.contextmanager
def collectives_counted(counter: Counter):
    """srdit's gradient and weight collectives (srdit.train.reduce) counted, not run: one launch
    each, their buffer modelled on the wire (model_communication). A rank of several ranks can be
    counted in one process this way, its pieces the size they would be (a real group here has one
    rank, whose collectives would want the whole buffer). The names are c10d's ops."""
    from srdit.train import reduce

    def counted(name, tensor):
        counter.ops.append(Op("reduce", name, 1, 0.0, 0.0, unique_bytes(tensor)))
        return _Launched()

    saved = {name: getattr(reduce, name) for name in ("_all_reduce", "_reduce_scatter", "_all_gather", "_all_to_all")}
    reduce._all_reduce = lambda tensor, group: counted("allreduce_", tensor)
    reduce._all_to_all = lambda output, input, group: counted("alltoall_base_", input)
    reduce._reduce_scatter = lambda output, input, group: counted("_reduce_scatter_base_", input)
    reduce._all_gather = lambda output, input, group: counted("_allgather_base_", output)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(reduce, name, fn)


# --------------------------------------------------------------------------- one step


def routed_noise(cfg, batch: int, device, path_drop: bool = False):
    """One step's noise, drawn from fixed seeds, with the path-drop coin set: the same step at
    every batch and in every variant."""
    from srdit.train.loss import draw_step_noise

    m = cfg.model
    noise = draw_step_noise(batch, (m.in_channels, m.input_size, m.input_size), m, cfg.train, device=device,
                            generator=torch.Generator(device).manual_seed(1),
                            host_generator=torch.Generator().manual_seed(2))
    return dataclasses.replace(noise, path_drop=path_drop)


@contextlib.contextmanager
def split_launches_of(batch: int, launch_batch: int):
    """The kernels' split launches (a norm backward's partial-sum rows, srdit.kernels.triton_utils.
    split_launch) as they are at `launch_batch` while the step runs at `batch`. The programs per
    group saturate with the batch (about 4 per SM in all), so the partial buffers of a small batch
    are not on the line to a large one; the launch of the large one, applied at the small batch,
    keeps every partial buffer affine in the batch. Nothing runs (launches are intercepted), so a
    program may be left without rows. A group is a batch element (per-sample sums) or all rows."""
    from srdit.kernels import triton_utils

    original = triton_utils.split_launch

    def at_launch_batch(n_groups, tiles_per_group, device, *, programs=None):
        if n_groups > 1 and n_groups != batch:
            raise RuntimeError(f"split launch over {n_groups} groups at batch {batch}: groups must be samples")
        if n_groups > 1:  # per sample: the large batch has more groups, each with the same rows
            large = original(launch_batch, tiles_per_group, device, programs=programs)
        else:  # one group of all rows: the large batch has more rows
            large = original(1, math.ceil(tiles_per_group * launch_batch / batch), device, programs=programs)
        return triton_utils.SplitLaunch(large.splits, math.ceil(tiles_per_group / large.splits),
                                        (n_groups, large.splits))

    modules = [m for name, m in sys.modules.items()
               if name.startswith("srdit.kernels.") and getattr(m, "split_launch", None) is original]
    for module in modules:
        module.split_launch = at_launch_batch
    try:
        yield
    finally:
        for module in modules:
            module.split_launch = original


@contextlib.contextmanager
def one_rank_group():
    """A gloo process group of this one process (for the reducer's collectives), unless one exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def count_step(preset_name: str, variant: str, batch: int, *, path_drop: bool = False,
               launch_batch: int | None = None, reduce_dtype: str | None = None, world: int = 1,
               shard: bool = False, reduce_order: str = "library") -> list[Op]:
    """The ops of one training step of `variant` at `batch`, with the split launches of
    `launch_batch` (default `batch`; see split_launches_of and the module docstring); with
    `reduce_dtype`, the step of a rank of `world`, its gradients reduced in that dtype (with
    `shard`, reduce-scattered and the update sharded: rank 0's 1/world; `reduce_order`:
    train.reduce_order)."""
    device = torch.device("cpu")
    reduce = reduce_dtype is not None
    with contextlib.ExitStack() as stack:
        if reduce:
            stack.enter_context(one_rank_group())
        # check_runtime allows Triton on the CPU only under the interpreter; nothing runs here. bf16:
        # the autocast StepRunner uses on a GPU, with CUDA's policy
        with env_vars(TRITON_INTERPRET="1"):
            cfg, model, runner, data = build_variant_step(
                preset_name, COUNTED_VARIANTS[variant], batch, device, autocast=cuda_autocast_on_cpu, reduce=reduce,
                overrides=[f"train.grad_reduce_dtype={reduce_dtype}", f"train.reduce_order={reduce_order}"] if reduce else [],
                world=world, shard=shard)
        noise = routed_noise(cfg, batch, device, path_drop)
        with flush_denormals(), split_launches_of(batch, launch_batch or batch):
            with Counter().counting(model):  # warm-up, not counted: optimizer state and lazy buffers come first
                runner.run([data], noise)
            counter = Counter()
            with counter.counting(model):
                runner.run([data], noise)
    return counter.ops


def extrapolate(small: dict[int, list[Op]], batch: int) -> list[Op]:
    """Each op's bytes and FLOPs on the line through the two small batches, at `batch`."""
    (b1, ops1), (b2, ops2) = sorted(small.items())
    if [(o.phase, o.name, o.launches) for o in ops1] != [(o.phase, o.name, o.launches) for o in ops2]:
        raise RuntimeError(f"the step launches different ops at batch {b1} and {b2}: it cannot be scaled")
    scale = (batch - b1) / (b2 - b1)
    return [Op(a.phase, a.name, a.launches, a.bytes + (b.bytes - a.bytes) * scale,
               a.flops + (b.flops - a.flops) * scale, a.wire_bytes, a.wait) for a, b in zip(ops1, ops2)]


def count_variant(preset_name: str, variant: str, batch: int, *, path_drop: bool = False,
                  small=SMALL_BATCHES, reduce_dtype: str | None = None, world: int = 1, shard: bool = False,
                  reduce_order: str = "library") -> list[Op]:
    return extrapolate({b: count_step(preset_name, variant, b, path_drop=path_drop, launch_batch=batch,
                                      reduce_dtype=reduce_dtype, world=world, shard=shard, reduce_order=reduce_order)
                        for b in small}, batch)


# --------------------------------------------------------------------------- model and report


def h200_rates(results_dir: str = os.path.join(ROOT, "bench", "results")) -> dict:
    """The newest H200 copy bandwidth and bf16 matmul rate bench/kernels.py recorded, else the datasheet."""
    found = []
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and "H200" in str(d.get("device_name", "")) and d.get("copy_gbps") \
                and d.get("matmul_tflops"):
            found.append((d.get("date", ""), path, d))
    if not found:
        return dict(H200_DATASHEET)
    _, path, d = max(found)
    return {"matmul_tflops": d["matmul_tflops"], "copy_gbps": d["copy_gbps"],
            "source": f"measured by bench/kernels.py: {os.path.relpath(path, ROOT)}"}


def modelled_ms(op: Op, rates: dict) -> float:
    return max(op.flops / (rates["matmul_tflops"] * 1e12), op.bytes / (rates["copy_gbps"] * 1e9)) * 1e3


def summarize(ops: list[Op], rates: dict, batch: int) -> dict:
    """Totals per phase and in all: launches, bytes (and per image), FLOPs, modelled ms."""
    phases = collections.OrderedDict((p, dict(launches=0, bytes=0.0, flops=0.0, model_ms=0.0)) for p in PHASES)
    for op in ops:
        row = phases.setdefault(op.phase, dict(launches=0, bytes=0.0, flops=0.0, model_ms=0.0))
        row["launches"] += op.launches
        row["bytes"] += op.bytes
        row["flops"] += op.flops
        row["model_ms"] += modelled_ms(op, rates)
    total = {k: sum(r[k] for r in phases.values()) for k in ("launches", "bytes", "flops", "model_ms")}
    total["bytes_per_image"] = total["bytes"] / batch
    return {"phases": phases, "total": total}


def top_ops(ops: list[Op], rates: dict, n: int) -> list[dict]:
    """The n (phase, op) pairs that move the most bytes, summed over their calls."""
    merged: dict[tuple, dict] = {}
    for op in ops:
        row = merged.setdefault((op.phase, op.name), dict(phase=op.phase, op=op.name, calls=0, launches=0,
                                                           bytes=0.0, flops=0.0, model_ms=0.0))
        row["calls"] += 1
        row["launches"] += op.launches
        row["bytes"] += op.bytes
        row["flops"] += op.flops
        row["model_ms"] += modelled_ms(op, rates)
    return sorted(merged.values(), key=lambda r: -r["bytes"])[:n]


def model_communication(ops: list[Op], rates: dict, world: int, bus_gbps: float) -> dict:
    """The collectives of a rank's step (Op.wire_bytes) on the wire of `world` ranks: bytes each
    rank sends and receives (ring and NVLink SHARP), modelled time at `bus_gbps`, and how much of
    it the compute hides (the module's docstring has the model). The ops run one after another at
    their modelled time; the collectives one after another on the communicator's stream, each
    from its launch; at a wait (Op.wait) the step stalls until those launched before it end: the
    stalls are the exposed time. Times in ms from the step's start."""
    clock, comm_free, pending, exposed = 0.0, 0.0, [], 0.0
    calls = []
    for op in ops:
        if op.wire_bytes:
            factor = BUS_FACTOR[op.name](world)
            wire_ms = op.wire_bytes * factor / (bus_gbps * 1e9) * 1e3
            start = max(clock, comm_free)
            comm_free = start + wire_ms
            pending.append(comm_free)
            ring = op.wire_bytes * factor if op.name == "allreduce_" else op.wire_bytes * (world - 1) / world
            # NVLink SHARP: all_reduce sends its buffer once and receives the sum once; the
            # one-way collectives move what the ring moves
            nvls = op.wire_bytes if op.name == "allreduce_" else ring
            calls.append(dict(op=op.name, mb=op.wire_bytes / 1e6, launched_ms=clock, start_ms=start,
                              end_ms=comm_free, wire_ms=wire_ms, ring_send_mb=ring / 1e6, nvls_send_mb=nvls / 1e6))
        if op.wait and pending:
            stall = max(0.0, max(pending) - clock)
            exposed += stall
            clock += stall
            pending = []
        clock += modelled_ms(op, rates)
    wire = sum(c["wire_ms"] for c in calls)
    return {"world": world, "bus_gbps": bus_gbps, "calls": calls, "wire_ms": wire, "exposed_ms": exposed,
            "overlapped_ms": wire - exposed, "ring_send_mb": sum(c["ring_send_mb"] for c in calls),
            "nvls_send_mb": sum(c["nvls_send_mb"] for c in calls)}


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def report(variant: str, summary: dict, tops: list[dict], batch: int) -> str:
    rows = [dict(phase=p, launches=r["launches"], GB=_gb(r["bytes"]), GFLOP=f"{r['flops'] / 1e9:.0f}",
                 model_ms=f"{r['model_ms']:.2f}") for p, r in summary["phases"].items() if r["launches"]]
    t = summary["total"]
    rows.append(dict(phase="total", launches=t["launches"], GB=_gb(t["bytes"]), GFLOP=f"{t['flops'] / 1e9:.0f}",
                     model_ms=f"{t['model_ms']:.2f}"))
    lines = [f"== {variant}: {t['bytes_per_image'] / 1e6:.1f} MB per image, {t['launches']} launches per step, "
             f"modelled {t['model_ms']:.1f} ms per step of {batch} (a count and a model, not a measurement)",
             table(rows, ["phase", "launches", "GB", "GFLOP", "model_ms"])]
    if tops:
        lines += [f"top {len(tops)} ops by bytes:", table([dict(r, GB=_gb(r["bytes"]), model_ms=f"{r['model_ms']:.2f}")
                                                          for r in tops], ["phase", "op", "calls", "launches", "GB",
                                                                           "model_ms"])]
    return "\n".join(lines)


def measure_phases(preset_name: str, variant: str, batch: int, steps: int = 3) -> dict[str, float]:
    """On a GPU: device time (ms) per phase of the same step, from torch.profiler's kernels under
    the step's own ranges (srdit.train.step.phase) and a range around the model's forward: the
    hardware's side of the model above (`--measure`). The path-drop coin is fixed to routed."""
    device = torch.device("cuda")
    cfg, model, runner, data = build_variant_step(preset_name, COUNTED_VARIANTS[variant], batch, device)
    noise = routed_noise(cfg, batch, device)
    ranges = []

    def enter(*_):
        ranges.append(torch.profiler.record_function("model"))
        ranges[-1].__enter__()

    def leave(*_):
        ranges.pop().__exit__(None, None, None)

    hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    for _ in range(3):  # warm-up: cuBLAS heuristics, Triton compiles, allocator
        runner.run([data], noise)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            runner.run([data], noise)
        torch.cuda.synchronize()
    for hook in hooks:
        hook.remove()
    phases = dict.fromkeys(PHASES, 0.0)
    for event in prof.events():
        name = "forward" if event.name == "model" else STEP_PHASES.get(event.name)
        if name is not None:
            phases[name] += event.device_time_total / 1e3 / steps  # us -> ms per step
    phases["loss"] -= phases["forward"]  # the model's range lies inside "forward+loss"
    return phases


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sr-dit-b1-256")
    parser.add_argument("--batch", type=int, default=256, help="the step's batch (per rank) the counts are scaled to")
    parser.add_argument("--variants", nargs="+", default=list(COUNTED_VARIANTS), choices=list(COUNTED_VARIANTS))
    parser.add_argument("--path-drop", action="store_true", help="count the path-drop branch (5%% of steps)")
    parser.add_argument("--world", type=int, default=1,
                        help="ranks: > 1 counts a rank's step with the gradient reduction and models its wire time")
    parser.add_argument("--reduce-dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="with --world > 1: train.grad_reduce_dtype values, a row each")
    parser.add_argument("--shard", nargs="+", default=["false"], choices=["false", "true"],
                        help="with --world > 1: train.shard_optimizer values, a row each")
    parser.add_argument("--reduce-orders", nargs="+", default=["library"], choices=["library", "fixed"],
                        help="with --world > 1: train.reduce_order values, a row each (fixed: fp32 rows only)")
    parser.add_argument("--bus-gbps", type=float, default=BUS_GBPS, help=f"collective bus bandwidth ({BUS_SOURCE})")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--measure", action="store_true",
                        help="on a GPU: also measure each phase's device time (torch.profiler) next to the model")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from srdit.runinfo import environment

    if args.measure and not torch.cuda.is_available():
        raise SystemExit("--measure needs a CUDA GPU (the counts and the model need none)")
    if args.measure and args.world > 1:
        raise SystemExit("--measure times one process's step; run it with --world 1")
    env = environment(torch.device("cuda" if args.measure else "cpu"))
    rates = h200_rates()
    shape = f"batch {args.batch}" + (f" per rank of {args.world} (global {args.batch * args.world})" if args.world > 1
                                     else "")
    print(f"counted on the CPU{' (measured on ' + env['device_name'] + ')' if args.measure else ''}, "
          f"torch {env['torch']}, commit {env['commit']}: "
          f"{args.preset}, {shape} (scaled from {SMALL_BATCHES}), "
          f"{'path-drop' if args.path_drop else 'routed'} step, bf16 autocast with CUDA's policy")
    print(f"roofline rates: {rates['matmul_tflops']:.0f} TFLOP/s, {rates['copy_gbps']:.0f} GB/s ({rates['source']})")
    if args.world > 1:
        print(f"collectives: {args.bus_gbps:.0f} GB/s bus bandwidth ({BUS_SOURCE if args.bus_gbps == BUS_GBPS else 'given'})")
    results = []
    runs = [(v, d, sh, o) for v in args.variants for d in (args.reduce_dtypes if args.world > 1 else [None])
            for sh in (args.shard if args.world > 1 else ["false"])
            for o in (args.reduce_orders if args.world > 1 else ["library"]) if o == "library" or d == "fp32"]
    for variant, dtype, shard, order in runs:
        ops = count_variant(args.preset, variant, args.batch, path_drop=args.path_drop, reduce_dtype=dtype,
                            world=args.world, shard=shard == "true", reduce_order=order)
        summary, tops = summarize(ops, rates, args.batch), top_ops(ops, rates, args.top)
        name = variant if dtype is None else (f"{variant}, {dtype} reduction{', sharded' if shard == 'true' else ''}"
                                              f"{', fixed order' if order == 'fixed' else ''}")
        print(report(name, summary, tops, args.batch), flush=True)
        row = {"variant": variant, **summary["total"], "phases": summary["phases"], "top": tops}
        if dtype is not None:
            comm = model_communication(ops, rates, args.world, args.bus_gbps)
            step_ms = summary["total"]["model_ms"] + comm["exposed_ms"]
            row.update(reduce_dtype=dtype, world=args.world, sharded=shard == "true", reduce_order=order,
                       communication=comm, step_ms=step_ms,
                       run_hours=RUN_STEPS * step_ms / 3.6e6)
            print(communication_report(comm, summary["total"]["model_ms"], step_ms), flush=True)
        if args.measure:
            measured = measure_phases(args.preset, variant, args.batch)
            for phase, r in summary["phases"].items():
                r["measured_ms"] = measured.get(phase)
            print(table([dict(phase=p, model_ms=f"{r['model_ms']:.2f}", measured_ms=f"{r.get('measured_ms') or 0:.2f}")
                         for p, r in summary["phases"].items() if r["launches"]], ["phase", "model_ms", "measured_ms"]),
                  flush=True)
        results.append(row)
        write_json(args.json, {**env, "kind": "count (CPU), not a measurement" + ("; measured_ms: GPU profiler"
                                                                                   if args.measure else ""),
                               "preset": args.preset, "batch": args.batch, "world": args.world,
                               "path_drop": args.path_drop, "small_batches": list(SMALL_BATCHES), "rates": rates,
                               "bus_gbps": args.bus_gbps, "variants": results}, quiet=True)
    if args.json:
        print(f"wrote {args.json}")


def communication_report(comm: dict, compute_ms: float, step_ms: float) -> str:
    rows = [dict(call=c["op"], MB=f"{c['mb']:.1f}", launched_ms=f"{c['launched_ms']:.2f}", start_ms=f"{c['start_ms']:.2f}",
                 end_ms=f"{c['end_ms']:.2f}", wire_ms=f"{c['wire_ms']:.2f}", ring_send_MB=f"{c['ring_send_mb']:.1f}",
                 nvls_send_MB=f"{c['nvls_send_mb']:.1f}") for c in comm["calls"]]
    return "\n".join([
        f"-- {comm['world']} ranks: each rank sends (and receives) {comm['ring_send_mb']:.0f} MB per step with the "
        f"ring algorithm, {comm['nvls_send_mb']:.0f} MB with NVLink SHARP; modelled wire time {comm['wire_ms']:.2f} ms, "
        f"{comm['overlapped_ms']:.2f} ms of it behind the backward, {comm['exposed_ms']:.2f} ms exposed",
        table(rows, ["call", "MB", "launched_ms", "start_ms", "end_ms", "wire_ms", "ring_send_MB", "nvls_send_MB"]),
        f"-- per-rank step: {compute_ms:.2f} ms of ops + {comm['exposed_ms']:.2f} ms exposed = {step_ms:.2f} ms modelled; "
        f"{RUN_STEPS:,} steps = {RUN_STEPS * step_ms / 3.6e6:.2f} h (a model, not a measurement)"])


if __name__ == "__main__":
    main()

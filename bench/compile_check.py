"""Every Triton launch of srdit's training step and of its sampler, compiled ahead of time for the
GPUs srdit runs on, with what each compiled kernel needs. No GPU and no CUDA driver: it runs on
the CPU machines of development and CI (TOOLCHAIN.md "Triton for a GPU that is not there").

    python bench/compile_check.py [--preset sr-dit-b1-256 sr-dit-b1-512] [--target sm_90a sm_100a]
                                  [--precision fp32 bf16] [--depth N] [--json OUT] [--check]
                                  [--tiles KERNEL=ELEMENTS:WARPS ...]

1. Record. The step srdit trains with (srdit.train.assemble.build_step, model.kernels=triton)
   runs on the CPU twice, routed and path-dropped, forward and backward; then the sampler (path-
   drop guidance: a call without routing and a path-dropped one, no grad) and the contract's
   apply_rope (not launched by the model, whose RoPE is inside attention_prologue). Every Triton
   launch is intercepted before it reaches a device (JITFunction.run): its arguments are kept and
   nothing runs, so only shapes, dtypes, strides and alignment matter and bf16 needs no bf16
   arithmetic. bf16 is the step as srdit.train runs it on a GPU: its teacher and forward under
   bf16 autocast, here the CPU's given CUDA's per-op policy (bench/cuda_autocast.py), so the
   kernels see the dtypes they see on a GPU. Launch settings are
   the GPU's (SRDIT_LAUNCH=gpu, srdit/kernels/triton_utils.py: GPU tiles and warps, 4 programs per
   SM of a GPU_SM_COUNT-SM H100/H200). The DINOv2 teacher runs online, as by default, for its
   fused LayerNorms (tests/kernels/test_compile_check.py records the cached-teacher step too).
   --depth N records a model of N blocks instead of the preset's: the block kinds (block 0
   without value residual, dense with it, routed) are what differ, and 5 blocks have them all
   (the test checks that depth 5 and the full depth record one set of kernels).
2. Specialise. Each launch goes through triton's own argument binder for the target (what
   JITFunction.run does before it compiles): signature, constexprs, alignment attributes and
   options. srdit's kernels specialise on nothing that depends on the batch (batch-dependent
   integers are do_not_specialize; tiles follow the row width), so the batch of 2 recorded here
   compiles what batch 256 compiles (the test records two batches and compares).
3. Compile each distinct specialisation once per target with triton.compile (a fresh cache, so
   ptxas always runs); ptxas's own -v log (TRITON_DUMP_PTXAS_LOG) gives registers and spill
   bytes, the kernel's metadata its shared memory; resident warps per SM follow (RESOURCES).
4. Budget (--check exits 1 past it, naming kernel and figure): every specialisation compiles,
   spills nothing and uses at most 128 registers per thread, so that >= 16 warps stay resident
   per SM (a 4-warp program at 255 registers leaves 8: too few to hide memory latency in these
   memory-bound kernels). The GEMM kernels (GEMM_KERNELS, compute-bound) are allowed 255
   registers and 8 resident warps, one 8-warp program per SM; they spill nothing either.

The table: one row per specialisation and target; `pointers` has one letter per pointer argument
(f fp32, b bf16, h fp16, d fp64, l int64, i int32), `launches` counts the recorded launches.
Counts, not speed: a kernel that fits can still be slow; bench/kernels.py measures on a GPU.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# before triton or any kernel file is imported: compile (never interpret), GPU launch settings, and
# a fresh triton cache of this process's own, so that every compile runs ptxas and prints its log
os.environ.pop("TRITON_INTERPRET", None)
os.environ["SRDIT_LAUNCH"] = "gpu"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="srdit-compile-check-")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script: bench.*
from bench.common import (env_vars, flush_denormals, import_kernel_modules, table,  # noqa: E402
                          triton_launches_intercepted, write_json)
from bench.cuda_autocast import cuda_autocast_on_cpu  # noqa: E402

import_kernel_modules()  # compiled, before record_training builds a step under TRITON_INTERPRET=1

TARGETS = {"sm_90a": GPUTarget("cuda", 90, 32), "sm_100a": GPUTarget("cuda", 100, 32)}  # H100/H200, B200
PRESETS = ("sr-dit-b1-256", "sr-dit-b1-512")
BUDGET = {"max_registers": 128, "max_spill_bytes": 0, "min_warps_per_sm": 16}
# GEMMs (srdit/kernels/mlp.py) are compute-bound: one 8-warp program per SM keeps the tensor cores
# fed (triton_utils.GEMM_TILES); the budget is no spills, not occupancy
GEMM_KERNELS = {"_gemm_act_kernel"}
GEMM_BUDGET = {"max_registers": 255, "max_spill_bytes": 0, "min_warps_per_sm": 8}
# per SM on sm_90 and sm_100 (CUDA occupancy calculator): registers, allocation unit of a warp's
# registers, resident warps and programs, shared memory, and what the driver reserves per program
RESOURCES = {"registers": 65536, "register_unit": 256, "warps": 64, "programs": 32, "shared": 228 * 1024,
             "shared_reserved": 1024}


# --------------------------------------------------------------------------- 1. record


@dataclasses.dataclass(frozen=True)
class Spec:
    """One specialisation of one kernel for one target: what triton.compile is given."""

    module: str
    kernel: str
    target: str
    signature: tuple  # ((arg name, "*bf16" | "i32" | "fp32" | "constexpr"), ...)
    constexprs: tuple  # ((path, value), ...) as JITFunction._pack_args gives them
    attrs: tuple  # ((path, ((attribute, value), ...)), ...): alignment / divisibility
    options: tuple  # sorted (name, value) of the backend options (num_warps, num_stages, ...)

    def describe(self) -> dict:
        names = [name for name, _ in self.signature]
        constexprs = {names[path[0]]: value for path, value in self.constexprs}
        options = dict(self.options)
        pointers = [(n, t[1:]) for n, t in self.signature if t.startswith("*")]
        return {"kernel": self.kernel, "target": self.target, "num_warps": options["num_warps"],
                "constexprs": " ".join(_constexpr_text(k, v) for k, v in constexprs.items() if v is not False),
                "pointers": "".join(DTYPE_LETTERS.get(t, "?") for _, t in pointers),
                "dtypes": " ".join(f"{n}:{t}" for n, t in pointers),
                "divisible_by_16": " ".join(names[path[0]] for path, a in self.attrs if a)}


# the table's `pointers` column: one letter per pointer argument, in argument order
DTYPE_LETTERS = {"fp32": "f", "bf16": "b", "fp16": "h", "fp64": "d", "i64": "l", "i32": "i", "i8": "c", "u8": "u"}


def _constexpr_text(name, value) -> str:
    if value is True:
        return name
    if value is None:
        return f"{name}=None"
    return f"{name}={getattr(value, 'name', value)}"


class Recorder:
    """While active, a Triton launch records its specialisation for every target and runs nothing."""

    def __init__(self, targets):
        self.targets = {name: TARGETS[name] for name in targets}
        self.launches: dict[Spec, int] = {}  # specialisation -> launches seen
        self._binders = {}

    def _specs(self, fn: JITFunction, args, kwargs):
        for name, target in self.targets.items():
            key = (fn, name)
            if key not in self._binders:
                backend = make_backend(target)
                self._binders[key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
            backend, binder = self._binders[key]
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            yield Spec(fn.fn.__module__, fn.fn.__qualname__, name, tuple(signature.items()),
                       tuple(sorted(constexprs.items())),
                       tuple(sorted((path, tuple(map(tuple, a))) for path, a in attrs.items())),
                       tuple(sorted((k, v) for k, v in options.__dict__.items() if _hashable(v))))

    @contextlib.contextmanager
    def active(self):
        def record(fn, args, kwargs):  # nothing is launched: outputs keep whatever their allocation held
            for spec in self._specs(fn, args, kwargs):
                self.launches[spec] = self.launches.get(spec, 0) + 1

        with triton_launches_intercepted(record):
            yield self


def _hashable(v) -> bool:
    try:
        hash(v)
        return True
    except TypeError:
        return False


def _config(preset_name: str, batch: int, depth: int | None, extra=()):
    from srdit.config import apply_overrides, preset

    overrides = ["model.kernels=triton", f"train.global_batch={batch}", "train.compile=false",
                 "train.cuda_graphs=false", *extra]
    if depth is not None:
        overrides.append(f"model.depth={depth}")
    return apply_overrides(preset(preset_name), overrides)


def _precision(precision: str):
    """The GPU's autocast, on the CPU, with CUDA's per-op policy (see the module docstring, 1)."""
    if precision == "bf16":
        return cuda_autocast_on_cpu()
    return contextlib.nullcontext()


def record_training(recorder: Recorder, cfg, batch: int, precisions) -> None:
    """A routed and a path-dropped training step of cfg (forward, losses, backward, update) in
    each precision, then the sampler on the same model."""
    from srdit.model import build_model
    from srdit.train.assemble import build_step
    from srdit.train.inputs import build_teacher, synthetic_batch
    from srdit.train.loss import draw_step_noise

    device = torch.device("cpu")
    data = synthetic_batch(cfg, batch, device, cfg.data.cached_teacher)
    m = cfg.model
    noise = draw_step_noise(batch, (m.in_channels, m.input_size, m.input_size), m, cfg.train, device=device)
    for precision in precisions:
        # a step per precision, built as srdit.train builds it on a GPU: bf16 is its autocast
        # around the teacher and the forward (backward and optimizer outside it), and a teacher
        # whose GEMM weights build_step then stores in bf16
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        teacher, _ = build_teacher(cfg, device, random_init=True)
        # check_runtime allows Triton on the CPU only under the interpreter; nothing runs here
        with env_vars(TRITON_INTERPRET="1"):
            runner = build_step(cfg, model, teacher, device=device,
                                autocast=cuda_autocast_on_cpu if precision == "bf16" else None)
        with recorder.active():
            for path_drop in (False, True):
                runner.run([data], dataclasses.replace(noise, path_drop=path_drop))


def record_sampling(recorder: Recorder, cfg, batch: int, precisions) -> None:
    """One sampler step with path-drop guidance in each precision: the conditional model call (no
    routing) and the path-dropped unconditional one, as srdit.sample makes them (no grad). Every
    sampler and guidance makes these two calls or one of them (CFG batches both labels into one
    call without path drop); a step's calls are alike, so one step stands for all."""
    from srdit.config import apply_overrides
    from srdit.model import build_model
    from srdit.sample.generate import generate

    cfg = apply_overrides(cfg, ["sample.sampler=euler", "sample.num_steps=1", "sample.guidance=pdg",
                                "sample.guidance_scale=1.5"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    labels = torch.arange(batch) % cfg.model.num_classes
    for precision in precisions:
        with recorder.active(), _precision(precision):
            generate(model, cfg, labels)


def record_contract_ops(recorder: Recorder, cfg, batch: int, precisions) -> None:
    """The Triton ops of DESIGN.md's contract that the model does not launch (apply_rope: the
    model's RoPE runs inside attention_prologue), forward and backward at the model's shapes."""
    from srdit.kernels import apply_rope
    from srdit.model.sit import VisionRoPE

    m = cfg.model
    rope = VisionRoPE(m.head_dim, m.grid, m.rope_theta)
    ids = torch.arange(-int(m.reg_token), m.grid**2).expand(batch, -1)  # the model's rope_ids
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        x = torch.zeros(batch, m.num_tokens, m.heads, m.head_dim, dtype=dtype, requires_grad=True)
        with recorder.active():
            apply_rope(x, rope.freqs_cos, rope.freqs_sin, ids).sum().backward()


def record(presets, targets, precisions, *, batch: int = 2, depth: int | None = None, sampling: bool = True,
           extra=()) -> Recorder:
    recorder = Recorder(targets)
    with flush_denormals():  # uninitialised kernel outputs may hold denormals: slow CPU GEMMs
        for name in presets:
            cfg = _config(name, batch, depth, extra)
            record_training(recorder, cfg, batch, precisions)
            if sampling:
                record_sampling(recorder, cfg, batch, precisions)
                record_contract_ops(recorder, cfg, batch, precisions)
    return recorder




# --------------------------------------------------------------------------- 2.-3. compile


PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def compile_spec(spec: Spec) -> dict:
    """Compile one specialisation; its resources, or the error."""
    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, dict(spec.signature), dict(spec.constexprs), dict(spec.attrs)),
                                    target=TARGETS[spec.target], options=dict(spec.options))
    except Exception as error:  # reported per specialisation; the budget check fails on it
        root = error
        while root.__cause__ is not None:  # a jitted callee's error: the cause says what
            root = root.__cause__
        where = f"{type(error).__name__}: {error}".splitlines()[0]
        what = [line for line in f"{type(root).__name__}: {root}".splitlines() if line.strip()][-1]
        return {"error": " ... ".join(dict.fromkeys([where, what]))[:400]}
    out = {"compile_s": round(time.perf_counter() - start, 2), "shared": int(kernel.metadata.shared)}
    text = log.getvalue()
    for name, pattern in PTXAS.items():
        found = pattern.search(text)
        if found is None:
            return {"error": f"no '{name}' in the ptxas log: {text[-300:]!r}"}
        out[name] = int(found.group(1))
    out["spills"] = out["spill_stores"] + out["spill_loads"]
    out["warps_per_sm"] = resident_warps(out["registers"], dict(spec.options)["num_warps"], out["shared"])
    return out


def resident_warps(registers: int, num_warps: int, shared: int) -> int:
    """Warps resident per SM for programs of num_warps warps (the occupancy calculator's limits)."""
    r = RESOURCES
    per_warp = math.ceil(registers * 32 / r["register_unit"]) * r["register_unit"]
    programs = min(r["registers"] // per_warp // num_warps, r["warps"] // num_warps, r["programs"],
                   r["shared"] // (shared + r["shared_reserved"]))
    return programs * num_warps


def over_budget(row: dict) -> list[str]:
    """What of BUDGET a compiled specialisation misses, in words; [] when it fits."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    problems = []
    budget = GEMM_BUDGET if row["kernel"] in GEMM_KERNELS else BUDGET
    if row["registers"] > budget["max_registers"]:
        problems.append(f"{row['registers']} registers per thread > {budget['max_registers']}")
    if row["spills"] > budget["max_spill_bytes"]:
        problems.append(f"{row['spills']} bytes of spill stores + loads")
    if row["warps_per_sm"] < budget["min_warps_per_sm"]:
        problems.append(f"{row['warps_per_sm']} resident warps per SM < {budget['min_warps_per_sm']}")
    return problems


def compile_all(recorder: Recorder, jobs: int = 1) -> list[dict]:
    """One row per specialisation: its description, launches recorded and resources."""
    specs = sorted(recorder.launches, key=lambda s: (s.kernel, s.target, repr(s.constexprs), repr(s.signature)))
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(compile_spec, specs))
    else:
        results = [compile_spec(s) for s in specs]
    rows = []
    for spec, result in zip(specs, results):
        row = {**spec.describe(), "launches": recorder.launches[spec], **result}
        row["over_budget"] = "; ".join(over_budget(row))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- command line


def parse_gemm_tile(setting: str):
    """BMxBNxBK:WARPS:STAGES (bench/kernels.py's GEMM sweep candidates) -> triton_utils.GemmTile."""
    from srdit.kernels.triton_utils import GemmTile

    try:
        block, warps, stages = setting.split(":")
        bm, bn, bk = (int(v) for v in block.split("x"))
        return GemmTile(bm, bn, bk, warps=int(warps), stages=int(stages))
    except ValueError:
        raise ValueError(f"{setting!r} is not BMxBNxBK:WARPS:STAGES (e.g. 128x128x64:8:3)") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=list(PRESETS))
    parser.add_argument("--target", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--depth", type=int, default=None, help="blocks of the recorded model (default: the preset's)")
    parser.add_argument("--batch", type=int, default=2, help="recorded batch (> 1; specialisations do not depend on it)")
    parser.add_argument("--step-only", action="store_true", help="record the training step only (no sampler, no contract ops)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--json", default=None)
    parser.add_argument("--check", action="store_true", help="exit 1 if a specialisation misses the budget")
    parser.add_argument("--record-only", action="store_true",
                        help="list the specialisations (one JSON row each, with launches), compile nothing")
    parser.add_argument("--extra", nargs="*", default=[], help="config overrides for the recorded model (key=value)")
    parser.add_argument("--tiles", nargs="*", default=[], metavar="KERNEL=ELEMENTS:WARPS",
                        help="GPU launch settings other than triton_utils.GPU_TILES' (a sweep candidate); "
                             "a GEMM of GEMM_TILES takes BMxBNxBK:WARPS:STAGES")
    args = parser.parse_args(argv)
    from srdit.kernels import triton_utils

    for item in args.tiles:
        kernel, _, setting = item.partition("=")
        if kernel in triton_utils.GEMM_TILES:
            try:
                triton_utils.GEMM_TILES[kernel] = parse_gemm_tile(setting)
            except ValueError as error:
                parser.error(f"--tiles {item}: {error}")
            continue
        if kernel not in triton_utils.GPU_TILES:
            parser.error(f"--tiles {item}: {kernel!r} is not one of "
                         f"{', '.join([*triton_utils.GPU_TILES, *triton_utils.GEMM_TILES])}")
        elements, _, warps = setting.partition(":")
        triton_utils.GPU_TILES[kernel] = triton_utils.Tile(int(elements), int(warps or 4))

    start = time.perf_counter()
    recorder = record(args.preset, args.target, args.precision, batch=args.batch, depth=args.depth,
                      sampling=not args.step_only, extra=args.extra)
    recorded_s = time.perf_counter() - start
    if args.record_only:
        rows = [{**spec.describe(), "launches": n} for spec, n in recorder.launches.items()]
        write_json(args.json, {"rows": rows}, quiet=True)
        print(f"{len(rows)} specialisations recorded in {recorded_s:.0f} s")
        return 0
    rows = compile_all(recorder, args.jobs)
    compiled_s = time.perf_counter() - start - recorded_s
    columns = ["kernel", "target", "num_warps", "pointers", "constexprs", "registers", "spills", "shared",
               "warps_per_sm", "launches", "over_budget", "error"]
    print(table(rows, columns))
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(rows)} specialisations "
          f"({len({(r['kernel'], r['constexprs'], r['dtypes'], r['num_warps']) for r in rows})} per target) of "
          f"{len({r['kernel'] for r in rows})} kernels; recorded in {recorded_s:.0f} s, compiled in {compiled_s:.0f} s")
    from srdit.runinfo import environment

    write_json(args.json, {**environment(torch.device("cpu")), "presets": args.preset, "targets": args.target,
                           "precisions": args.precision, "depth": args.depth, "batch": args.batch,
                           "budget": BUDGET, "gemm_budget": GEMM_BUDGET, "resources": RESOURCES, "rows": rows})
    failing = [r for r in rows if r["over_budget"]]
    for r in failing:
        print(f"OVER BUDGET {r['kernel']} [{r['target']}, {r['num_warps']} warps, {r['constexprs']}; "
              f"{r['dtypes']}]: {r['over_budget']}")
    if not failing:
        print(f"all {len(rows)} specialisations within budget: {BUDGET}; GEMMs ({sorted(GEMM_KERNELS)}): {GEMM_BUDGET}")
    return 1 if failing and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

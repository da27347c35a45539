"""The training step, put together in one place (STYLE 7; torchtitan's parallelize.py): the
run-time checks, then the wrappers around the model in one fixed order. `srdit.train`,
bench/throughput.py, profiling/profile_step.py and the tests all get their step from
`build_step`, so what is measured and tested is what trains.

Order, and why:
  0. The parameters become views of one flat buffer laid out in gradient-ready order
     (srdit.train.flat.flatten_for_training), before the EMA and the optimizers see them: the
     EMA's update is then one kernel for the whole model, and the gradients become views of a
     buffer of the same layout (FlatGradients). srdit.train makes its EMA before build_step, so
     it flattens first too.
  1. Several ranks: rank 0's weights and EMA are broadcast (as DDP does at construction), and
     srdit's own reducer (srdit.train.reduce) sums the flat gradients chunk by chunk during the
     last backward. No DDP: it would copy every gradient into buckets each step, and the model's
     only buffers (RoPE tables, position ids) are constants, so nothing is re-broadcast either.
  2. attention_backend=auto is resolved (timed on rank 0, its choice broadcast: every rank runs
     the same kernels) for the step's shapes, the teacher's GEMM weights are stored in bf16 under
     bf16 autocast (which casts them at every call otherwise), then torch.compile around the
     model; the frozen teacher (~36% of a step's FLOPs) is compiled too.
  3. CUDA graphs around the whole step (forward, losses, backward, reduction, clip, AdamW, EMA),
     outermost: they replay whatever the inner layers launch.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from srdit import distributed
from srdit.config import Config, ConfigError
from srdit.kernels.attention import remember_auto, resolve_auto_for
from srdit.train import graphs
from srdit.train.flat import FlatGradients, ShardLayout, flat_buffer, flatten_for_training
from srdit.train.optim import EMA, Optimizers
from srdit.train.reduce import CHUNKS, GradReducer
from srdit.train.step import StepRunner, step_autocast

GPU_ONLY_ATTENTION = ("cudnn", "flash", "fa3", "fa4", "xformers")


def check_runtime(cfg: Config, device: torch.device, world: int, *, graph_type=None) -> None:
    """Every check that needs to know where the run runs (the config alone is checked in
    srdit.config); each failure is a ConfigError that says what to change. graph_type: a
    stand-in for CUDA graphs (tests), which lifts the need for a GPU."""
    if cfg.model.kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("model.kernels=triton needs a CUDA GPU (TRITON_INTERPRET=1 runs it on the CPU, for tests "
                          "only); use model.kernels=eager here")
    if cfg.model.attention_backend in GPU_ONLY_ATTENTION and device.type != "cuda":
        raise ConfigError(f"model.attention_backend={cfg.model.attention_backend} needs a CUDA GPU; use sdpa or "
                          "eager here")
    t = cfg.train
    if t.global_batch % (world * t.grad_accum):
        raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by {world} rank(s) x "
                          f"train.grad_accum={t.grad_accum}: choose a global batch that is, or another grad_accum")
    if cfg.train.cuda_graphs and graph_type is None:
        try:
            graphs.default_graph_type(device)  # the GPU's, or the stand-in the tests put in its place
        except ValueError as error:
            raise ConfigError(str(error)) from None


def build_step(cfg: Config, model: torch.nn.Module, teacher: torch.nn.Module | None, *, device: torch.device,
               rank: int = 0, world: int = 1, optimizers=None, ema: EMA | None = None,
               compile_backend: str = "inductor", graph_type=None, autocast=None, reduce: bool | None = None):
    """The step of `cfg` for `model` (unwrapped, on `device`): a StepRunner, or a GraphedStep
    with train.cuda_graphs; either has `.run(micro_batches, noise)`, `.model`, `.ema` and
    `.optimizers`. optimizers/ema: built from cfg.train when None. compile_backend: torch.compile's
    backend (tests use "aot_eager"); graph_type: what captures graphs (None: CUDA; tests pass
    srdit.train.graphs.EagerReplay); autocast: a context factory for the teacher and the forward
    (None: srdit.train.step.step_autocast; bench/traffic.py gives CUDA's bf16 policy on the CPU);
    reduce: sum the gradients over the default process group (None: with several ranks; the GPU
    check forces it on one rank, whose communicator captures as eight do)."""
    check_runtime(cfg, device, world, graph_type=graph_type)
    autocast = autocast if autocast is not None else step_autocast(cfg, device)
    bf16 = autocast is not None  # every autocast the step runs under is bf16 (step_autocast)
    attention = resolve_attention(cfg, device, rank, world, bf16)
    if teacher is not None and bf16:
        teacher.precast_gemm_weights(torch.bfloat16)  # autocast would cast them at every call; same values
    if ema is None:  # before the EMA sees the weights (optimizers keep the same Parameter objects)
        flatten_for_training(model, cfg, world)
    if optimizers is not None:  # sharded when srdit.train built its optimizer so (with shard_layout)
        shards = optimizers.layout if optimizers.sharded else None
    else:
        shards = shard_layout(cfg, model, rank, world)
    optimizers = optimizers if optimizers is not None else Optimizers(model, cfg.train, device, shards)
    ema = ema if ema is not None else EMA(model, cfg.train.ema_decay, cfg.train.ema_update, shards)
    grads, reducer = FlatGradients(model), None
    if reduce is None:
        reduce = world > 1
    if reduce:
        with torch.no_grad():  # every rank starts from rank 0's weights, as DDP makes sure
            for flat in (flat_buffer(model), flat_buffer(ema.model)):
                dist.broadcast(flat, src=0)
        fixed = cfg.train.reduce_order == "fixed"
        # the fixed order sums pieces by an all-to-all: it needs the pieces even when the
        # optimizer is not sharded (then the sums are gathered back)
        pieces = shards if shards is not None or not fixed else ShardLayout(model, rank, world, CHUNKS)
        reducer = GradReducer(grads, dtype=cfg.train.grad_reduce_dtype, layout=pieces,
                              order=cfg.train.reduce_order, gather_back=fixed and shards is None)
    # AdamW over flat weights reads its runs' gradients from the buffer (sharded: the shard)
    optimizers.attach_gradients(reducer.shard if shards is not None else grads.buffer)
    train_model = model
    if cfg.train.compile:
        mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
        train_model = torch.compile(train_model, mode=mode, backend=compile_backend)
        if teacher is not None:
            teacher = torch.compile(teacher, mode=mode, backend=compile_backend)
    runner = StepRunner(cfg, model, train_model, teacher, optimizers, ema, rank=rank, world=world, device=device,
                        autocast=autocast, grads=grads, reducer=reducer)
    if cfg.train.cuda_graphs:
        runner = graphs.GraphedStep(runner, graph_type=graph_type)
    runner.attention = attention  # for the training log
    return runner


def shard_layout(cfg: Config, model: torch.nn.Module, rank: int, world: int) -> ShardLayout | None:
    """train.shard_optimizer resolved, in one place (srdit.train builds its optimizer and EMA with
    it before build_step): each rank updates 1/world of the weights with AdamW. auto (the
    default) shards whenever several ranks train with AdamW: the update's bytes per rank fall by
    the world size at no extra communication (a reduce-scatter and an all-gather move what an
    all-reduce moves), and the gather hides behind the teacher's forward (docs/training.md)."""
    t = cfg.train
    if world == 1 or t.shard_optimizer == "false" or t.optimizer != "adamw":
        return None
    return ShardLayout(model, rank, world, CHUNKS)


def resolve_attention(cfg: Config, device: torch.device, rank: int, world: int, bf16: bool) -> str:
    """model.attention_backend, with `auto` resolved now for the step's attention shapes (all
    tokens, and the kept ones of routed blocks), before the model is compiled or captured: a
    trace cannot time candidates. Returns what the training log says about it."""
    m, backend = cfg.model, cfg.model.attention_backend
    if backend != "auto":
        return backend
    micro = cfg.train.global_batch // world // cfg.train.grad_accum
    tokens = [m.num_tokens] + ([m.num_kept] if m.sprint and m.routed_depth else [])
    shapes = [(micro, m.heads, n, m.head_dim) for n in tokens]
    dtype = torch.bfloat16 if bf16 else torch.float32
    # timed on rank 0 only and broadcast: ranks that timed on their own could round a close race
    # differently, and then run different kernels (and capture different graphs)
    chosen = resolve_auto_for(shapes, dtype, device) if rank == 0 else None
    chosen = distributed.broadcast_object(chosen)
    remember_auto(chosen, dtype, device)
    return "auto: " + ", ".join(f"{n} tokens -> {chosen[shape]}" for n, shape in zip(tokens, shapes))

"""One rank of the multi-rank step tests (tests/train/test_ranks.py), launched as torchrun launches
srdit.train (`python -m torch.distributed.run --standalone --nproc_per_node=N rank_worker.py ...`),
or alone as one process. Runs the scenarios named on the command line on a tiny quickstart model
with gloo and saves what the tests compare to OUT/rank<R>.pt.

Scenarios:
  train:ACCUM:GRAPHS:DTYPE[:shard=..:clip=..:order=..:save=NAME@STEP:load=NAME:start=N:steps=N]
                            steps of build_step's step (the global batch split over the ranks and
                            ACCUM micro-batches; EagerReplay graphs when GRAPHS=1; the gradient
                            sum in DTYPE; train.shard_optimizer, train.grad_clip,
                            train.reduce_order), both path-drop branches: per-step values, final
                            model, EMA and optimizer state (as a checkpoint holds them), gradient
                            addresses, the collectives issued; save/load a checkpoint of model,
                            EMA and optimizer in OUT
  ddp DTYPE                 one backward reduced by srdit's reducer and by torch's DDP, and each
                            rank's own unreduced gradient (for the bf16 bound)
"""
import os
import sys

import torch
import torch.distributed as dist

from srdit.config import apply_overrides, preset
from srdit.model import build_model
from srdit.train.assemble import build_step
from srdit.train.flat import FlatGradients, flat_view, flatten_for_training
from srdit.train.graphs import EagerReplay
from srdit.train.inputs import synthetic_batch
from srdit.train.loss import diffusion_loss, draw_step_noise
from srdit.train.reduce import GradReducer

TINY = ["model.hidden=32", "model.heads=2", "model.depth=5", "model.projector_dim=32", "train.path_drop_prob=0.5",
        "train.lr_decay_steps=0", "train.global_batch=8", "model.kernels=eager"]
STEPS = 4  # host coins with seed 7 at p=0.5 give both branches in 4 steps (checked by the tests)
COLLECTIVES = ("all_reduce", "broadcast", "barrier", "all_gather_object", "broadcast_object_list", "all_gather",
               "reduce_scatter_tensor", "all_gather_into_tensor", "reduce_scatter_single", "all_gather_single",
               "all_to_all_single")


class CollectiveLog:
    """Every torch.distributed collective called through the module (name, shape, dtype), in order."""

    def __init__(self):
        self.calls, self.saved = [], {}

    def __enter__(self):
        for name in COLLECTIVES:
            real = getattr(dist, name)
            self.saved[name] = real

            def record(*args, _name=name, _real=real, **kwargs):
                t = args[0] if args and torch.is_tensor(args[0]) else None
                self.calls.append((_name, tuple(t.shape) if t is not None else None, str(t.dtype) if t is not None else None))
                return _real(*args, **kwargs)

            setattr(dist, name, record)
        return self

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(dist, name, real)


def global_batches(cfg, steps, device):
    """Per step: the global batch (every rank draws it and takes its rows) and the step's noise."""
    data, noise_gen, host = (torch.Generator().manual_seed(5), torch.Generator().manual_seed(6),
                             torch.Generator().manual_seed(7))
    G, m = cfg.train.global_batch, cfg.model
    for _ in range(steps):
        batch = synthetic_batch(cfg, G, device, cached=True, generator=data)
        noise = draw_step_noise(G, (m.in_channels, m.input_size, m.input_size), m, cfg.train, generator=noise_gen,
                                host_generator=host, device=device)
        yield batch, noise


def train(rank, world, accum, graphs, dtype, *, shard="false", clip=None, save=None, load=None, start=0,
          steps=STEPS, order="library", out="."):
    """`steps` steps of build_step's step from step `start` (the data and noise of the steps
    before are drawn and skipped; `load`: the checkpoint file they left, in out/), the checkpoint
    saved to out/`save`=NAME@STEP after that step (all ranks take part: gathers)."""
    overrides = [*TINY, f"train.grad_accum={accum}", f"train.cuda_graphs={graphs}", f"train.grad_reduce_dtype={dtype}",
                 f"train.shard_optimizer={shard}", f"train.reduce_order={order}"] + ([f"train.grad_clip={clip}"] if clip else [])
    cfg = apply_overrides(preset("quickstart"), overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    step = build_step(cfg, model, None, device=torch.device("cpu"), rank=rank, world=world,
                      graph_type=EagerReplay if graphs else None)
    runner = step.runner if graphs else step
    if load:
        sd = torch.load(os.path.join(out, load), weights_only=True)
        model.load_state_dict(sd["model"])
        runner.ema.load_state_dict(sd["ema"])
        runner.optimizers.load_state_dict(sd["optimizer"])
    micro = cfg.train.global_batch // world // accum
    values, coins, addresses = [], [], []
    with CollectiveLog() as log:
        for index, (batch, noise) in enumerate(global_batches(cfg, start + steps, torch.device("cpu"))):
            if index < start:
                continue
            first = rank * micro * accum
            micro_batches = [{k: v[first + i * micro: first + (i + 1) * micro] for k, v in batch.items()}
                             for i in range(accum)]
            out_values = step.run(micro_batches, noise)
            if world > 1:  # the global batch's values, as DeviceMetrics logs them
                out_values = {k: v.clone() for k, v in out_values.items()}
                dist.all_reduce(out_values["loss"])
                out_values["loss"] /= world
            values.append({k: v.clone() for k, v in out_values.items()})
            coins.append(noise.path_drop)
            addresses.append([p.grad.data_ptr() for p in runner.grads.params])
            if save and index + 1 == int(save.split("@")[1]):
                state = checkpoint_of(model, runner)
                if rank == 0:
                    torch.save(state, os.path.join(out, save.split("@")[0]))
    state = checkpoint_of(model, runner)
    return {"values": values, "coins": coins, "addresses": addresses, "collectives": log.calls,
            "views": [runner.grads.view_of(p).data_ptr() for p in runner.grads.params],
            "model": state["model"], "ema": state["ema"],
            "optimizer": [state["optimizer"][0]["state"][i] for i in sorted(state["optimizer"][0]["state"])],
            "launch_order": list(runner.reducer.launch_order) if runner.reducer else [],
            "sharded": runner.reducer is not None and runner.reducer.shard is not None}


def checkpoint_of(model, runner) -> dict:
    """What TrainState.state_dict puts in a checkpoint of these (a collective when sharded)."""
    runner.optimizers.gather_weights()
    runner.ema.gather()
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "ema": {k: v.clone() for k, v in runner.ema.state_dict().items()},
            "optimizer": runner.optimizers.state_dict()}


def ddp(rank, world, dtype):
    cfg = apply_overrides(preset("quickstart"), [*TINY, "train.path_drop_prob=0"])
    torch.manual_seed(0)
    ours = flatten_for_training(build_model(cfg), cfg)
    theirs = build_model(cfg)
    theirs.load_state_dict(ours.state_dict())
    batch, noise = next(global_batches(cfg, 1, torch.device("cpu")))
    micro = cfg.train.global_batch // world
    rows = slice(rank * micro, (rank + 1) * micro)

    def loss(model):
        total, _ = diffusion_loss(model, batch["latent"][rows], batch["label"][rows], batch["teacher"][rows],
                                  noise.rows(rows.start, rows.stop), cfg.train, kernels="eager")
        return total

    grads = FlatGradients(ours)
    loss(ours).backward()
    own = grads.buffer.clone()  # this rank's gradient, not divided
    grads.zero()
    reducer = GradReducer(grads, dtype=dtype)
    reducer.arm()
    (loss(ours) / world).backward()
    reducer.finish()
    wrapped = torch.nn.parallel.DistributedDataParallel(theirs, gradient_as_bucket_view=True)
    loss(wrapped).backward()
    return {"ours": {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad},
            "ddp": {n: p.grad.clone() for n, p in theirs.named_parameters() if p.requires_grad},
            "own": own, "reduced": grads.buffer.clone(), "flat_params": flat_view(list(ours.parameters())) is not None}


def main(out, *scenarios):
    torch.set_num_threads(1)  # CPU reductions split by thread count: every process alike
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    results = {}
    for spec in scenarios:
        name, *args = spec.split(":")
        if name == "train":  # train:ACCUM:GRAPHS:DTYPE[:key=value ...] (train()'s keywords)
            extra = dict(a.split("=", 1) for a in args[3:])
            for key in ("start", "steps"):
                if key in extra:
                    extra[key] = int(extra[key])
            results[spec] = train(rank, world, int(args[0]), args[1] == "1", args[2], out=out, **extra)
        elif name == "ddp":
            results[spec] = ddp(rank, world, args[0])
        else:
            raise SystemExit(f"unknown scenario {spec}")
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The whole training step as CUDA graphs: teacher, forward, losses, backward, clip, fused AdamW
and EMA replayed with one launch per step (`train.cuda_graphs=true`).

A step can be captured because nothing in it reads the GPU on the host (tests/train/
test_host_sync.py) and no shape changes: SPRINT keeps a fixed K tokens per sample. The path-drop
coin, drawn on the host, picks one of two graphs (routed blocks run or skipped); they share one
memory pool, which is safe because replays never overlap and every temporary of a graph is
written before it is read. (One graph's outputs may lie in the other's temporaries: they are
valid until the next step, whichever graph it replays.)

Capture follows PyTorch's whole-network recipe. On its first call, GraphedStep runs `warmup`
ordinary steps of each branch on a side stream, so that everything that must not happen during
capture happens there (compilation, Triton autotuning, the attention backend's choice, optimizer
state, cuBLAS workspaces), captures both graphs, then puts the model, the EMA and the optimizer
state back as they were: the run's trajectory is the one without graphs, from its first step.
Inputs (the batch and the step's noise) are copied into static buffers before each replay; the
values returned are the graph's static outputs, overwritten by the next step, so read or
accumulate them before then (DeviceMetrics does). The eager steps and the replays compute the
same thing in the same order; only launch overhead goes.

Several ranks (torchrun): every rank captures its own step, the gradient reduction inside it
(srdit.train.reduce: each chunk's all_reduce is a captured NCCL kernel), as MLPerf and Megatron
capture theirs (shared/MULTI_GPU.md). What that needs, and where it is done:
  - NCCL's async error handling off before the process group starts (srdit.distributed.setup,
    asked by srdit.train when train.cuda_graphs is on with several ranks);
  - the communicator made and used before capture: the warm-up steps run the reduction eagerly;
    then every rank synchronises its GPU and meets the others at a barrier, before and after
    capture (no collective of a warm-up in flight while another rank captures);
  - the same graph replayed on every rank: the path-drop coin comes from the host generator,
    seeded alike on every rank, so every rank picks the same branch with no exchange;
  - no host collective inside: metrics and checkpoints exchange outside the step, and one tried
    during capture is an error that says so (srdit.distributed.refuse_in_capture).

AdamW only (srdit.train.assemble.check_runtime and srdit.config say so): Muon and Prodigy read
the skip flag on the host.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from srdit import distributed
from srdit.train.loss import StepNoise

WARMUP_STEPS = 3  # eager steps per branch before its capture


class CudaGraph:
    """One captured step on the GPU: `capture(fn)` records fn's kernels without running them and
    keeps its outputs as static tensors; `replay()` runs the kernels again."""

    def __init__(self, pool):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.outputs = None

    def capture(self, fn) -> None:
        # thread_local: the data loader's threads may still allocate (pinned memory) meanwhile
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"), distributed.capturing():
            self.outputs = fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerReplay:
    """The stand-in for CudaGraph where CUDA graphs do not exist (the CPU tests): capture records
    fn without running it, replay runs it and copies its values into the same static outputs.
    It checks what surrounds capture (static inputs, branch choice, warm-up), not capture itself."""

    def __init__(self, pool=None):
        self.fn = None
        self.outputs = None

    def capture(self, fn) -> None:
        self.fn = fn

    def replay(self) -> None:
        with distributed.capturing():  # fn is what a real graph would hold: no host collective in it
            values = self.fn()
        if self.outputs is None:
            self.outputs = {k: v.clone() for k, v in values.items()}
        else:
            for k, v in values.items():
                self.outputs[k].copy_(v)


def default_graph_type(device: torch.device):
    if device.type != "cuda":
        raise ValueError(f"train.cuda_graphs needs a CUDA device, not {device}")
    return CudaGraph


def _copy_into(static: torch.Tensor | None, value: torch.Tensor | None, name: str) -> None:
    if (static is None) != (value is None):
        raise ValueError(f"CUDA-graph step: {name} was {'absent' if static is None else 'present'} when the step "
                         "was captured and is not now")
    if static is None:
        return
    if static.shape != value.shape or static.dtype != value.dtype:
        raise ValueError(f"CUDA-graph step: {name} is {tuple(value.shape)} {value.dtype}, but the captured step takes "
                         f"{tuple(static.shape)} {static.dtype}; a graph replays fixed shapes (drop the last partial "
                         "batch, or run without train.cuda_graphs)")
    static.copy_(value, non_blocking=True)


class GraphedStep:
    """StepRunner.run as CUDA graphs, one per path-drop branch; same arguments, same results."""

    def __init__(self, runner, *, warmup: int = WARMUP_STEPS, graph_type=None):
        graph_type = graph_type or default_graph_type(runner.device)
        if not runner.optimizers.device_skip:
            raise ValueError("train.cuda_graphs needs train.optimizer=adamw: the other optimizers read the "
                             "non-finite-step flag on the host, which a graph cannot")
        if graph_type is CudaGraph and not runner.optimizers.capturable:
            raise ValueError("the optimizers were built without train.cuda_graphs=true (AdamW capturable)")
        self.runner, self.warmup, self.graph_type = runner, warmup, graph_type
        self.model, self.ema, self.optimizers = runner.model, runner.ema, runner.optimizers
        self.pool = torch.cuda.graph_pool_handle() if graph_type is CudaGraph else None
        self.side_stream = torch.cuda.Stream(runner.device) if runner.device.type == "cuda" else None
        # without SPRINT path drop changes nothing, so one graph serves both coins
        cfg = runner.cfg
        self.branches = (False, True) if cfg.model.sprint and cfg.train.path_drop_prob > 0 else (False,)
        self.graphs: dict[bool, object] = {}  # path_drop -> captured graph
        self.batches: list[dict] | None = None  # static inputs shared by both graphs
        self.noise: StepNoise | None = None

    def run(self, micro_batches: list[dict], noise: StepNoise) -> dict[str, torch.Tensor]:
        if not self.graphs:
            self.prime(micro_batches, noise)
        self._load(micro_batches, noise)
        graph = self.graphs[noise.path_drop and len(self.branches) == 2]
        graph.replay()
        return graph.outputs

    def prime(self, micro_batches: list[dict], noise: StepNoise) -> None:
        """Warm up and capture both branches on these inputs (their noise, either coin), then
        restore the training state: no step has happened as far as the run is concerned."""
        saved = {id(t): (t, t.clone()) for t in self._training_state()}
        self.batches = [{k: torch.empty_like(v) for k, v in b.items()} for b in micro_batches]
        self.noise = noise.map_tensors(torch.empty_like)
        for branch in self.branches:
            for _ in range(self.warmup):
                self._eager(micro_batches, dataclasses.replace(noise, path_drop=branch))
            graph = self.graph_type(self.pool)
            static_noise = dataclasses.replace(self.noise, path_drop=branch)
            self._all_ranks_idle()
            try:
                graph.capture(lambda noise=static_noise: self.runner.run(self.batches, noise))
            except Exception as error:
                raise RuntimeError(f"capturing the training step (path_drop={branch}) as a CUDA graph failed: "
                                   f"{type(error).__name__}: {error}. Train without train.cuda_graphs, and "
                                   "please report it with this traceback") from error
            self._all_ranks_idle()
            self.graphs[branch] = graph
        with torch.no_grad():
            for t in self._training_state():  # in place: the graphs hold these addresses
                if id(t) in saved and saved[id(t)][0] is t:
                    t.copy_(saved[id(t)][1])
                else:  # state the warm-up created: AdamW's state before its first step is all zeros
                    t.zero_()

    def _all_ranks_idle(self) -> None:
        """Nothing in flight on this GPU and every rank here: a warm-up's collective still running
        while another rank captures can deadlock NCCL (TensorRT-LLM PR #12462)."""
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        if self.runner.world > 1:
            distributed.barrier()

    def _training_state(self) -> list[torch.Tensor]:
        """Every tensor a step writes: parameters, EMA weights, optimizer state."""
        r = self.runner
        tensors = [*r.model.parameters(), *r.ema.model.parameters()]
        for opt in r.optimizers.optimizers:
            tensors += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
        return tensors

    def _eager(self, micro_batches, noise) -> None:
        with warnings.catch_warnings():  # AdamW(capturable=True) warns when it steps uncaptured
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            if self.side_stream is None:
                self.runner.run(micro_batches, noise)
                return
            current = torch.cuda.current_stream(self.runner.device)
            self.side_stream.wait_stream(current)
            with torch.cuda.stream(self.side_stream):
                self.runner.run(micro_batches, noise)
            current.wait_stream(self.side_stream)

    def _load(self, micro_batches, noise) -> None:
        if len(micro_batches) != len(self.batches):
            raise ValueError(f"CUDA-graph step: {len(micro_batches)} micro-batches, captured with {len(self.batches)}")
        for i, (static, batch) in enumerate(zip(self.batches, micro_batches)):
            if static.keys() != batch.keys():
                raise ValueError(f"CUDA-graph step: micro-batch {i} has {sorted(batch)}, "
                                 f"captured with {sorted(static)}")
            for k in static:
                _copy_into(static[k], batch[k], f"micro-batch {i} {k!r}")
        for f in StepNoise.TENSORS:
            _copy_into(getattr(self.noise, f), getattr(noise, f), f"noise.{f}")

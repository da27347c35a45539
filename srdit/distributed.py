"""Process-group setup for the torchrun-able commands (srdit.train, srdit.sample, srdit.data.prepare;
each also runs as plain `python -m ...` in one process).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; its c10d rendezvous makes multi-node work with
no code here. NCCL on GPUs, gloo on CPUs, and beside either a small gloo group for host flags
(CPU tensors, so exchanging them never waits for the GPU): StepVote, any_rank.

Ranks agree, or stop together: rank 0's own work (a lock, the run folder's files) runs through
on_main, which hands its result or its error to every rank, so no rank waits at a collective for
one that has failed; locked_output checks that every rank sees the output rank 0 holds.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from srdit.io import OutputInUse, OutputLock, describe_error


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    timeout: float | None = None  # seconds a collective waits for the other ranks (None: torch's default)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class OutputNotShared(RuntimeError):
    """The ranks of one command do not see the same output folder."""


_host_group = None  # the gloo group beside the main one (setup)


def _waiting(timeout: float | None) -> dict:
    return {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}


def setup(*, timeout: float | None = None, capture_collectives: bool = False) -> Dist:
    """This process's rank and device; with several ranks, the process group and the host group
    beside it. Settings that must be known before the group starts are keywords, which a
    command passes through run_command's `setup_options`: `timeout`, the seconds any collective
    waits for the other ranks before it fails (None: torch's default, 30 min on gloo, 10 on NCCL);
    `capture_collectives`, CUDA graphs will hold NCCL collectives (allow_collective_capture)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if capture_collectives and device.type == "cuda":
            allow_collective_capture()
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **_waiting(timeout))
        host_group(timeout)
    return Dist(rank, world, local_rank, device, timeout)


def allow_collective_capture() -> None:
    """What NCCL needs before its process group starts for a CUDA graph to hold collectives:
    PyTorch's async error handling off (its CUDA-graph notes, "Usage with DistributedDataParallel";
    MLPerf's captured steps set it too), unless the user chose a value. Without it the error
    handler may query or abort work that a graph owns. The cost: a collective that never completes
    is no longer torn down by the process group's timeout (a hung graphed run hangs until killed:
    SLURM's time limit or the user)."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")


_capturing = False


@contextlib.contextmanager
def capturing():
    """The block records a CUDA-graph step (srdit.train.graphs): a host collective in it is an
    error (refuse_in_capture), as on a real capture stream, also where the CPU stand-in records."""
    global _capturing
    before, _capturing = _capturing, True
    try:
        yield
    finally:
        _capturing = before


def refuse_in_capture(what: str) -> None:
    """A host collective (barrier, objects, a CPU flag) inside a captured step would run once, at
    capture, and never at replay: the ranks would then disagree on what was exchanged. Say so."""
    if _capturing or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        raise RuntimeError(f"{what} is a host collective and cannot run inside the captured training step (CUDA "
                           "graphs replay device work only): do it before or after the step, as metrics and "
                           "checkpoints do")


def barrier() -> None:
    refuse_in_capture("distributed.barrier")
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one outside torchrun)."""
    refuse_in_capture("distributed.all_gather_objects")
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    refuse_in_capture("distributed.broadcast_object")
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def host_group(timeout: float | None = None):
    """The gloo group for host flags, beside the main one (None alone). setup makes it; where the
    process group was started elsewhere, the first call makes it, so every rank must make that
    call at the same point (it is a collective)."""
    global _host_group
    if _host_group is None and dist.is_initialized():
        _host_group = dist.new_group(backend="gloo", **_waiting(timeout))
    return _host_group


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a collective of a CPU tensor: no GPU wait)."""
    refuse_in_capture("distributed.any_rank")
    group = host_group()
    if group is None:
        return flag
    box = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
    return bool(box.item())


class StepVote:
    """A flag that every rank reads at the same step: each rank casts its own after every step,
    and each cast returns whether any rank had raised its flag by the previous cast. The flags
    are combined by an all_reduce(MAX) of a CPU tensor on the host group, started at one cast and
    waited for at the next, so its latency hides behind a step and nothing waits inside one.
    Alone, a cast returns the flag at once. Why: SLURM signals the nodes of a job at different
    moments, and a rank that stopped a step before the others would leave them in collectives it
    never joins."""

    def __init__(self):
        self.pending = None

    def cast(self, flag: bool) -> bool:
        if host_group() is None:
            return flag
        agreed = self.close()
        box = torch.tensor([int(flag)], dtype=torch.int32)
        self.pending = (dist.all_reduce(box, op=dist.ReduceOp.MAX, group=host_group(), async_op=True), box)
        return agreed

    def close(self) -> bool:
        """Wait for the vote in flight, if any (every rank, before the process group goes); True
        when it said stop."""
        if self.pending is None:
            return False
        (work, box), self.pending = self.pending, None
        work.wait()
        return bool(box.item())


def on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 alone: every rank returns its result or raises the exception
    it raised, so no rank waits at a later collective for a rank 0 that failed. The result and
    the exception travel pickled."""
    result = error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as raised:  # handed to every rank below
            error = raised
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def teardown(*, wait: bool = True) -> None:
    """Destroy the process group; with `wait`, only once every rank got here: a rank that
    destroyed its group while another still worked (rank 0 drawing samples) sometimes aborted
    in gloo at exit ("terminate called without an active exception")."""
    global _host_group
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
    _host_group = None


def collective_failed(error: BaseException) -> bool:
    """True for what torch raises when a collective fails: no answer from another rank within the
    timeout, or its process ended (NCCL's DistBackendError; gloo's plain RuntimeError)."""
    text = str(error)
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and ("gloo" in text or "NCCL" in text))


def describe_collective_failure(error: BaseException, me: Dist, timeout_setting: str | None = None) -> str:
    """One line for a failed collective: this rank, torch's own words (which name the rank that
    stopped answering when torch knows it), and what to do."""
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if said.startswith("[") and "] " in said:  # gloo's source location
        said = said.split("] ", 1)[1]
    within = f" within the process-group timeout ({me.timeout:g} s)" if me.timeout else ""
    setting = f" ({timeout_setting})" if timeout_setting else ""
    return (f"rank {me.rank} of {me.world}: a collective with the other ranks failed (torch: {said}): another rank "
            f"stopped answering{within} or ended, and its own log says why; if it was only slow (a long checkpoint "
            f"write, a compilation), raise the timeout{setting}")


def run_command(prog: str, body, args, errors: tuple, *, setup_options=None, timeout_setting: str | None = None) -> int:
    """A torchrun-able command's main: set up the process group (with setup's keywords from
    `setup_options(args)`, for the settings it needs before it starts: read from the command's
    arguments, whose errors are then reported as any other), run body(args, dist), turn the
    expected `errors` (and any OSError: a full disk, a read-only folder) and a failed collective
    (see describe_collective_failure; `timeout_setting` names the command's timeout) into one
    line on stderr and exit status 2, always tear down."""
    me, clean = None, False
    try:
        me = setup(**(setup_options(args) if setup_options else {}))
        status = body(args, me)
        clean = True
        return status
    except (*errors, OSError, OutputInUse, OutputNotShared) as error:
        print(f"{prog}: error: {describe_error(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        if me is None or me.world == 1 or not collective_failed(error):
            raise
        print(f"{prog}: error: {describe_collective_failure(error, me, timeout_setting)}", file=sys.stderr)
        return 2
    finally:
        teardown(wait=clean)  # after an error the other ranks may never arrive


@contextlib.contextmanager
def locked_output(path: str, what: str, dist: Dist):
    """Hold srdit.io.OutputLock(path) on rank 0 for the block; every rank raises the same error
    when it cannot be taken (OutputInUse: another command holds it), so no rank waits for one
    that has left. Every rank then reads the lock file: one that does not see what rank 0 wrote
    there works on another folder (a node-local disk), and all of them stop with OutputNotShared."""
    lock = OutputLock(path, what)
    on_main(lambda: lock.__enter__() and None)
    try:
        check_shared(path, what)
        yield
    finally:
        lock.__exit__()


def _read_or_none(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def check_shared(path: str, what: str) -> None:
    """Every rank sees the file `path` as rank 0 does (OutputNotShared naming the others if not)."""
    seen = all_gather_objects(_read_or_none(path))
    blind = [rank for rank, text in enumerate(seen) if text != seen[0]]
    if blind:
        raise OutputNotShared(
            f"{what} is not shared by every rank: rank(s) {', '.join(map(str, blind))} do not see the lock that rank 0 "
            f"holds in it ({path}), so each node has a folder of its own; put the output on storage that every node "
            "shares, not a node-local disk such as /scratch or /tmp")

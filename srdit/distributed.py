"""Process-group setup for the torchrun-able commands (srdit.train, srdit.sample, srdit.data.prepare;
each also runs as plain `python -m ...` in one process).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; its c10d rendezvous makes multi-node work with
no code here. NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import contextlib
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


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


def teardown(*, wait: bool = True) -> None:
    """Destroy the process group; with `wait`, only once every rank got here: a rank that
    destroyed its group while another still worked (rank 0 drawing samples) sometimes aborted
    in gloo at exit ("terminate called without an active exception")."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def run_command(prog: str, body, args, errors: tuple) -> int:
    """A torchrun-able command's main: set up the process group, run body(args, dist), turn the
    expected `errors` (and any OSError: a full disk, a read-only folder) into one line on stderr
    and exit status 2, always tear down."""
    dist = setup()
    clean = False
    try:
        status = body(args, dist)
        clean = True
        return status
    except (*errors, OSError, OutputInUse) as error:
        print(f"{prog}: error: {describe_error(error)}", file=sys.stderr)
        return 2
    finally:
        teardown(wait=clean)  # after an error the other ranks may never arrive


@contextlib.contextmanager
def locked_output(path: str, what: str, dist: Dist):
    """Hold srdit.io.OutputLock(path) on rank 0 for the block; every rank raises the same
    OutputInUse when another command holds it, so no rank waits for one that has left."""
    lock, error = OutputLock(path, what), None
    if dist.is_main:
        try:
            lock.__enter__()
        except OutputInUse as busy:
            error = str(busy)
    error = broadcast_object(error)
    if error is not None:
        raise OutputInUse(error)
    try:
        yield
    finally:
        lock.__exit__()

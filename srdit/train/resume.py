"""Resuming a run: which checkpoint, whether its settings allow it, and that every rank agrees.

The newest checkpoint that can be used is loaded into the live objects; one that cannot (it
does not load, its weights hold NaN or Inf, its tensors do not fit the model) is reported, the
previous one is tried, and once one is found the others move to checkpoints/unreadable/
(srdit.train.checkpoint.load_latest). A checkpoint that loads but was written with other
settings is never skipped: that is the user's to decide, and an error names what differs
(check_config, check_micro_batch, check_progress).

Every rank reads the folder itself, which works because the run folder is shared storage
(srdit.distributed.check_shared verifies it when the lock is taken); the ranks then compare what
each resumed (agree), and ranks that differ stop at once, naming themselves.
"""
from __future__ import annotations

import dataclasses
import os

from srdit import distributed, trainstate
from srdit.config import Config, ConfigError, from_dict, resumable_keys
from srdit.io import check_same_settings
from srdit.train import checkpoint

_FIX = "resume from an earlier checkpoint (move this one aside), or start over with --restart"


class ResumeError(RuntimeError):
    """The run cannot resume: no checkpoint can be used, or the ranks disagree."""


def check_config(saved: dict, cfg: Config, out: str, path: str) -> None:
    """The checkpoint's config must be a whole config (every section, no unknown key) and agree
    with this run's outside the RESUMABLE keys."""
    stored = saved["config"]
    sections = [f.name for f in dataclasses.fields(Config)]
    missing = [name for name in sections if not isinstance(stored, dict) or not isinstance(stored.get(name), dict)]
    if missing:
        raise ConfigError(f"the config stored in {path} has no section {', '.join(missing)} (the file is damaged or "
                          f"was not written by srdit.train); {_FIX}")
    try:
        written = from_dict(stored)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"the config stored in {path}: {error}; {_FIX}") from None
    check_same_settings(written.to_dict(), cfg.to_dict(), ignore=resumable_keys(), error=ConfigError,
                        what=f"{out} holds a run with another config",
                        fix=f"use a new --out, add --restart, or change only {', '.join(sorted(resumable_keys()))}")


def check_progress(saved: dict, cfg: Config, out: str, path: str) -> None:
    """A run is never resumed past its own train.max_steps: that is a forgotten extension."""
    step = int(saved["step"])
    if cfg.train.max_steps < step:
        raise ConfigError(f"{out} holds a run at step {step} ({os.path.basename(path)}), past train.max_steps="
                          f"{cfg.train.max_steps}: raise train.max_steps to continue it, or start over with --restart "
                          "or a new --out")


def check_micro_batch(saved: dict, cfg: Config, world: int, path: str, warn) -> None:
    """The micro-batch, global_batch / (world size x grad_accum), defines the math (CFM's negatives
    are rolled within it): a resume on another number of ranks keeps it by changing
    train.grad_accum. Another micro-batch is refused, naming the setting that keeps it, unless
    train.allow_micro_batch_change says to go on (then `warn` says so, for the log)."""
    t = cfg.train
    written_world, written_micro = trainstate.written_layout(saved)
    micro = t.global_batch // (world * t.grad_accum)
    if micro == written_micro:
        return
    what = (f"{os.path.basename(path)} was written by {written_world} rank(s) with micro-batch {written_micro} "
            f"(train.global_batch / (ranks x train.grad_accum)); {world} rank(s) with train.grad_accum={t.grad_accum} "
            f"make it {micro}, which changes the math (CFM's negatives are rolled within a micro-batch)")
    if t.allow_micro_batch_change:
        warn(f"warning: {what}; going on as train.allow_micro_batch_change=true asks")
        return
    if t.global_batch % (world * written_micro) == 0:
        keep = f"add train.grad_accum={t.global_batch // (world * written_micro)} to keep it exact"
    else:
        keep = f"no train.grad_accum keeps micro-batch {written_micro} on {world} rank(s)"
    raise ConfigError(f"{what}: {keep}, or set train.allow_micro_batch_change=true to accept the change")


def resume(state, cfg: Config, out: str, directory: str, dist, say) -> str | None:
    """Load the newest usable checkpoint of `directory` into `state` on every rank (each reads it
    itself), check that all ranks took the same one, and move the ones that could not be used
    aside (rank 0). Returns its path, or None for a new run."""

    def use(saved: dict, path: str) -> None:
        check_config(saved, cfg, out, path)
        check_progress(saved, cfg, out, path)
        check_micro_batch(saved, cfg, dist.world, path, say)
        state.load_state_dict(saved, rank=dist.rank, world=dist.world)

    failure, path, unreadable = None, None, []
    try:
        path, unreadable = checkpoint.load_latest(directory, use, log=say)
    except (ConfigError, checkpoint.NoLoadableCheckpoint) as error:
        failure = error
    agree(path, failure, directory)
    distributed.barrier()  # every rank has read before rank 0 moves files
    if dist.is_main and unreadable:
        moved = checkpoint.set_aside(unreadable, directory)
        say(f"moved {len(moved)} unreadable checkpoint(s) to {os.path.dirname(moved[0])}")
    return path


def agree(path: str | None, failure: Exception | None, directory: str) -> None:
    """Every rank compares what it resumed (the checkpoint's name, or the error that stopped it):
    the same everywhere, or every rank stops, naming the ranks that differ from rank 0."""
    mine = ("error", str(failure)) if failure is not None else ("new run", None) if path is None else \
        ("checkpoint", os.path.basename(path))
    views = distributed.all_gather_objects(mine)
    differ = [rank for rank, view in enumerate(views) if view != views[0]]
    if failure is not None and not differ:
        raise failure
    if differ:
        said = "; ".join(f"rank {rank}: {kind}{f' {what}' if what else ''}" for rank, (kind, what) in enumerate(views)
                         if rank in differ or rank == 0)
        raise ResumeError(f"the ranks do not resume the same state from {directory} ({said}): every rank must see "
                          "the same run folder: --out must be on storage that every node shares, not a node-local "
                          "disk such as /scratch or /tmp")

"""`torchrun -m srdit.train --preset P --out DIR [--data DIR] [section.key=value ...]`.

Reads as the loop (STYLE 8): setup, build, data, loop, close; the loop body calls a helper for
each thing that happens when due (log, checkpoint, sample grid, quick evaluation). Running the
same command again with the same --out resumes from the newest good checkpoint; settings marked
RESUMABLE in srdit/config.py may change then (extend a run, re-cadence it, run the same math
faster), any other change of the config is an error naming the keys (srdit.train.resume).

A stop signal (SIGTERM, SIGINT) ends the run at a step boundary that every rank agrees on
(srdit.distributed.StepVote), with a checkpoint; weights that are not finite are never saved.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import yaml

from srdit import distributed
from srdit.config import Config, ConfigError, apply_overrides, preset
from srdit.data import make_batches
from srdit.io import remove_stale_temporaries, write_text
from srdit.model import build_model, count_params
from srdit.model.flops import model_flops
from srdit.runinfo import code_version, device_name
from srdit.train import checkpoint
from srdit.train.assemble import build_step, check_runtime, shard_layout
from srdit.train.inputs import build_dataset, build_teacher
from srdit.train.loss import draw_step_noise, loss_weights
from srdit.train.flat import flatten_for_training
from srdit.train.optim import EMA, Optimizers, lr_factor
from srdit.train.resume import ResumeError, resume
from srdit.train.runlog import RunLog, keep_history_until, plot_loss_curve
from srdit.train.sample_grid import write_sample_grid
from srdit.train.step import DeviceMetrics, step_autocast
from srdit.trainstate import TrainState


class TrainingError(RuntimeError):
    """A clear, one-line reason the run stopped."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m srdit.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="a name of srdit.config.PRESETS")
    parser.add_argument("--out", required=True, help="run directory (created; reused to resume)")
    parser.add_argument("--data", default=None, help="prepared shards (srdit.data.prepare); quickstart: none")
    parser.add_argument("--restart", action="store_true",
                        help="start over in --out: the previous run's files move to --out/previous-<time>/")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    return parser.parse_args(argv)


def resolve_config(args) -> Config:
    cfg = apply_overrides(preset(args.preset), args.overrides)
    if args.data is not None:
        cfg = apply_overrides(cfg, [f"data.path={args.data}"])
    return cfg


def write_config(out: str, cfg: Config) -> None:
    """config.yaml, the run's resolved config. It is enforced only through a checkpoint's own
    config (srdit.train.resume.check_config): a folder without one (a first launch that failed) holds
    nothing to protect, so its config.yaml is simply replaced."""
    write_text(os.path.join(out, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def start_over(out: str) -> str | None:
    """--restart: move what a previous run wrote to out/previous-<time>/ (nothing is deleted)."""
    names = [n for n in ("config.yaml", "metrics.jsonl", "loss.png", "checkpoints", "samples")
             if os.path.exists(os.path.join(out, n))]
    if not names:
        return None
    target = os.path.join(out, time.strftime("previous-%Y%m%d-%H%M%S"))
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(out, name), os.path.join(target, name))
    return target


def prepare_folder(args) -> None:
    """Rank 0, holding the lock: --restart's move, and the temporaries of a killed run removed."""
    moved = start_over(args.out) if args.restart else None
    if moved:
        print(f"--restart: the previous run's files are in {moved}")
    for path in remove_stale_temporaries(args.out) + remove_stale_temporaries(checkpoint_dir(args.out)):
        print(f"removed {path}, left by a run that was killed while writing it")


def begin_writing(args, cfg: Config, step: int) -> None:
    """Rank 0, once the run is built: config.yaml, and metrics.jsonl cut back to the resumed step."""
    write_config(args.out, cfg)
    note = keep_history_until(os.path.join(args.out, "metrics.jsonl"), step)
    if note:
        print(note)


class GracefulStop:
    """SIGTERM/SIGINT: finish the current step (with several ranks, the step they agree on: the
    loop's StepVote), checkpoint, exit 0. A context manager, so the previous handlers come back
    when the run ends (main() may be called from Python)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._request) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _request(self, signum, frame):
        self.requested = True


@dataclass
class Run:
    """What the loop and its helpers share."""

    cfg: Config
    dist: distributed.Dist
    out: str
    state: TrainState  # model, EMA, optimizers, generators, step: what a checkpoint holds
    step: object  # build_step's runner: .run(micro_batches, noise)
    log: RunLog | None  # opened once the run may write (open_log)
    metrics: DeviceMetrics
    evaluate: object  # srdit.eval.quick's evaluate(model), or None
    notes: dict = field(default_factory=dict)  # for the log's header: the teacher, the checkpoint resumed

    @property
    def checkpoints(self) -> str:
        return checkpoint_dir(self.out)

    @property
    def samples(self) -> str:
        return os.path.join(self.out, "samples")


def main(argv=None) -> int:
    return distributed.run_command("srdit.train", train, parse_args(argv),
                                   (ConfigError, TrainingError, ResumeError, ValueError, FileNotFoundError),
                                   setup_options=setup_options, timeout_setting="train.process_group_timeout")


def setup_options(args) -> dict:
    """What the process group needs before it starts (srdit.distributed.setup), from the config."""
    t = resolve_config(args).train
    return {"timeout": t.process_group_timeout, "capture_collectives": t.cuda_graphs}


def train(args, dist) -> int:
    with GracefulStop() as stop:  # first: a signal during setup also ends the run cleanly
        return run_training(args, dist, stop)


def run_training(args, dist, stop: GracefulStop) -> int:
    # setup: every check that can fail runs before anything is written
    cfg = resolve_config(args)
    check_runtime(cfg, dist.device, dist.world)
    dataset = build_dataset(cfg)
    with distributed.locked_output(os.path.join(args.out, ".lock"), f"the run folder {args.out}", dist):
        distributed.on_main(prepare_folder, args)
        run = build_run(args, cfg, dist, dataset)
        t = cfg.train  # the data from the resumed step: the loaders' order depends on nothing else
        batches = make_batches(dataset, t.global_batch, rank=dist.rank, world=dist.world, accum=t.grad_accum,
                               seed=t.seed, start_step=run.state.step, device=dist.device,
                               workers=cfg.data.num_workers)
        distributed.on_main(begin_writing, args, cfg, run.state.step)  # from here on the run writes
        open_log(run, args, dataset)
        # loop: a stop signal is acted on when every rank has heard of it (one step later)
        vote, stopping = distributed.StepVote(), False
        while run.state.step < t.max_steps and not stopping:
            train_one_step(run, batches.next_step())
            maybe_log(run)
            if run.state.step % t.ckpt_every == 0:
                save_checkpoint(run)
            maybe_sample(run)
            maybe_eval(run)
            stopping = vote.cast(stop.requested)
        vote.close()
        # close
        if run.metrics.steps:  # stopped between log steps: the steps since the last row
            maybe_log(run, force=True)
        if run.state.step % t.ckpt_every != 0:  # (a multiple was saved in the loop)
            save_checkpoint(run)
        finish(run, stopped=stopping)
    return 0


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def build_run(args, cfg: Config, dist, dataset) -> Run:
    """Model, EMA, optimizers and generators (resumed from the newest good checkpoint, whose
    config must agree), the teacher, the step and the quick evaluation. Nothing is written but
    checkpoints that do not load, moved aside."""
    t, device = cfg.train, dist.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(t.seed)
    model = flatten_for_training(build_model(cfg).to(device), cfg, dist.world)  # one buffer: srdit.train.assemble
    shards = shard_layout(cfg, model, dist.rank, dist.world)  # train.shard_optimizer: each rank updates its pieces
    ema, optimizers = EMA(model, t.ema_decay, t.ema_update, shards), Optimizers(model, t, device, shards)
    state = TrainState(cfg, model, ema, optimizers,
                       step_generator=torch.Generator(device).manual_seed(t.seed),  # per-sample noise, all ranks
                       host_generator=torch.Generator().manual_seed(t.seed + 1))  # the path-drop coin, all ranks
    teacher, teacher_note = build_teacher(cfg, device)  # before the RNG states are restored: a random
    # teacher (quickstart) must come out as it did when the run began
    say = print if dist.is_main else (lambda *_: None)
    try:
        path = resume(state, cfg, args.out, checkpoint_dir(args.out), dist, say)
    except checkpoint.NoLoadableCheckpoint as error:
        raise TrainingError(str(error)) from None
    step = build_step(cfg, model, teacher, device=device, rank=dist.rank, world=dist.world, optimizers=optimizers,
                      ema=ema)
    evaluate = None
    if t.eval_every:
        from srdit.eval.quick import build_quick_eval

        evaluate = build_quick_eval(cfg, device, num_samples=t.eval_samples)
    notes = {"teacher": teacher_note, "resumed": path}
    return Run(cfg, dist, args.out, state, step, None, DeviceMetrics(device), evaluate, notes)


def open_log(run: Run, args, dataset) -> None:
    """The run's log, opened with its self-describing header (STYLE 11)."""
    cfg, dist, t, device = run.cfg, run.dist, run.cfg.train, run.dist.device
    flops = model_flops(cfg.model, t.path_drop_prob)
    run.log = RunLog(args.out, cfg, enabled=dist.is_main, start_step=run.state.step, max_steps=t.max_steps,
                     device=device, flops_per_image=flops.train, global_batch=t.global_batch)
    resumed = run.notes["resumed"]
    run.log.header([
        f"srdit.train  code {code_version()}  torch {torch.__version__}  python {sys.version.split()[0]}",
        f"device {device_name(device)} x {dist.world} process(es)  precision "
        f"{'bf16 autocast' if step_autocast(cfg, device) else 'fp32'}"
        f"{'  compiled' if t.compile else ''}{'  whole step as CUDA graphs' if t.cuda_graphs else ''}",
        *([f"gradients summed across ranks in {t.grad_reduce_dtype} (srdit's reducer)  update "
           f"{'sharded: each rank updates 1/' + str(dist.world) if run.state.optimizers.sharded else 'on every rank'}"]
          if dist.world > 1 else []),
        *(["sums in the fixed order (train.reduce_order=fixed): the same bits at any number of ranks with this "
           "micro-batch, where grad_accum is a power of two (docs/training.md)"] if t.reduce_order == "fixed" else []),
        f"preset {args.preset}  model {count_params(run.state.model):,} trainable parameters  "
        f"{flops.train / 1e9:.2f} GFLOP per training image (fwd+bwd)",
        f"teacher: {run.notes['teacher']}  attention: {getattr(run.step, 'attention', cfg.model.attention_backend)}",
        f"data: {cfg.data.path or 'embedded scikit-learn digits (1,797 images, 10 classes, 16x16)'}  "
        f"{len(dataset):,} samples  {teacher_pixels(dataset)}",
        f"resumed from {resumed} at step {run.state.step}" if resumed else f"new run in {args.out}",
        "config: " + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=True).strip(),
    ])


def teacher_pixels(dataset) -> str:
    """What the online teacher is fed, for the log: whether its pixels are the crops' own."""
    if getattr(dataset, "kind", "image") == "teacher":
        return "teacher targets cached in the shards"
    fmt = getattr(dataset, "image_format", None)
    if fmt is None:  # the embedded digits: uint8 pixels in memory
        return "images: uint8 in memory (exact pixels)"
    exact = "exact pixels, as the release's PNG crops" if dataset.exact_images else "LOSSY: not the release's pixels"
    return f"images: {fmt} ({exact})"


def train_one_step(run: Run, micro_batches: list[dict]) -> None:
    """Draw the step's noise, run the step (capturing its CUDA graphs first, untimed, when they
    are on), count it; its values stay on the device until maybe_log reads them."""
    t, state = run.cfg.train, run.state
    noise = draw_step_noise(t.global_batch, micro_batches[0]["latent"].shape[1:], run.cfg.model, t,
                            generator=state.step_generator, host_generator=state.host_generator,
                            device=run.dist.device)
    if t.cuda_graphs and not run.step.graphs:  # warm-up and capture leave no trace in the run: untimed
        with run.log.untimed():
            began = time.perf_counter()
            run.step.prime(micro_batches, noise)
            run.log.print(f"captured {len(run.step.graphs)} CUDA graph(s) of the whole step in "
                          f"{time.perf_counter() - began:.1f} s")
    state.optimizers.set_lr_factor(lr_factor(state.step, t.max_steps, t.lr_decay_steps))
    run.metrics.add(run.step.run(micro_batches, noise))
    state.step += 1
    run.log.step()


def maybe_log(run: Run, force: bool = False) -> None:
    """Every train.log_every steps (and at the last, or when `force`d): read the device metrics
    (the one host sync), write them, and stop the run after train.max_bad_steps skipped steps in
    a row, with a checkpoint that rotates none out (its state is the last good one's, the data
    position later)."""
    t, step = run.cfg.train, run.state.step
    if step % t.log_every and step != t.max_steps and not force:
        return
    values = run.metrics.read()
    # the weighted terms too, as the release logs them (its curves show 0.5 repa, 0.03 cls, 0.05 cfm)
    values.update({f"{k}_w": w * values[k] for k, w in loss_weights(t).items() if k != "vel"})
    run.log.log(step, values, run.state.optimizers.lr)
    if values["worst_bad_streak"] >= t.max_bad_steps:
        save_checkpoint(run, rotate=False)
        raise TrainingError(f"{values['worst_bad_streak']} steps in a row had a non-finite loss or gradient "
                            f"(last at step <= {step}); updates were skipped, stopping (train.max_bad_steps)")


def save_checkpoint(run: Run, rotate: bool = True) -> None:
    """A checkpoint of the current step (every rank takes part: RNG states are gathered); rank 0
    writes it and keeps the newest train.keep_checkpoints (`rotate`). Weights or an EMA that are
    not finite are never saved: the run stops, and the newest checkpoint stays its last good state."""
    step = run.state.step
    with run.log.untimed():
        if distributed.any_rank(not checkpoint.all_finite(run.state.model, run.state.ema.model)):
            newest = checkpoint.list_checkpoints(run.checkpoints)
            kept = f"the newest checkpoint, {newest[0]}, is the last good state" if newest else "none was written"
            raise TrainingError(f"the weights at step {step} hold NaN or Inf, so they were not saved and the run "
                                f"stops: {kept} (an update overflowed: is train.lr too high?)")
        state_dict = run.state.state_dict()
        distributed.on_main(write_checkpoint, state_dict, run.checkpoints, step,
                            run.cfg.train.keep_checkpoints if rotate else None)


def write_checkpoint(state_dict: dict, directory: str, step: int, keep: int | None) -> None:
    checkpoint.save(state_dict, directory, step)
    if keep is not None:
        checkpoint.rotate(directory, keep, newest=step)


def maybe_sample(run: Run, force: bool = False) -> None:
    """The EMA sample grid every train.sample_every steps (drawn by rank 0; 0 = never). Every
    rank calls it: with a sharded update the EMA is gathered first (a collective)."""
    step, every = run.state.step, run.cfg.train.sample_every
    if every and (force or step % every == 0):  # train.sample_every=0: no grids
        with run.log.untimed():
            run.state.ema.gather()
            if run.dist.is_main:
                png = os.path.join(run.samples, f"step_{step:09d}.png")
                if write_sample_grid(run.state.ema.model, run.cfg, run.dist.device, png):
                    run.log.image("samples", png, step)


def maybe_eval(run: Run) -> None:
    """The quick FID-10K + KDD every train.eval_every steps (every rank samples its share)."""
    if run.evaluate is not None and run.state.step % run.cfg.train.eval_every == 0:
        with run.log.untimed():
            run.state.ema.gather()  # sharded: every rank's pieces of the average (a collective)
            run.log.record(run.state.step, run.evaluate(run.state.ema.model))


def finish(run: Run, *, stopped: bool) -> None:
    """The last sample grid and the loss curve (rank 0), the closing line, the log closed."""
    if run.cfg.train.sample_every and run.state.step % run.cfg.train.sample_every != 0:
        maybe_sample(run, force=True)  # every rank: the EMA may be gathered
    if run.dist.is_main:
        metrics, curve = os.path.join(run.out, "metrics.jsonl"), os.path.join(run.out, "loss.png")
        plot_loss_curve(metrics, curve)
        last = run.log.last if run.log.last and run.log.last["step"] == run.state.step else None
        loss = f" (loss {last['loss']:.4f})" if last else ""
        run.log.print(f"{'stopped by signal' if stopped else 'done'} at step {run.state.step}{loss}; "
                      f"samples in {run.samples}, loss curve {curve}")
    run.log.close()


if __name__ == "__main__":
    sys.exit(main())

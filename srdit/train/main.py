"""`torchrun -m srdit.train --preset P --out DIR [--data DIR] [section.key=value ...]`.

Reads as the loop (STYLE 8): setup, build, data, loop, close. Running the same command again
with the same --out resumes from the newest good checkpoint; the run may be extended
(train.max_steps) or re-cadenced (log/checkpoint/sample intervals), any other change of the
config is an error naming the keys.
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time

import torch
import yaml

from srdit.config import Config, ConfigError, apply_overrides, from_dict, preset
from srdit.data import make_batches
from srdit.model import build_model, count_params
from srdit.model.flops import model_flops
from srdit.runinfo import code_version, device_name
from srdit.sample.generate import decode_uint8, generate, save_grid
from srdit.train import checkpoint as ckpt
from srdit import distributed
from srdit.train.graphs import GraphedStep
from srdit.train.loss import draw_step_noise
from srdit.train.optim import EMA, Optimizers
from srdit.train.runlog import RunLog, plot_loss_curve
from srdit.train.step import DeviceMetrics, StepRunner

# Keys that may change when a run is resumed: cadences and bookkeeping, and how the same math is
# run (kernels, attention backend, compile: equal up to rounding, so bit-exact resume then ends).
RESUMABLE = {"train.max_steps", "train.log_every", "train.ckpt_every", "train.sample_every", "train.eval_every",
             "train.eval_samples", "eval.reference", "eval.inception", "eval.kdd_teacher", "eval.batch",
             "train.keep_checkpoints", "train.max_bad_steps", "train.wandb_mode", "train.wandb_project",
             "train.wandb_name", "data.num_workers", "data.path", "model.kernels", "model.attention_backend",
             "model.batched_adaln", "train.compile", "train.compile_mode", "train.cuda_graphs"}


class TrainingError(RuntimeError):
    """A clear, one-line reason the run stopped."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m srdit.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="a name of srdit.config.PRESETS")
    parser.add_argument("--out", required=True, help="run directory (created; reused to resume)")
    parser.add_argument("--data", default=None, help="prepared shards (srdit.data.prepare); quickstart: none")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    return parser.parse_args(argv)


def resolve_config(args) -> Config:
    cfg = apply_overrides(preset(args.preset), args.overrides)
    if args.data is not None:
        cfg = apply_overrides(cfg, [f"data.path={args.data}"])
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_or_write_config(out: str, cfg: Config, is_main: bool) -> None:
    """config.yaml of a new run is written; an existing one must agree outside RESUMABLE."""
    path = os.path.join(out, "config.yaml")
    if os.path.exists(path):
        with open(path) as f:
            old = _flatten(from_dict(yaml.safe_load(f)).to_dict())
        new = _flatten(cfg.to_dict())
        differ = sorted(k for k in new if k not in RESUMABLE and old.get(k) != new[k])
        if differ:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in differ)
            raise ConfigError(f"{out} holds a run with another config ({details}); use a new --out, "
                              f"or change only {', '.join(sorted(RESUMABLE))}")
    if is_main:
        os.makedirs(out, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        os.replace(path + ".tmp", path)


def build_dataset(cfg: Config):
    """The training set, checked against the preset (latent shape, label range)."""
    if cfg.data.path:
        from srdit.data import ShardDataset  # prepared ImageNet shards (srdit.data.prepare)

        # checks the index, shard sizes and checksums, and every label against the model's classes
        dataset = ShardDataset(cfg.data.path, num_classes=cfg.model.num_classes)
        num_classes = dataset.num_classes
    else:
        if cfg.model.in_channels != 1 or cfg.model.input_size != 16:
            raise ConfigError("only the quickstart preset trains without --data (embedded 1x16x16 digits); "
                              "give --data DIR with shards made by `python -m srdit.data.prepare`")
        from srdit.data.digits import DigitsDataset

        dataset = DigitsDataset(resolution=16)
        num_classes = dataset.num_classes
    if len(dataset) == 0:
        raise ValueError(f"{cfg.data.path or 'the dataset'} holds no samples")
    has_targets = getattr(dataset, "kind", "image") == "teacher"
    if has_targets != cfg.data.cached_teacher:  # else REPA/REG would silently lose their targets
        raise ConfigError(f"{cfg.data.path or 'the embedded dataset'} holds "
                          f"{'cached teacher targets' if has_targets else 'images'} but data.cached_teacher="
                          f"{cfg.data.cached_teacher}; set data.cached_teacher={str(has_targets).lower()}")
    item = dataset[0]
    m = cfg.model
    expected = (m.in_channels, m.input_size, m.input_size)
    if tuple(item["latent"].shape) != expected:
        raise ValueError(f"{cfg.data.path or 'dataset'}: latents are {tuple(item['latent'].shape)}, the preset "
                         f"expects {expected} (resolution {cfg.data.resolution}); prepare data at that resolution")
    if num_classes > m.num_classes:
        raise ValueError(f"the data has {num_classes} classes, model.num_classes is {m.num_classes}")
    return dataset


def build_teacher(cfg: Config, device: torch.device):
    """The frozen DINOv2 for REPA/REG targets, or None when targets are cached in the data."""
    if cfg.data.cached_teacher:
        return None, "cached teacher targets"
    from srdit.model.dinov2 import build_dinov2, load_dinov2

    d = cfg.data
    if d.teacher:
        teacher = load_dinov2(d.teacher_arch, d.teacher, d.teacher_resolution, d.teacher_pos_interp)
        note = f"DINOv2 {d.teacher_arch} from {d.teacher}"
    else:
        if d.teacher_arch != "tiny":
            raise ConfigError(f"data.teacher is empty: give the path of the {d.teacher_arch} weights "
                              f"(dinov2_vitb14_pretrain.pth); only the quickstart's tiny teacher may be random")
        teacher = build_dinov2("tiny", d.teacher_resolution, d.teacher_pos_interp).freeze()
        note = "tiny DINOv2-style ViT, RANDOM INIT (no pretrained weights given: REPA/REG align to random features)"
    if teacher.embed_dim != cfg.model.teacher_dim:
        raise ConfigError(f"the teacher's width {teacher.embed_dim} != model.teacher_dim {cfg.model.teacher_dim}")
    return teacher.to(device), note


class GracefulStop:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit 0. A context manager, so the
    previous handlers come back when the run ends (main() may be called from Python)."""

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


def main(argv=None) -> int:
    return distributed.run_command("srdit.train", train, parse_args(argv),
                                   (ConfigError, TrainingError, ValueError, FileNotFoundError))


def train(args, dist) -> int:
    with GracefulStop() as stop:  # first: a signal during setup also ends the run cleanly
        return run_training(args, dist, stop)


def run_training(args, dist, stop: GracefulStop) -> int:
    # ---------------------------------------------------------------- setup
    cfg = resolve_config(args)
    t = cfg.train
    if cfg.model.kernels == "triton" and dist.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("model.kernels=triton needs a CUDA GPU (TRITON_INTERPRET=1 runs it on the CPU, for tests "
                          "only); use model.kernels=eager here")
    check_or_write_config(args.out, cfg, dist.is_main)
    distributed.barrier()
    ckpt_dir, sample_dir = os.path.join(args.out, "checkpoints"), os.path.join(args.out, "samples")
    if dist.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        os.makedirs(sample_dir, exist_ok=True)
    device = dist.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---------------------------------------------------------------- build
    torch.manual_seed(t.seed)
    model = build_model(cfg).to(device)
    ema = EMA(model, t.ema_decay)
    optimizers = Optimizers(model, t, device)
    dataset = build_dataset(cfg)
    teacher, teacher_note = build_teacher(cfg, device)
    step_gen = torch.Generator(device).manual_seed(t.seed)  # all per-sample noise, same on every rank
    host_gen = torch.Generator().manual_seed(t.seed + 1)  # the path-drop coin, same on every rank

    state, path = ckpt.load_latest(ckpt_dir, log=print if dist.is_main else (lambda *_: None))
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizers.load_state_dict(state["optimizer"])
        step_gen.set_state(state["step_generator"])
        host_gen.set_state(state["host_generator"])
        if len(state["rng"]) == dist.world:
            ckpt.restore_rng(state["rng"][dist.rank])
        step = state["step"]

    # Wrapping order (STYLE 7, the one place it is decided): DDP around the model, then
    # torch.compile around DDP, so that dynamo's DDP optimizer splits the graph at the gradient
    # buckets and all-reduce overlaps backward. "reduce-overhead" replays CUDA graphs on a GPU.
    # Every parameter gets a gradient every step, also on path-drop steps (zeros for the skipped
    # routed blocks), so no find_unused_parameters. Gradients live in DDP's buckets themselves
    # (no copy in, no copy out). static_graph=True made a rank abort at exit now and then
    # (gloo, CPU; "terminate called without an active exception"), so it stays off.
    train_model = model
    if dist.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if t.compile:
        mode = None if t.compile_mode == "default" else t.compile_mode
        train_model = torch.compile(train_model, mode=mode)
        if teacher is not None:  # the frozen teacher is ~36% of a step's FLOPs: compile it too
            teacher = torch.compile(teacher, mode=mode)

    flops = model_flops(cfg.model, t.path_drop_prob)
    log = RunLog(args.out, cfg, enabled=dist.is_main, start_step=step, max_steps=t.max_steps, device=device,
                 flops_per_image=flops.train, global_batch=t.global_batch)
    log.header([
        f"srdit.train  code {code_version()}  torch {torch.__version__}  python {sys.version.split()[0]}",
        f"device {device_name(device)} x {dist.world} process(es)  precision "
        f"{'bf16 autocast' if device.type == 'cuda' and t.precision == 'bf16' else 'fp32'}"
        f"{'  compiled' if t.compile else ''}{'  whole step as CUDA graphs' if t.cuda_graphs else ''}",
        f"preset {args.preset}  model {count_params(model):,} trainable parameters  "
        f"{flops.train / 1e9:.2f} GFLOP per training image (fwd+bwd)",
        f"teacher: {teacher_note}",
        f"data: {cfg.data.path or 'embedded scikit-learn digits (1,797 images, 10 classes, 16x16)'}  "
        f"{len(dataset):,} samples",
        f"resumed from {path} at step {step}" if state is not None else f"new run in {args.out}",
        "config: " + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=True).strip(),
    ])

    # ---------------------------------------------------------------- data
    # DALI on a GPU when installed, DataLoader workers otherwise; all give the same sample order
    batches = make_batches(dataset, t.global_batch, rank=dist.rank, world=dist.world, accum=t.grad_accum,
                           seed=t.seed, start_step=step, device=device, workers=cfg.data.num_workers)
    runner = StepRunner(cfg, model, train_model, teacher, optimizers, ema, rank=dist.rank, world=dist.world,
                        device=device)
    if t.cuda_graphs:  # same arguments and results as the runner; steps become graph replays
        runner = GraphedStep(runner)
    metrics = DeviceMetrics(device)
    sample_labels, sample_gen = sample_batch(cfg, device)

    def save_checkpoint():
        with log.untimed():
            _save_checkpoint()

    def _save_checkpoint():
        rng = distributed.all_gather_objects(ckpt.capture_rng())
        if dist.is_main:
            ckpt.save_atomic({"format": ckpt.FORMAT, "step": step, "config": cfg.to_dict(),
                              "model": model.state_dict(), "ema": ema.state_dict(),
                              "optimizer": optimizers.state_dict(), "step_generator": step_gen.get_state(),
                              "host_generator": host_gen.get_state(), "rng": rng,
                              "data": {"step": step, "seed": t.seed}}, ckpt.checkpoint_path(ckpt_dir, step))
            ckpt.rotate(ckpt_dir, t.keep_checkpoints)
        distributed.barrier()

    evaluate = None
    if t.eval_every:
        from srdit.eval.quick import build_quick_eval

        evaluate = build_quick_eval(cfg, device, num_samples=t.eval_samples)

    def maybe_eval():
        if evaluate is not None and step % t.eval_every == 0:  # every rank samples its share
            with log.untimed():
                log.record(step, evaluate(ema.model))

    def maybe_sample(force=False):
        if dist.is_main and (force or step % t.sample_every == 0):
            png = os.path.join(sample_dir, f"step_{step:09d}.png")
            with log.untimed():
                if write_sample_grid(ema.model, cfg, sample_labels, sample_gen, png):
                    log.image("samples", png, step)

    # ---------------------------------------------------------------- loop
    while step < t.max_steps and not stop.requested:
        micro = batches.next_step()
        noise = draw_step_noise(t.global_batch, micro[0]["latent"].shape[1:], cfg.model, t, generator=step_gen,
                                host_generator=host_gen, device=device)
        if t.cuda_graphs and not runner.graphs:  # warm-up and capture leave no trace in the run: untimed
            with log.untimed():
                began = time.perf_counter()
                runner.prime(micro, noise)
                log.print(f"captured {len(runner.graphs)} CUDA graph(s) of the whole step in "
                          f"{time.perf_counter() - began:.1f} s")
        metrics.add(runner.run(micro, noise))
        step += 1
        log.step()
        if step % t.log_every == 0 or step == t.max_steps:
            values = metrics.read()
            log.log(step, values, optimizers.lr)
            if values["worst_bad_streak"] >= t.max_bad_steps:
                save_checkpoint()
                raise TrainingError(f"{values['worst_bad_streak']} steps in a row had a non-finite loss or gradient "
                                    f"(last at step <= {step}); updates were skipped, stopping (train.max_bad_steps)")
        if step % t.ckpt_every == 0:
            save_checkpoint()
        maybe_sample()
        maybe_eval()

    # ---------------------------------------------------------------- close
    if step % t.ckpt_every != 0 or stop.requested:
        save_checkpoint()
    if dist.is_main:
        if step % t.sample_every != 0:
            maybe_sample(force=True)
        plot_loss_curve(os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "loss.png"))
        log.print(f"{'stopped by signal' if stop.requested else 'done'} at step {step}; "
                  f"samples in {sample_dir}, loss curve {os.path.join(args.out, 'loss.png')}")
    log.close()
    return 0


def sample_batch(cfg: Config, device: torch.device):
    """Fixed labels for in-training samples: one row per class (up to 10 classes x 10)."""
    classes = min(cfg.model.num_classes, 10)
    labels = torch.arange(classes, device=device).repeat_interleave(10)
    return labels, cfg.train.seed + 12345


@torch.no_grad()
def write_sample_grid(ema_model, cfg: Config, labels: torch.Tensor, seed: int, png: str) -> bool:
    """EMA samples with fixed noise and labels, decoded and saved as a grid; False when there is
    nothing to decode latents with (no data.invae for a latent-space preset)."""
    if cfg.model.in_channels != 1 and not cfg.data.invae:
        return False
    generator = torch.Generator(labels.device).manual_seed(seed)
    latents = generate(ema_model, cfg, labels, generator=generator)
    vae = _decoder(cfg.data.invae, labels.device) if cfg.data.invae else None
    save_grid(decode_uint8(latents, cfg, vae), png, nrow=10)
    return True


@functools.lru_cache(maxsize=1)
def _decoder(path: str, device: torch.device):
    from srdit.model.invae import load_invae

    return load_invae(path).to(device)


if __name__ == "__main__":
    sys.exit(main())

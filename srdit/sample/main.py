"""`python -m srdit.sample --ckpt PATH --out SAMPLES.npz [--preset P] [--vae INVAE.pt] [section.key=value ...]`
(`torchrun --nproc_per_node N -m srdit.sample ...` on several GPUs).

Samples a checkpoint into an ADM-style .npz: `arr_0` uint8 [N, H, W, 3], `arr_1` int64 labels
[N], in global sample order (balanced labels = index mod num_classes, so the classes are
interleaved, as the ADM evaluator's consecutive IS splits need), and `settings`, a JSON string
of every setting that moves FID; plus a grid PNG of the first 100 samples.

Streaming and resume. Batch b (global samples b*batch ..) is drawn from a generator seeded by
(seed, b) (srdit.sample.batches), and ranks take the batches still to do round-robin. Each
finished batch is written atomically (temporary file, fsync, rename) as
`OUT.parts/batch_<b>.npz`; a rerun of the same command skips the batches already there, on any
number of ranks, and a rerun with other settings is an error naming them
(`OUT.parts/settings.json`). A rerun reads every part whole before trusting it: one that is
damaged (a bad zip CRC, truncated, the wrong count) is removed, named, and drawn again. When
every batch exists, rank 0 assembles OUT by streaming the parts, one at a time, into the zip
(srdit.sample.npz: no copy of the whole array in RAM), renames it into place and removes the
parts. Peak disk use is twice the final file (~20 GB for 50K at 256 px), peak RAM one batch.
The bytes of OUT depend only on the settings (and the device type), not on the number of ranks
or on interruptions.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import time

import numpy as np
import torch

from srdit import distributed, trainstate
from srdit.config import ConfigError, apply_overrides, from_dict, preset
from srdit.io import (atomic_write, check_finite_weights, check_same_settings, describe_load_error,
                      remove_stale_temporaries, write_json)
from srdit.model import build_model, load_release_weights
from srdit.model.weights import describe_mismatch
from srdit.progress import Progress
from srdit.runinfo import code_version, device_name
from srdit.sample.batches import batch_range, generate_batch, num_batches
from srdit.sample.generate import STATE_DTYPES, save_grid
from srdit.sample.npz import NpzRows, NpzWriter, read_arrays

SAMPLES_FORMAT = "srdit-samples-v1"
GRID_SAMPLES = 100


class SamplingError(RuntimeError):
    """A clear, one-line reason sampling cannot go on."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m srdit.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True,
                        help="srdit training checkpoint (EMA weights and its config), or a release checkpoint / "
                             "state dict (then --preset is required)")
    parser.add_argument("--out", required=True, help="the .npz to write (resumed if OUT.parts exists)")
    parser.add_argument("--preset", default=None, help="model/sample config instead of the checkpoint's")
    parser.add_argument("--vae", default=None, help="e2e-invae-400k.pt for decoding (default: data.invae)")
    parser.add_argument("--grid", default=None, help="grid PNG of the first samples (default: OUT with .png)")
    parser.add_argument("--no-tf32", action="store_true",
                        help="fp32 matmuls without TF32 on GPUs (the release sampler allows TF32)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. sample.num_steps=250")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- model


def _peek(path: str):
    """The checkpoint object, memory-mapped where possible (a release file is read only once,
    by load_release_weights, when it turns out not to be an srdit checkpoint)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise ValueError(f"cannot read {path} as a checkpoint: {describe_load_error(error)}") from error
        except Exception as error:
            raise ValueError(f"cannot read {path} as a checkpoint: {describe_load_error(error)}") from error


def _checkpoint_in(directory: str) -> str:
    """The newest training checkpoint in a run folder (or its checkpoints/ folder), else the
    pattern a run's checkpoints follow: what --ckpt wants when it was given a folder."""
    found = sorted(glob.glob(os.path.join(directory, "checkpoints", "step_*.pt"))
                   + glob.glob(os.path.join(directory, "step_*.pt")), key=os.path.basename)
    return found[-1] if found else os.path.join(directory, "checkpoints", "step_*.pt")


def load_model(path: str, preset_name: str | None, overrides, device: torch.device):
    """(EMA model in eval mode on `device`, config, source description)."""
    if os.path.isdir(path):
        raise ValueError(f"--ckpt {path} is a directory; give a checkpoint file, e.g. {_checkpoint_in(path)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = _peek(path)
    source = {"checkpoint": os.path.abspath(path), "preset": preset_name}
    if trainstate.is_checkpoint(obj):
        config, state, step = trainstate.for_sampling(obj)
        base = preset(preset_name) if preset_name else from_dict(config)
        source.update(kind="srdit training checkpoint", step=step, weights="ema")
    else:
        if not preset_name:
            raise ConfigError(f"{path} is not an srdit training checkpoint (a release checkpoint or a state dict?): "
                              "give --preset to say which model it holds, e.g. --preset sr-dit-b1-256")
        base = preset(preset_name)
        which = "ema" if isinstance(obj, dict) and isinstance(obj.get("ema"), dict) else "state dict"
        del obj
        state = load_release_weights(path)
        source.update(kind="release checkpoint", step=None, weights=which)
    cfg = apply_overrides(base, overrides)
    model = build_model(cfg)
    problem = describe_mismatch(state, model.state_dict())
    if problem:
        raise ValueError(f"{path} does not fit the model of {preset_name or 'its config'} with these overrides: "
                         f"{problem}")
    check_finite_weights(state, path, "the model would sample garbage")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False), cfg, source


def load_decoder(cfg, vae_path: str | None, device: torch.device):
    """(INVAE or None, description) for the model's latents; the quickstart is pixel space."""
    if cfg.model.in_channels == 1:
        return None, f"identity (pixel space): pixels = latents / {cfg.data.latent_scale}"
    path = vae_path or cfg.data.invae
    if not path:
        raise ConfigError("this model samples INVAE latents: give --vae e2e-invae-400k.pt (or data.invae=PATH)")
    from srdit.model.invae import load_invae

    vae = load_invae(path)
    check_finite_weights(vae.state_dict(), path, "the decoded images would be garbage")
    return vae.to(device), f"INVAE {os.path.abspath(path)} (latent / {cfg.data.latent_scale})"


# ----------------------------------------------------------------------------- settings


def fid_settings(cfg, source: dict, decoder: str, tf32: bool, device: torch.device) -> dict:
    """Everything that moves FID, stored in the npz (and compared on resume)."""
    s = cfg.sample
    nfe = {"sde": s.num_steps, "euler": s.num_steps, "heun": 2 * s.num_steps - 1}[s.sampler]
    return {
        "format": SAMPLES_FORMAT, **source,
        "sampler": s.sampler, "num_steps": s.num_steps, "nfe": nfe,
        "t_min": s.t_min if s.sampler == "sde" else None,
        "final_step": "sde_mean" if s.sampler == "sde" else None, "time_shift": s.time_shift,
        "guidance": s.guidance, "guidance_scale": s.guidance_scale, "cls_guidance_scale": s.cls_guidance_scale,
        "guidance_interval": [s.guidance_low, s.guidance_high],
        "labels": "balanced (index mod num_classes)" if s.balanced_labels else "uniform random",
        "num_classes": cfg.model.num_classes, "num_samples": s.num_samples, "batch": s.batch, "seed": s.seed,
        "precision": s.precision, "tf32": tf32, "sampler_state_dtype": str(STATE_DTYPES[s.state_precision]).replace("torch.", ""), "device_type": device.type,
        "decoder": decoder, "quantisation": "clamp(255 (x + 1) / 2, 0, 255) -> uint8 by truncation",
        "config": cfg.to_dict(),
    }


def describe(settings: dict) -> list[str]:
    s = settings
    low, high = s["guidance_interval"]
    guidance = (f"{s['guidance']} scale {s['guidance_scale']} (class token {s['cls_guidance_scale']}) "
                f"for t in [{low}, {high}]"
                if s["guidance"] != "none" else "none")
    step = f", step {s['step']}" if s.get("step") is not None else ""
    return [
        f"checkpoint {s['checkpoint']} ({s['kind']}{step}, {s['weights']} weights)"
        + (f", preset {s['preset']}" if s.get("preset") else ""),
        "settings that move FID:",
        (f"  sampler {s['sampler']}  steps {s['num_steps']}  NFE {s['nfe']}  t_min {s['t_min']}  "
         f"final step {s['final_step']}  time shift {s['time_shift']:.6g}"),
        f"  guidance {guidance}",
        (f"  labels {s['labels']} over {s['num_classes']} classes  num_samples {s['num_samples']:,}  "
         f"batch {s['batch']}  seed {s['seed']}"),
        (f"  precision {s['precision']} (sampler state {s['sampler_state_dtype']})  "
         f"TF32 {'on' if s['tf32'] else 'off'}  noise on {s['device_type']}  "
         f"decoder {s['decoder']}"),
    ]


def read_settings(path: str) -> dict:
    """The settings stored in a samples npz ({} when it has none)."""
    with np.load(path) as f:
        return json.loads(str(f["settings"])) if "settings" in f.files else {}


# ----------------------------------------------------------------------------- parts


class Parts:
    """Finished batches of an interrupted or running job: OUT.parts/batch_<b>.npz, atomic."""

    def __init__(self, out: str):
        self.dir = f"{out}.parts"

    def path(self, b: int) -> str:
        return os.path.join(self.dir, f"batch_{b:06d}.npz")

    def done(self, b: int) -> bool:
        return os.path.exists(self.path(b))

    def write(self, b: int, images: np.ndarray, labels: np.ndarray) -> None:
        with atomic_write(self.path(b)) as f:
            np.savez(f, images=images, labels=labels)

    def read(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            part = read_arrays(self.path(b), ("images", "labels"))
        except ValueError as error:  # damaged after planning checked it: the next run draws it again
            raise SamplingError(f"{error}; rerun the same command to draw it again") from None
        return part["images"], part["labels"]

    def damage(self, b: int, expected: int) -> str | None:
        """Why part b cannot be used, naming it (unreadable, or not `expected` uint8 images and
        int64 labels), or None when it can: a part is read whole once before it is trusted."""
        path = self.path(b)
        try:
            part = read_arrays(path, ("images", "labels"))
        except ValueError as error:
            return str(error)
        images, labels = part["images"], part["labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != expected:
            return f"{path} holds images {images.dtype} {images.shape}, expected uint8 [{expected}, H, W, 3]"
        if labels.dtype != np.int64 or labels.shape != (expected,):
            return f"{path} holds labels {labels.dtype} {labels.shape}, expected int64 [{expected}]"
        return None

    def check_settings(self, settings: dict) -> None:
        """Create the folder for a new job, or check that an interrupted one had the same settings
        (enforced once it holds a batch: a job that failed before its first one blocks nothing)."""
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, "settings.json")
        if os.path.exists(path) and any(n.startswith("batch_") for n in os.listdir(self.dir)):
            with open(path) as f:
                old = json.load(f)
            check_same_settings(old, settings, what=f"{self.dir} holds batches of an interrupted run with other settings",
                                fix=f"rerun with the same settings to resume, or delete {self.dir} to start over",
                                error=SamplingError)
            return
        write_json(path, settings)


def assemble(out: str, parts: Parts, settings: dict) -> None:
    """Stream every part, in batch order, into OUT (written beside it, then renamed)."""
    n, batch = settings["num_samples"], settings["batch"]
    missing = [b for b in range(num_batches(n, batch)) if not parts.done(b)]
    if missing:
        raise SamplingError(f"batches {missing[:10]} are missing in {parts.dir}; rerun the command to finish them")
    first, _ = parts.read(0)
    labels = []
    with atomic_write(out) as f, NpzWriter(f) as writer:
        images = writer.member("arr_0", (n, *first.shape[1:]), np.uint8)
        for b in range(num_batches(n, batch)):
            rows, lab = parts.read(b)
            expected = min(batch, n - b * batch)
            if len(rows) != expected or len(lab) != expected:
                raise SamplingError(f"{parts.path(b)} holds {len(rows)} samples, expected {expected}; "
                                    "delete it and rerun")
            images.write(rows)
            labels.append(lab)
        images.close()
        writer.add("arr_1", np.concatenate(labels).astype(np.int64))
        writer.add("settings", np.array(json.dumps(settings, sort_keys=True)))


def write_grid(out: str, grid: str) -> None:
    with NpzRows(out, "arr_0") as rows:
        first = next(rows.batches(GRID_SAMPLES))
    save_grid(torch.from_numpy(first.copy()).permute(0, 3, 1, 2), grid, nrow=10)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    return distributed.run_command("srdit.sample", sample, parse_args(argv),
                                   (ConfigError, SamplingError, ValueError, FileNotFoundError))


def _status(out: str, parts: Parts, settings: dict) -> str:
    """'complete' (OUT exists with these settings) or 'todo'; raises on conflicting files."""
    if os.path.exists(out):
        try:
            old = read_settings(out)
        except Exception as error:
            raise SamplingError(f"{out} exists and is not a readable samples file ({error}); remove it") from error
        check_same_settings(old, settings, what=f"{out} exists with other settings",
                            fix="choose another --out or remove it", error=SamplingError)
        return "complete"
    parts.check_settings(settings)
    return "todo"


def sample(args, dist) -> int:
    device = dist.device
    say = print if dist.is_main else (lambda *a, **k: None)
    model, cfg, source = load_model(args.ckpt, args.preset, args.overrides, device)
    s = cfg.sample
    tf32 = device.type == "cuda" and s.precision == "fp32" and not args.no_tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    vae, decoder = load_decoder(cfg, args.vae, device)
    settings = fid_settings(cfg, source, decoder, tf32, device)
    out = os.path.abspath(args.out)
    grid = args.grid or os.path.splitext(out)[0] + ".png"
    parts = Parts(out)
    say(f"srdit.sample  code {code_version()}  torch {torch.__version__}  device {device_name(device)} x {dist.world}")
    for line in describe(settings):
        say(line)
    with distributed.locked_output(f"{out}.lock", f"the samples file {out}", dist):
        if dist.is_main:
            for path in (remove_stale_temporaries(parts.dir)
                         + remove_stale_temporaries(os.path.dirname(out), prefix=os.path.basename(out))):
                say(f"removed {path}, left by a job that was killed while writing it")
        todo = plan(out, parts, grid, settings, dist)
        if todo is None:
            say(f"{out} is already complete with these settings; nothing to do")
            return 0
        done_before, elapsed = draw(model, cfg, vae, parts, todo, dist)
        distributed.barrier()
        if dist.is_main:
            assemble(out, parts, settings)
            write_grid(out, grid)
            shutil.rmtree(parts.dir)
            new = s.num_samples - done_before
            say(f"wrote {out}: {s.num_samples:,} samples ({new:,} new in {elapsed:.1f} s, "
                f"{new / max(elapsed, 1e-9):.2f} samples/s over {dist.world} process(es)); grid {grid}")
    return 0


def plan(out: str, parts: Parts, grid: str, settings: dict, dist) -> list[int] | None:
    """The batches still to draw (None: OUT is complete). Rank 0 decides (the files are shared
    by all ranks); every rank gets its verdict or its error, then reads its share of the parts
    already drawn (damaged_parts): those that cannot be used are drawn again."""
    n = num_batches(settings["num_samples"], settings["batch"])
    verdict, drawn = None, []
    if dist.is_main:
        try:
            verdict = _status(out, parts, settings)
            drawn = [b for b in range(n) if parts.done(b)]
        except SamplingError as error:
            verdict = f"error: {error}"
    verdict, drawn = distributed.broadcast_object((verdict, drawn))
    if verdict.startswith("error: "):
        raise SamplingError(verdict[len("error: "):])
    if verdict != "complete":
        usable = set(drawn) - damaged_parts(parts, drawn, settings, dist)
        return [b for b in range(n) if b not in usable]
    if dist.is_main and not os.path.exists(grid):
        write_grid(out, grid)
    if dist.is_main and os.path.isdir(parts.dir):  # interrupted after the rename: tidy up
        shutil.rmtree(parts.dir)
    return None


def damaged_parts(parts: Parts, drawn: list[int], settings: dict, dist) -> set[int]:
    """The parts of `drawn` that cannot be used: each is removed (so it is drawn again, never
    assembled) and rank 0 names it. Every rank reads an equal share of the parts (a resumed 50K
    run at 512 px holds ~39 GB of them)."""
    found = []
    for b in drawn[dist.rank::dist.world]:
        start, stop = batch_range(b, settings["num_samples"], settings["batch"])
        why = parts.damage(b, stop - start)
        if why:
            os.remove(parts.path(b))  # before the gather: no rank draws batch b while this file exists
            found.append((b, why))
    found = sorted(item for share in distributed.all_gather_objects(found) for item in share)
    if dist.is_main:
        for b, why in found:
            print(f"{why}: removed, batch {b} is drawn again", flush=True)
    return {b for b, _ in found}


def draw(model, cfg, vae, parts: Parts, todo: list[int], dist) -> tuple[int, float]:
    """This rank's share of the batches to do, each written as a part. The remaining batches,
    not all batches, are dealt round-robin, so a resumed job stays balanced (ranks wait at most
    one batch at the barrier). Returns (samples done before this job, seconds)."""
    s = cfg.sample
    done_before = s.num_samples - sum(min(s.batch, s.num_samples - b * s.batch) for b in todo)
    if done_before and dist.is_main:
        print(f"resuming: {done_before:,} of {s.num_samples:,} samples already in {parts.dir}")
    progress = Progress("sample", s.num_samples, unit="img", initial=done_before, enabled=dist.is_main)
    start = time.perf_counter()
    for b in todo[dist.rank::dist.world]:
        images, labels = generate_batch(model, cfg, b, device=dist.device, vae=vae)
        parts.write(b, images.permute(0, 2, 3, 1).cpu().numpy(), labels.cpu().numpy())
        progress.update(min(len(labels) * dist.world, s.num_samples - progress.n))  # rank 0 speaks for all
    progress.close()
    return done_before, time.perf_counter() - start

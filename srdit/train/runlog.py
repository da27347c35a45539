"""What a run tells the person running it: a self-describing header (STYLE 11), progress (a bar
on a terminal, a line every train.log_every steps in a log file), metrics.jsonl, optional wandb,
GPU telemetry when there is a GPU, and a loss-curve PNG.

metrics.jsonl is strict JSON, one object per line: a value that is not finite (the loss of a
skipped step) is written as null, as JSON has no NaN. A resumed run keeps it as the run's one
history (keep_history_until).

Only rank 0 writes. Every method is cheap unless it is called at a log step.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch

from srdit.io import raise_naming, write_text
from srdit.progress import Progress
from srdit.runinfo import peak_flops


def strict_json(record: dict) -> str:
    """One metrics.jsonl line: non-finite numbers become null (json.dumps would write NaN)."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()},
                      allow_nan=False)


def read_history(path: str) -> list[tuple[int, str, dict | None]]:
    """(line number, line, the row or None where the line is not a JSON object) for each line of
    a metrics.jsonl that is not blank."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                rows.append((number, line, row if isinstance(row, dict) else None))
    return rows


def keep_history_until(path: str, step: int) -> str | None:
    """metrics.jsonl of a resumed run: rows after the resumed step (logged by the attempt that was
    cut short) are dropped, atomically, so the file stays the run's one history. A line that does
    not parse after the last row kept (a crash in mid-write) goes with them; one before it is
    damage inside the history: a ValueError naming the file and the line. Returns a note for the
    log when damaged lines were dropped."""
    if not os.path.exists(path):
        return None
    rows = read_history(path)
    kept = max((i + 1 for i, (_, _, row) in enumerate(rows) if row is not None and row.get("step", 0) <= step),
               default=0)
    damaged = [(number, line) for number, line, row in rows[:kept] if row is None]
    if damaged:
        number, line = damaged[0]
        raise ValueError(f"{path} line {number} is not a JSON row ({line.strip()[:60]!r}), before the resumed step "
                         f"{step}: repair or delete that line")
    if kept != len(rows) or (rows and not rows[-1][1].endswith("\n")):  # the next row must start a line
        write_text(path, "".join(line if line.endswith("\n") else line + "\n" for _, line, _ in rows[:kept]))
    dropped = [number for number, _, row in rows[kept:] if row is None]
    if dropped:
        return (f"dropped {len(dropped)} line(s) of {path} that were not JSON (line {dropped[0]}: a write cut short) "
                f"with the rows after the resumed step {step}")
    return None


class GpuTelemetry:
    """Utilisation, memory, power and SM clock through nvidia-ml-py; absent without a GPU."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no nvidia-ml-py or no NVML library: telemetry is optional
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        nv, h = self.nvml, self.handle
        return {
            "gpu_util": nv.nvmlDeviceGetUtilizationRates(h).gpu,
            "gpu_mem_gb": nv.nvmlDeviceGetMemoryInfo(h).used / 2**30,
            "gpu_power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000,
            "gpu_sm_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
        }


class RunLog:
    def __init__(self, out_dir: str, cfg, *, enabled: bool, start_step: int, max_steps: int, device: torch.device,
                 flops_per_image: float, global_batch: int):
        self.enabled, self.out_dir, self.cfg = enabled, out_dir, cfg
        self.flops_per_image, self.global_batch = flops_per_image, global_batch
        self.peak = peak_flops(device)
        self.telemetry = GpuTelemetry(device) if enabled else None
        self.wandb = None
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.progress = Progress("train", max_steps, unit="step", initial=start_step, enabled=enabled, seconds=None)
        self.last = None  # the last record logged by this process
        if not enabled:
            return
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.metrics = open(self.metrics_path, "a")
        if cfg.train.wandb_mode != "disabled":
            import wandb  # optional: only when asked for

            self.wandb = wandb.init(project=cfg.train.wandb_project, name=cfg.train.wandb_name or None,
                                    mode=cfg.train.wandb_mode, dir=out_dir, config=cfg.to_dict(), resume="allow")

    def print(self, *lines: str) -> None:
        for line in lines:
            self.progress.write(line)

    def header(self, lines: list[str]) -> None:
        self.print(*lines)

    @contextlib.contextmanager
    def untimed(self):
        """Time spent inside (checkpoints, samples) does not count against img/s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.last_time += time.perf_counter() - start

    def step(self) -> None:
        self.progress.update(1)

    def log(self, step: int, values: dict, lr: float) -> dict:
        """One metrics.jsonl record for the steps since the previous call."""
        now = time.perf_counter()
        steps = max(1, step - self.last_step)
        img_per_s = steps * self.global_batch / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        record = {"step": step, **values, "lr": lr, "img_per_s": img_per_s,
                  "model_tflops": img_per_s * self.flops_per_image / 1e12}
        if self.peak:
            record["mfu"] = img_per_s * self.flops_per_image / self.peak
        self.last = record
        if not self.enabled:
            return record
        record.update(self.telemetry.read())
        self._append(record)
        self.progress.line(loss=f"{values['loss']:.4f}", **{"img/s": f"{img_per_s:.0f}"})
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        return record

    def record(self, step: int, values: dict) -> None:
        """An extra metrics.jsonl record (e.g. the quick evaluation), also sent to wandb."""
        if not self.enabled:
            return
        self._append({"step": step, **values})
        self.print(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in values.items()))
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def _append(self, record: dict) -> None:
        try:
            self.metrics.write(strict_json(record) + "\n")
            self.metrics.flush()
        except OSError as error:  # a full disk: name the file
            raise_naming(error, self.metrics_path)

    def image(self, name: str, path: str, step: int) -> None:
        if self.enabled and self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(path)}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.close()
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss_curve(metrics_path: str, png_path: str, width: int = 640, height: int = 360) -> None:
    """A loss-versus-step line plot from metrics.jsonl, drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    points = [(row["step"], row["loss"]) for _, _, row in read_history(metrics_path)
              if row is not None and isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"])]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    if len(points) >= 2:
        steps, losses = zip(*points)
        s0, s1 = min(steps), max(steps)
        l0, l1 = min(losses), max(losses)
        l1 = l1 if l1 > l0 else l0 + 1e-6
        xy = [(left + (s - s0) / max(s1 - s0, 1) * (right - left), bottom - (v - l0) / (l1 - l0) * (bottom - top))
              for s, v in points]
        draw.line(xy, fill=(31, 119, 180), width=2)
        draw.text((4, top), f"{l1:.3f}", fill="black")
        draw.text((4, bottom - 10), f"{l0:.3f}", fill="black")
        draw.text((left, bottom + 8), f"step {s0}", fill="black")
        draw.text((right - 80, bottom + 8), f"step {s1}", fill="black")
    draw.text((left + 8, top + 4), "training loss (total)", fill="black")
    image.save(png_path)

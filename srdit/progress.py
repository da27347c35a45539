"""Progress that reads well both on a terminal and in a log file (SLURM, nohup, `> log.txt`).

On a terminal: tqdm's bar. Otherwise, where a bar would print nothing useful (tqdm disables
itself when stdout is not a terminal), plain lines:

    train  step 300/1500 (20%)  loss 0.1234  img/s 512  elapsed 0:01:23  ETA 0:05:32

one per `line()` call (the trainer calls it every train.log_every steps), with `seconds` one at
least that often while `update()` is called (sample, eval, prepare), and a last one at `close()`
for what came after the previous line. Rates and the ETA
count only what this process did (a resumed run starts its clock at the resumed step).
"""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, name: str, total: int, *, unit: str, initial: int = 0, enabled: bool = True,
                 seconds: float | None = 30.0, stream=None):
        self.name, self.total, self.unit, self.n = name, total, unit, initial
        self.enabled, self.seconds, self.stream = enabled, seconds, stream or sys.stdout
        self.start_n, self.start = initial, time.perf_counter()
        self.last_line, self.lined_n = self.start, initial
        self.values: dict[str, str] = {}
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, **values) -> None:
        """Count n more units; values (name -> number or text) are shown with the next line."""
        self.n += n
        self._set(values)
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.seconds is not None and time.perf_counter() - self.last_line >= self.seconds:
            self.line()

    def line(self, **values) -> None:
        """Show the state now: a plain line in a log file, the bar's postfix on a terminal."""
        self._set(values)
        if self.bar is not None:
            self.bar.set_postfix_str("  ".join(f"{k} {v}" for k, v in self.values.items()), refresh=True)
        elif self.enabled:
            self.write(self.text())
            self.last_line, self.lined_n = time.perf_counter(), self.n

    def text(self) -> str:
        elapsed = time.perf_counter() - self.start
        done = self.n - self.start_n
        eta = (self.total - self.n) * elapsed / done if done > 0 else float("nan")
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        values = "".join(f"  {k} {v}" for k, v in self.values.items())
        rate = f"  {done / elapsed:.3g} {self.unit}/s" if done > 0 and elapsed > 0 else ""
        return (f"{self.name}  {self.unit} {self.n:,}/{self.total:,}{share}{values}{rate}  "
                f"elapsed {_clock(elapsed)}  ETA {_clock(eta) if eta == eta else '?'}")

    def write(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n != self.lined_n:
            self.line()

    def _set(self, values: dict) -> None:
        for key, value in values.items():
            self.values[key] = f"{value:.4g}" if isinstance(value, float) else str(value)

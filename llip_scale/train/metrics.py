"""Observability on rank 0: TensorBoard scalars, ``metrics.jsonl``, and a progress display.

The training loop feeds :class:`StepMeter` (time waiting for data vs. total time per step);
every ``logging.every`` steps it turns that into rates (steps/s, samples/s, data-wait fraction,
MFU from the model's FLOPs per sample), the loop adds loss, lr, logit scale/bias, grad norm and
skipped-sample counts, and :class:`MetricsWriter` appends one JSON line and the same scalars to
TensorBoard, while :class:`Progress` shows a bar with ETA on a terminal or plain lines in a log.
On resume, entries past the checkpoint's step (written by the interrupted attempt) are dropped
from both, so the files describe one consistent run.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, TextIO


class MetricsWriter:
    """``RUN/metrics.jsonl`` and ``RUN/tensorboard/``; a no-op where ``enabled`` is False."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb_dir = Path(run_dir) / "tensorboard"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(self.path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: seconds to import, rank 0 only
            # purge_step hides events an interrupted attempt wrote past the resume point.
            self._tb = SummaryWriter(str(self.tb_dir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, scalars: dict[str, float | str]) -> None:
        """One line of ``scalars``; strings (e.g. ``data/keys_digest``) go to the JSON line only."""
        if not self.enabled:
            return
        clean = {k: (v if v is None or isinstance(v, str) else float(v)) for k, v in scalars.items()}
        line = {"step": step, "time": round(time.time(), 3),
                **{k: (v if v is None or isinstance(v, str) or math.isfinite(v) else str(v)) for k, v in clean.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None and not isinstance(v, str):
                    self._tb.add_scalar(k, v, step)

    def figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib figure as a TensorBoard image (closed afterwards)."""
        if self._tb is not None:
            self._tb.add_figure(tag, figure, step, close=True)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by a kill
    path.write_text("".join(f"{line}\n" for line in kept))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The entries of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class StepMeter:
    """Wall time split into waiting for data and the rest, between two :meth:`rates` calls."""

    def __init__(self, samples_per_step: int, flops_per_sample: float, peak_flops: float):
        self.samples_per_step = samples_per_step
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self._start = time.perf_counter()
        self._wait = 0.0
        self._steps = 0

    def waited(self, seconds: float) -> None:
        self._wait += seconds

    def stepped(self) -> None:
        self._steps += 1

    def rates(self) -> dict[str, float]:
        """Throughput since the last call (then restarts the window)."""
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        samples_per_s = self._steps * self.samples_per_step / elapsed
        out = {"perf/steps_per_s": self._steps / elapsed, "perf/samples_per_s": samples_per_s,
               "perf/data_wait": self._wait / elapsed,
               "perf/mfu": samples_per_s * self.flops_per_sample / self.peak_flops}
        self._start, self._wait, self._steps = now, 0.0, 0
        return out


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
    """A bar with ETA on a terminal, one plain line per update otherwise; silent when disabled.
    On stdout (log messages and errors go to stderr), flushed at each update, so
    ``llip-train ... > train.log`` receives every line as it happens."""

    def __init__(self, total: int, start: int, mode: str, enabled: bool, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total, self.start = total, start
        self._t0 = time.perf_counter()
        self._open_bar = False

    def eta(self, step: int) -> float:
        done = step - self.start
        rate = done / max(time.perf_counter() - self._t0, 1e-9)
        return (self.total - step) / rate if done > 0 else float("inf")

    def update(self, step: int, scalars: dict[str, float]) -> None:
        if self.mode == "none":
            return
        loss = scalars.get("train/loss")
        parts = [f"loss {loss:.4f}" if loss is not None and math.isfinite(loss) else "loss nan",
                 f"lr {scalars.get('train/lr', 0):.2e}",
                 f"{scalars.get('perf/samples_per_s', 0):.1f} samples/s",
                 f"data {100 * scalars.get('perf/data_wait', 0):.0f}%",
                 f"ETA {_clock(self.eta(step))}"]
        if self.mode == "bar":
            width = 24
            filled = int(width * step / max(self.total, 1))
            text = f"\r{step}/{self.total} [{'#' * filled}{'.' * (width - filled)}] " + " | ".join(parts)
            cols = shutil.get_terminal_size((120, 20)).columns
            self.stream.write(text[: cols - 1].ljust(cols - 1))
            self._open_bar = True
        else:
            pct = 100 * step / max(self.total, 1)
            self.stream.write(f"step {step}/{self.total} ({pct:.0f}%) " + "  ".join(parts) + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that does not break the bar."""
        if self.mode == "none":
            return
        if self._open_bar:
            self.stream.write("\n")
            self._open_bar = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open_bar:
            self.stream.write("\n")
            self.stream.flush()
            self._open_bar = False

"""What a run reports: `metrics.jsonl`, TensorBoard, the console, and a loss plot.

`metrics.jsonl` holds one JSON object per event, each with `step` and wall-clock `time`, and keys such
as `train/loss`, `val/loss`, `train/lr`, `throughput/tokens_per_s`, `memory/peak_bytes`. It is the
source of truth: the plot and `papertrain ls` read it back.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

Scalar = float | int


class MetricsLog:
    """Appends events to RUN_DIR/metrics.jsonl and mirrors scalars to TensorBoard when available."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional: JSONL is always written
                self.writer = None
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled or not values:
            return
        event = {"step": step, "time": round(time.time(), 3)}
        event.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
                elif isinstance(value, str):
                    self.writer.add_text(key, value.replace("\n", "  \n"), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.writer is not None:
            self.writer.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible rather than dropping it
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    events = []
    for raw in path.read_bytes().splitlines():
        if not raw.strip():
            continue
        try:
            event = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # a line cut short by a kill, or bytes some other program appended: skip it
        if isinstance(event, dict):
            events.append(event)
    return events


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop events logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    kept = [e for e in read_metrics(path) if e.get("step", 0) <= last_step]
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
    os.replace(temporary, path)


def last_values(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest value of every key across events."""
    latest: dict[str, Any] = {}
    for event in events:
        latest.update(event)
    return latest


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI logs, Slurm output files)."""

    def __init__(self, mode: str, total: int, initial: int, enabled: bool = True):
        if not enabled or mode == "none":
            self.mode = "none"
        elif mode == "auto":
            self.mode = "bar" if sys.stderr.isatty() else "plain"
        else:
            self.mode = mode
        self.total = total
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, status: dict[str, str], eta_s: float | None) -> None:
        if self.mode == "bar":
            self.bar.n = step
            self.bar.set_postfix(status, refresh=True)
        elif self.mode == "plain":
            parts = [f"step {step}/{self.total}"] + [f"{k} {v}" for k, v in status.items()]
            if eta_s is not None:
                parts.append(f"eta {format_duration(eta_s)}")
            print(" | ".join(parts), flush=True)

    def write(self, line: str) -> None:
        if self.mode == "bar":
            self.bar.write(line)
        elif self.mode == "plain":
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def plot_curves(events: list[dict[str, Any]], out: Path, title: str, loss_unit: str | None = None) -> Path | None:
    """Loss curves (train, smoothed, and validation) beside the learning rate, as one PNG; the loss axis
    says its unit (e.g. nats/char) where the task names one."""
    train = [(e["step"], e["train/loss"]) for e in events if isinstance(e.get("train/loss"), (int, float))]
    val = [(e["step"], e["val/loss"]) for e in events if isinstance(e.get("val/loss"), (int, float))]
    lr = [(e["step"], e["train/lr"]) for e in events if isinstance(e.get("train/lr"), (int, float))]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    if train:
        steps, losses = zip(*window_centres(train))
        left.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train")
        left.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="train (smoothed)")
    if val:
        steps, losses = zip(*val)
        left.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="validation")
    left.set_xlabel("step")
    left.set_ylabel(f"loss ({loss_unit})" if loss_unit else "loss")
    left.set_title(title)
    left.grid(alpha=0.3)
    left.legend()
    if lr:
        steps, rates = zip(*lr)
        right.plot(steps, rates, color="tab:green")
    right.set_xlabel("step")
    right.set_title("learning rate")
    right.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def window_centres(logged: list[tuple[int, float]]) -> list[tuple[float, float]]:
    """A logged train loss is the mean over the steps since the previous line (steps p+1 .. s): drawn at
    the middle of that window, (p+1+s)/2, not at its end, where it would sit above a falling validation
    curve by the loss the model lost in half a window."""
    centred, previous = [], 0
    for step, value in logged:
        centred.append(((previous + 1 + step) / 2, value))
        previous = step
    return centred


def smooth(values: tuple[float, ...]) -> list[float]:
    """A centred moving average over ~1/15 of the curve (narrower near the ends, so each point is the
    mean of a window around it). Centred, it does not lag: a trailing average of a falling loss lies
    above the raw curve for most of a run, which reads as a worse loss than the model has."""
    n = len(values)
    half = max(0, n // 30)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    smoothed = []
    for i in range(n):
        h = min(half, i, n - 1 - i)
        smoothed.append((prefix[i + h + 1] - prefix[i - h]) / (2 * h + 1))
    return smoothed


def format_count(n: float) -> str:
    """A parameter or token count for people: 818048 -> '818K', 30464 -> '30.5K', 20.55e9 -> '20.6B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return f"{n:.0f}"

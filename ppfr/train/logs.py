"""Training logs: metrics.csv always, TensorBoard event files when asked, and a progress display.

The CSV is the source of truth (appended across resumes, one row per logged step). TensorBoard is optional: the
``tensorboard`` package is imported only when ``tensorboard: true``; without it the run stops before training with an
error saying what to install, rather than silently logging nothing. The progress display is a single redrawn line
(loss, lr, images/s, ETA) on a terminal and plain log lines otherwise (CI logs, nohup files).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import TextIO

CSV_FIELDS = ["stage", "epoch", "step", "global_step", "lr", "loss", "images_per_s"]


class TrainLog:
    """Per-run metric sink. Only the main rank writes; other ranks get a no-op instance (``enabled=False``)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = False, progress: str = "auto",
                 quiet: bool = False, stream: TextIO | None = None) -> None:  # fmt: skip
        self.enabled = enabled
        self.quiet = quiet or not enabled
        self.stream = stream or sys.stdout
        self.bar = progress == "bar" or (progress == "auto" and self.stream.isatty())
        self._bar_open = False
        self._csv_file = None
        self._csv = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.csv"
        new = not path.exists() or path.stat().st_size == 0
        self._csv_file = open(path, "a", newline="")
        self._csv = csv.writer(self._csv_file)
        if new:
            self._csv.writerow(CSV_FIELDS)
            self._csv_file.flush()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # a ModuleNotFoundError naming its module: `ppfr train` says which extra
                self.close()
                msg = ("tensorboard: true needs the tensorboard package (pip install 'ppfr[train]'); "
                       f"importing it failed: {exc}")
                raise ModuleNotFoundError(msg, name=exc.name) from None
            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def message(self, msg: str) -> None:
        """A plain line (ends an open progress bar first)."""
        if self.quiet:
            return
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
        print(msg, file=self.stream, flush=True)

    def step(self, *, stage: str, epoch: int, step: int, steps: int, global_step: int, lr: float, loss: float,
             images_per_s: float, eta_s: float | None = None, extra: dict[str, float] | None = None,
             label: str | None = None) -> None:  # fmt: skip
        """Record one logged step: a CSV row, TensorBoard scalars, and the progress display (``label``, e.g.
        ``epoch 0 pass 2/3``, replaces ``epoch N`` in the display; the CSV keeps the pass counter ``epoch``)."""
        if not self.enabled:
            return
        self._csv.writerow([stage, epoch, step, global_step, f"{lr:.6g}", f"{loss:.6f}", f"{images_per_s:.1f}"])
        self._csv_file.flush()
        if self._tb is not None:
            self._tb.add_scalar(f"{stage}/loss", loss, global_step)
            self._tb.add_scalar(f"{stage}/lr", lr, global_step)
            self._tb.add_scalar(f"{stage}/images_per_s", images_per_s, global_step)
            for k, v in (extra or {}).items():
                self._tb.add_scalar(f"{stage}/{k}", v, global_step)
        if self.quiet:
            return
        eta = f" eta {_hms(eta_s)}" if eta_s is not None else ""
        if self.bar:
            width = 24
            done = int(width * (step + 1) / max(steps, 1))
            line = (f"\r[{stage}] {label or f'ep {epoch}'} |{'#' * done}{'.' * (width - done)}| {step + 1}/{steps} "
                    f"loss {loss:.4f} lr {lr:.4g} {images_per_s:.1f} img/s{eta}")  # fmt: skip
            self.stream.write(line.ljust(100))
            self.stream.flush()
            self._bar_open = True
        else:
            print(f"[{stage}] {label or f'epoch {epoch}'} step {step + 1}/{steps} lr {lr:.4g} loss {loss:.4f} "
                  f"{images_per_s:.1f} img/s{eta}", file=self.stream, flush=True)  # fmt: skip

    def scalars(self, tag_values: dict[str, float], global_step: int) -> None:
        """Extra scalars (e.g. verification accuracy) for TensorBoard; a no-op without it."""
        if self._tb is not None:
            for k, v in tag_values.items():
                self._tb.add_scalar(k, v, global_step)

    def close(self) -> None:
        if self._bar_open and not self.quiet:
            self.stream.write("\n")
            self._bar_open = False
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None

    def __enter__(self) -> TrainLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


"""Progress output that suits where it goes: tqdm bars on a terminal, a few plain lines in a log file.

A tqdm bar redraws itself on every step with a carriage return; written to a file (nohup, SLURM, `> log`)
every redraw is kept, and a 40-second tiny fine-tune left 190 KB of them. When stderr is not a terminal,
training prints one line per epoch (its epoch metrics, validation's once it has run) and, during a long
epoch, one line every `interval_s` seconds; loops over volumes print one line every `interval_s` seconds
and one at the end. Under DDP only global rank zero prints.
"""

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from tqdm import tqdm

from samora_pl.records.manifest import is_rank_zero

T = TypeVar("T")
INTERVAL_S = 60.0


def interactive() -> bool:
    """True when progress goes to a terminal (tqdm writes to stderr)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(label: str) -> ProgressBar:
    """The Trainer's progress callback: tqdm on a terminal, `LineProgressBar` otherwise."""
    return TQDMProgressBar(refresh_rate=1) if interactive() else LineProgressBar(label)


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LineProgressBar(ProgressBar):
    """One line per training epoch, and one per `interval_s` seconds inside a long epoch (rank zero only).

    The epoch line is printed when the next epoch starts (or training ends), because Lightning computes a
    finished epoch's means only after every `on_train_epoch_end` hook has run."""

    def __init__(self, label: str, interval_s: float = INTERVAL_S):
        super().__init__()
        self.label = label
        self.interval_s = interval_s
        self.enabled = True
        self._pending: int | None = None  # a finished epoch whose line is still to print
        self._started = self._last = 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _emit(self, text: str) -> None:
        if self.enabled:
            print(f"{self.label}: {text}", file=sys.stderr, flush=True)

    def _epoch_line(self, trainer, pl_module) -> None:
        if self._pending is None:
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = " ".join(f"{k}={_format(v)}" for k, v in metrics.items() if not k.endswith("_step"))
        seconds = time.monotonic() - self._started
        self._emit(f"epoch {self._pending + 1}/{trainer.max_epochs} ({seconds:.1f} s) {shown}".rstrip())
        self._pending = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_line(trainer, pl_module)
        self._started = self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            total = self.total_train_batches
            of = f"/{total}" if isinstance(total, int) else ""
            self._emit(f"epoch {trainer.current_epoch + 1} step {batch_idx + 1}{of}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._pending = trainer.current_epoch

    def on_train_end(self, trainer, pl_module) -> None:
        self._epoch_line(trainer, pl_module)


def track(items: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterator[T]:
    """`items` with progress: a tqdm bar on a terminal, else a line every `INTERVAL_S` seconds and at the end.

    Only global rank zero shows it: under DDP every rank loops over its share (evaluation's volumes), and
    one line per rank would repeat itself N times; rank zero's share tells how far the run is."""
    if not is_rank_zero():
        yield from items
        return
    if interactive():
        yield from tqdm(items, desc=desc, unit=unit, total=total)
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    of = f"/{total}" if total is not None else ""
    started = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= INTERVAL_S:
            last = now
            print(f"{desc}: {done}{of} {unit}s", file=sys.stderr, flush=True)
    if done:
        print(f"{desc}: {done}{of} {unit}s in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)

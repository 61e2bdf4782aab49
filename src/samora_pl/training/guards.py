"""Numerical guard shared by every stage: what happens when a training loss is not finite.

`build_trainer` adds one `NonFiniteGuard` callback per stage (it knows the stage, its folder and
`skip_nonfinite`); each module's `training_step` passes its loss through `guard_loss(self, loss)`:

* a finite loss is returned unchanged;
* with `skip_nonfinite=true` the batch is skipped (`None`, which Lightning treats as "no backward, no
  optimiser step"), counted, logged as `train/nonfinite_skipped` and reported in the stage's manifest;
* otherwise the stage stops with a `SamoraError` naming the stage, the global step and the last good
  checkpoint. The error leaves `trainer.fit` before any hand-off file is written, so the previous
  expert / teacher / final model stays as it was; `check_finite_state` is a second check just before a
  hand-off file is written.

Limitation: under DDP the guard acts per process. A loss that is non-finite on one rank only (skipped or
raised there) leaves the other ranks waiting in their gradient all-reduce; that case is not handled yet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch

from samora_pl.errors import SamoraError

log = logging.getLogger(__name__)


class NonFiniteGuard(L.Callback):
    """Holds the stage's name, folder and policy; counts the batches it skipped."""

    def __init__(self, stage: str, folder: Path, skip: bool = False):
        self.stage = stage
        self.folder = Path(folder)
        self.skip = bool(skip)
        self.skipped = 0

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}  # the count survives a resume

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def last_checkpoint(self) -> Path | None:
        last = self.folder / "checkpoints" / "last.ckpt"
        return last if last.exists() else None

    def failure(self, module: L.LightningModule, loss: torch.Tensor) -> SamoraError:
        last = self.last_checkpoint()
        where = (
            f"the last good checkpoint is {last} (re-running the same command resumes from it)"
            if last
            else f"there is no checkpoint yet in {self.folder / 'checkpoints'}"
        )
        return SamoraError(
            f"{self.stage}: the training loss became non-finite ({float(loss.detach()):g}) at global step "
            f"{module.global_step} (epoch {module.current_epoch}); the stage stopped without writing its hand-off "
            f"file and {where}. Lower the learning rate, check the data (`samora check`), or set "
            "skip_nonfinite=true to skip such batches."
        )


def find_guard(module: L.LightningModule) -> NonFiniteGuard | None:
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None
    for callback in trainer.callbacks:
        if isinstance(callback, NonFiniteGuard):
            return callback
    return None


def guard_loss(module: L.LightningModule, loss: torch.Tensor) -> torch.Tensor | None:
    """The loss if finite; None (skip the batch) with skip_nonfinite; else raise SamoraError."""
    if bool(torch.isfinite(loss.detach()).all()):
        return loss
    guard = find_guard(module)
    if guard is None:  # a module driven without build_trainer (tests): stop, naming what we know
        guard = NonFiniteGuard(type(module).__name__, Path("."))
    if not guard.skip:
        raise guard.failure(module, loss)
    guard.skipped += 1
    log.warning(
        "%s: skipped a batch with a non-finite loss at global step %d (%d skipped so far)",
        guard.stage,
        module.global_step,
        guard.skipped,
    )
    module.log("train/nonfinite_skipped", float(guard.skipped), on_step=True, on_epoch=False)
    return None


def skipped_batches(trainer: L.Trainer) -> dict:
    """{"skipped_nonfinite_batches": n} for a stage's manifest ({} without a guard)."""
    for callback in trainer.callbacks:
        if isinstance(callback, NonFiniteGuard):
            return {"skipped_nonfinite_batches": callback.skipped}
    return {}


def check_finite_state(tensors: Iterable[tuple[str, torch.Tensor]], what: str, path: Path) -> None:
    """Refuse to write a hand-off file whose weights hold NaN or inf (the previous file stays)."""
    bad = [name for name, value in tensors if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise SamoraError(
            f"{what}: the trained weights hold non-finite values ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); {path} was not written. Lower the learning rate or check the data."
        )

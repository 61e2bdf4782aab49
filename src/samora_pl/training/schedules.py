"""Learning-rate schedules used by every stage (linear warm-up, then poly or cosine decay) and AdamW's
weight-decay groups.

They are step-based multipliers for `torch.optim.lr_scheduler.LambdaLR`, so Lightning steps them with
`interval="step"` and their state resumes with the optimiser's.
"""

import math
from collections.abc import Callable, Iterable

import torch


def _warmup_then(total_steps: int, warmup_steps: int, decay: Callable[[float], float], horizon: str = "after_warmup"):
    """Multiplier: linear ramp to 1 over `warmup_steps` (step 0 at 1/warmup), then `decay(progress)`.

    horizon="after_warmup": progress = (step - warmup) / (total - warmup), 0 -> 1 after the warm-up.
    horizon="total": progress = (step - warmup) / total, as SAMed's and H-SAM's trainers compute it, so
    progress ends below 1 (a poly LR stays above 0)."""
    if horizon not in ("after_warmup", "total"):
        raise ValueError(f"horizon must be after_warmup or total, got {horizon!r}")
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
    span = total_steps if horizon == "total" else max(total_steps - warmup_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay(min((step - warmup_steps) / span, 1.0))

    return factor


def schedule_steps(steps_run: int, epochs_run: int, schedule_epochs=None) -> tuple:
    """(optimiser steps per epoch, steps the schedule spans) of a run of `steps_run` optimiser steps (not
    micro-batches: Lightning's `estimated_stepping_batches` counts after gradient accumulation) over
    `epochs_run` epochs, whose schedule spans `schedule_epochs` (SAMed: 200, of which it trains 160);
    unset, the schedule spans the run."""
    per_epoch = max(int(steps_run) // max(int(epochs_run), 1), 1)
    if schedule_epochs is None or int(schedule_epochs) == int(epochs_run):
        return per_epoch, int(steps_run)
    return per_epoch, per_epoch * int(schedule_epochs)


def warmup_poly(total_steps: int, warmup_steps: int, power: float = 0.9, horizon: str = "after_warmup"):
    """Linear warm-up, then (1 - progress) ** power (down to 0 with horizon="after_warmup")."""
    return _warmup_then(total_steps, warmup_steps, lambda progress: (1.0 - progress) ** power, horizon)


def warmup_cosine(total_steps: int, warmup_steps: int, min_factor: float = 0.0):
    """Linear warm-up, then half a cosine down to `min_factor`."""
    return _warmup_then(
        total_steps,
        warmup_steps,
        lambda progress: min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress)),
    )


def decay_groups(named_parameters: Iterable[tuple], weight_decay: float, no_decay_names=()) -> list[dict]:
    """AdamW parameter groups of the trainable `(name, parameter)` pairs: weight decay on matrices and
    kernels; none on biases, norm weights, per-block LoRA scales (<= 1-D) and the named tokens."""
    decay, rest = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (rest if param.ndim <= 1 or name in no_decay_names else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    return groups + [{"params": rest, "weight_decay": 0.0}] if rest else groups


def lightning_scheduler(optimizer, factor) -> dict:
    """Wrap a multiplier as the scheduler dict Lightning's `configure_optimizers` expects."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}

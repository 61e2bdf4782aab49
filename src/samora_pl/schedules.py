"""Learning-rate schedules used by every stage: linear warm-up followed by poly or cosine decay.

They are step-based multipliers for `torch.optim.lr_scheduler.LambdaLR`, so Lightning steps them with
`interval="step"` and their state resumes with the optimiser's.
"""

import math

import torch


def warmup_poly(total_steps: int, warmup_steps: int, power: float = 0.9):
    """Multiplier: linear ramp to 1 over `warmup_steps`, then (1 - progress) ** power down to 0."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return max(1.0 - progress, 0.0) ** power

    return factor


def warmup_cosine(total_steps: int, warmup_steps: int, min_factor: float = 0.0):
    """Multiplier: linear ramp to 1 over `warmup_steps`, then half a cosine down to `min_factor`."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def lightning_scheduler(optimizer, factor) -> dict:
    """Wrap a multiplier as the scheduler dict Lightning's `configure_optimizers` expects."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}

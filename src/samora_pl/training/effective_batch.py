"""The global batch of one optimiser step, reached with gradient accumulation where the devices cannot.

SAMed's and H-SAM's trainers multiply the per-GPU batch by their GPU count (`batch_size * n_gpu`): one
optimiser step sees 24 (SAMed) or 16 (H-SAM) slices. `data.effective_batch_size` states that global batch;
the fine-tune then runs `data.batch_size` per device and accumulates
effective / (batch_size x world size) micro-batches per step (Lightning's `accumulate_grad_batches`), so
the same recipe holds on one device or on two.
"""

from omegaconf import ListConfig

from samora_pl.errors import SamoraError

KEYS = "data.effective_batch_size, data.batch_size, trainer.devices (DEVICES) and trainer.num_nodes"


def known_world_size(devices, num_nodes: int) -> int | None:
    """Processes of the run when the config says how many (a count or a list); None for auto / -1."""
    if isinstance(devices, (list, tuple, ListConfig)):
        count = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        count = devices
    else:
        return None
    return count * max(int(num_nodes), 1)


def accumulation(effective: int | None, per_device: int, world: int | None) -> int:
    """Micro-batches per optimiser step so that per_device x world x steps = effective (1 when unset)."""
    if effective is None:
        return 1
    if effective < 1:
        raise SamoraError(f"Config key 'data.effective_batch_size' is {effective}; it must be a positive integer.")
    if world is None:
        raise SamoraError(
            f"Config key 'data.effective_batch_size' is {effective}, which needs a known number of devices: set "
            "trainer.devices (DEVICES) to a count or a list of device indices, not auto or -1."
        )
    step = per_device * world
    if effective % step:
        fits = [b for b in range(1, per_device + 1) if effective % (b * world) == 0]  # no larger micro-batch
        hint = f"data.batch_size={max(fits)}" if fits else f"fewer devices (at most {effective})"
        raise SamoraError(
            f"data.effective_batch_size={effective} is not a multiple of data.batch_size={per_device} x "
            f"{world} device(s) = {step}: the keys {KEYS} must give effective = batch_size x devices x "
            f"accumulation; try {hint}."
        )
    return effective // step

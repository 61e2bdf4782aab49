"""The training sampler under DDP, made by the data module rather than injected by Lightning, so that a run
resumed from a checkpoint shuffles its first epoch as the uninterrupted run did.

Lightning replaces a shuffling DataLoader's sampler with a `DistributedSampler` and calls its `set_epoch`
at the start of every epoch, but the first epoch of a fit runs on an iterator made earlier, and with data
workers that iterator draws the epoch's whole permutation the moment it is made. Worse, the stages'
`configure_optimizers` read `trainer.estimated_stepping_batches`, which builds the loader (and that iterator)
while the strategy is set up: after the checkpoint is read, before the loops' progress is restored from it.
An uninterrupted run does not notice (its first epoch is epoch 0, the sampler's default); a run resumed after
epoch k shuffled epoch k as epoch 0, so the ranks saw other slices than the uninterrupted run did in that one
epoch. This sampler is Lightning's own (the same arguments and seed, `PL_GLOBAL_SEED`) with the epoch the fit
is about to run already set, so fresh and resumed runs shard and shuffle exactly as the fit loop would;
Lightning leaves a `DistributedSampler` it is given in place.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset, DistributedSampler


def epoch_about_to_run(trainer) -> int:
    """What the fit loop will pass to `set_epoch` at the start of its next epoch: the epochs processed, taken
    from the checkpoint being resumed while its loop progress is not restored yet (see the module's text)."""
    loaded = trainer._checkpoint_connector._loaded_checkpoint  # held from reading the checkpoint to resume_end
    if loaded and "loops" in loaded:
        return int(loaded["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    return int(trainer.fit_loop.epoch_progress.current.processed)


def training_sampler(dataset: Dataset, trainer) -> DistributedSampler | None:
    """The shuffling `DistributedSampler` Lightning would add, set to the epoch about to run; None outside a
    distributed fit (no trainer, one process): the DataLoader then shuffles with `shuffle=True`."""
    if trainer is None:
        return None
    connector = trainer._accelerator_connector  # Lightning's own test (DataConnector._requires_distributed_sampler)
    if not (connector.use_distributed_sampler and connector.is_distributed):
        return None
    sampler = DistributedSampler(
        dataset, shuffle=True, seed=int(os.getenv("PL_GLOBAL_SEED", 0)), **trainer.distributed_sampler_kwargs
    )
    sampler.set_epoch(epoch_about_to_run(trainer))
    return sampler

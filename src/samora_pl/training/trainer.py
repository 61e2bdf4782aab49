"""One place that turns a stage's `TrainerSpec` into a Lightning Trainer, the same for every stage.

Lightning does the distributed work: `strategy=auto` with more than one device or node selects DDP (gloo on
CPU, NCCL on GPU; multi-node through torchrun or SLURM), `precision` selects mixed precision. How many
processes there are is the Trainer's (or Fabric's) `world_size`, never read off the config: `devices=-1`
or `auto` means every device the machine has. Every stage logs to `runs/<run>/tb/<stage>/<sub>` (or to
the tracker config key `logger` names: training/loggers.py) and checkpoints into its stage folder.
"""

import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

from samora_pl.config.specs import TrainerSpec
from samora_pl.records.checkpoint_io import AtomicCheckpointIO
from samora_pl.training.callbacks import RandomState
from samora_pl.training.guards import NonFiniteGuard
from samora_pl.training.loggers import build_logger, logger_dir
from samora_pl.training.progress import progress_bar


def build_fabric(spec: TrainerSpec) -> L.Fabric:
    """A Fabric of the trainer spec, for work outside a Trainer (`samora evaluate`), not launched yet.

    Its `world_size` is the real process count (`devices=-1`, `auto`, a list, `num_nodes`, torchrun or
    SLURM), which the config text alone does not say."""
    return L.Fabric(
        accelerator=spec.accelerator,
        devices=_devices(spec.devices),
        num_nodes=spec.num_nodes,
        strategy=spec.strategy,
    )


def _devices(devices):
    """Lightning takes device indices as a list."""
    return list(devices) if isinstance(devices, tuple) else devices


def build_trainer(
    spec: TrainerSpec,
    run_root: Path,
    folder: Path,
    stage: str,
    sub: str,
    callbacks: list[Callback] | None = None,
    checkpoint_every_n_epochs: int = 1,
) -> L.Trainer:
    """A Trainer logging to the run's tracker (`spec.logger`, TensorBoard by default, under `run_root`) and
    checkpointing `last.ckpt` into `folder`, for `spec.max_epochs`, the stage's own epochs.

    `spec.accumulate_grad_batches` micro-batches make one optimiser step (the fine-tune's global batch,
    `training/effective_batch.py`); Lightning scales each micro-batch's loss by its inverse.

    Also applies `spec.threads` (torch intra-op threads) for this process, since every stage passes here.
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    # a resumed stage checkpoints into its own non-empty folder on purpose
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
    # the tracker of config key `logger` (TensorBoard by default) under the run folder: training/loggers.py
    logger = build_logger(spec.logger, logger_dir(run_root, spec.logger), stage, sub)
    # `last.ckpt` after every `checkpoint_every_n_epochs` epochs, overwritten in place: the latest state is
    # the one "top-1" checkpoint (no monitor). `save_last=True, save_top_k=0` would write it only when
    # training ends (Lightning saves `last` only beside a top-k save), so a killed run could not resume.
    checkpoint = ModelCheckpoint(
        dirpath=str(Path(folder) / "checkpoints"),
        filename="last",
        save_last=False,
        save_top_k=1,
        every_n_epochs=checkpoint_every_n_epochs,
        save_on_train_epoch_end=True,  # after that epoch's validation; also when validation is not every epoch
        enable_version_counter=False,
    )
    guard = NonFiniteGuard(f"{stage} {sub}", folder, skip=spec.skip_nonfinite)
    all_callbacks = [
        checkpoint,
        LearningRateMonitor(logging_interval="step"),
        progress_bar(f"{stage} {sub}"),  # tqdm on a terminal, a line per epoch in a log file
        guard,
        RandomState(),
    ]
    all_callbacks += list(callbacks or [])
    return L.Trainer(
        accelerator=spec.accelerator,
        devices=_devices(spec.devices),
        num_nodes=spec.num_nodes,
        strategy=spec.strategy,  # auto: Lightning picks DDP for more than one device or node
        precision=spec.precision,
        max_epochs=spec.max_epochs,
        log_every_n_steps=spec.log_every_n_steps,
        check_val_every_n_epoch=spec.check_val_every_n_epoch,
        limit_train_batches=spec.limit_train_batches,
        accumulate_grad_batches=spec.accumulate_grad_batches,
        deterministic=spec.deterministic,
        logger=logger,
        callbacks=all_callbacks,
        plugins=[AtomicCheckpointIO()],  # last.ckpt is replaced whole or not at all (full disk, kill)
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )

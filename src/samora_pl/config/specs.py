"""Plain, typed specs that the stage plans hand to the layers below them (models, training, run folders).

Each spec holds resolved values only: a builder that takes one (`build_segmenter`, `build_trainer`,
`build_fabric`) never sees the configuration, so what it depends on is visible in its signature.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunFolders:
    """Where a run lives: `runs/<run>/<stage>/<sub>/` for outputs, `runs/<run>/tb/` for TensorBoard."""

    runs_dir: Path
    run: str

    @property
    def root(self) -> Path:
        return Path(self.runs_dir) / self.run

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    def stage(self, stage: str, sub: str = "") -> Path:
        return self.root / stage / sub


@dataclass(frozen=True)
class TrainerSpec:
    """What a stage's Lightning Trainer (or Fabric) is made of; `max_epochs` is the stage's own."""

    accelerator: str
    devices: Any  # a count, -1 / "auto", or a tuple of device indices
    num_nodes: int
    strategy: str
    precision: str
    max_epochs: int
    log_every_n_steps: int
    check_val_every_n_epoch: int
    limit_train_batches: Any
    image_log_every_n_epochs: int
    deterministic: bool
    threads: int | None
    skip_nonfinite: bool
    logger: str = "tensorboard"  # the run's tracker (training/loggers.py)
    accumulate_grad_batches: int = 1

    def for_epochs(self, max_epochs: int) -> TrainerSpec:
        return replace(self, max_epochs=max_epochs)


@dataclass(frozen=True)
class ExpertLayout:
    """The LoRA slots of a segmenter and how their residuals are fused (`models/adapters/fusion.py`)."""

    experts: tuple[str, ...]
    fusion: str


@dataclass(frozen=True)
class SegmenterSpec:
    """SAM or SAM 2 with its LoRA rank, fusion settings and decoder; `checkpoint` None means a random
    frozen encoder seeded by `encoder_seed`, while the trainable parts follow `seed`."""

    family: str  # a Family value
    variant: str
    img_size: int
    lora_rank: int
    hl_order: str
    hl_width: int | None
    hl_heads: int | None
    hl_init: str
    lac_weights: tuple[float, ...] | None
    checkpoint: str | None
    grad_checkpoint: bool
    encoder_seed: int
    seed: int
    pos_embed_resize: str
    decoder: str  # a Decoder value
    hsam_cmattn: str
    hsam_cmattn_heads: int | None
    hsam_noise: float
    hsam_inference: str

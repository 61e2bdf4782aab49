"""`samora check`: validate a dataset (every file, key, shape, label value) without training."""

import logging

from omegaconf import DictConfig

from data_modules import build_datamodule
from samora_pl.config.compose import data_options

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> dict:
    """Run the dataset's full check; it raises one SamoraError listing every problem it finds."""
    data = build_datamodule(cfg.data.name, root=cfg.data.dir, img_size=cfg.model.img_size, **data_options(cfg))
    summary = data.validate() or {}
    log.info("%s at %s: no problems found. %s", cfg.data.name, cfg.data.dir, summary)
    return summary

"""`samora check`: validate a dataset (every file, key, shape, label value) without training."""

import logging

from omegaconf import DictConfig

from data_modules import build_datamodule

log = logging.getLogger(__name__)


def data_options(cfg: DictConfig) -> dict:
    """The dataset options the user set (data.intensity, data.list_dir), for every stage that builds data;
    unset ones are left out, so a dataset without them is only refused when they are asked for."""
    options = {"intensity": None if cfg.data.intensity == "auto" else cfg.data.intensity,
               "list_dir": cfg.data.list_dir}
    return {key: value for key, value in options.items() if value is not None}


def check(cfg: DictConfig) -> dict:
    """Run the dataset's full check; it raises one SamoraError listing every problem it finds."""
    data = build_datamodule(cfg.data.name, root=cfg.data.dir, img_size=cfg.model.img_size, **data_options(cfg))
    summary = data.validate() or {}
    log.info("%s at %s: no problems found. %s", cfg.data.name, cfg.data.dir, summary)
    return summary

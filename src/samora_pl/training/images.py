"""Pictures of the stages (segmentation panels, reconstructions, views) to whichever tracker a run uses.

The stage modules make one RGB or grey image [C, H, W] in [0, 1] and hand it to `log_images`, which sends it
to every logger of the trainer, on global rank zero only (the others would repeat it): TensorBoard's
`add_image`, MLflow's `log_image` on the logger's run, W&B's `log_image` (a `wandb.Image`). A logger that
stores no images (CSV) gets a PNG file in an `images/` folder beside its metrics, so no picture is dropped.
"""

import logging
import re
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
_warned: set = set()


def image_loggers(trainer) -> list:
    """The trainer's loggers where this process draws pictures (global rank zero), else []. Stages check it
    before composing a picture, so other ranks do no work for one."""
    if trainer is None or not trainer.is_global_zero:
        return []
    return list(trainer.loggers)


def log_images(loggers: list, tag: str, image_chw: torch.Tensor, step: int) -> None:
    """`log_image` to each of `loggers`."""
    for logger in loggers:
        log_image(logger, tag, image_chw, step)


def to_uint8(image_chw: torch.Tensor) -> np.ndarray:
    """[C, H, W] floats in [0, 1] -> [H, W, C] uint8 (C = 3 or 4), or [H, W] for one channel."""
    image = image_chw.detach().float().cpu().clamp(0, 1)
    if image.dim() == 2:
        image = image.unsqueeze(0)
    array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def png_name(tag: str, step: int) -> str:
    """A file name for picture `tag` at `step`: `val/slice_truth` -> `val__slice_truth_step000012.png`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag.replace("/", "__"))
    return f"{safe}_step{int(step):06d}.png"


def save_png(folder: Path, tag: str, image_chw: torch.Tensor, step: int) -> Path:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / png_name(tag, step)
    Image.fromarray(to_uint8(image_chw)).save(path)
    return path


def log_image(logger, tag: str, image_chw: torch.Tensor, step: int) -> None:
    """One picture [C, H, W] in [0, 1] to one Lightning logger, in the form that logger stores pictures."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, image_chw.detach().float().cpu(), step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, to_uint8(image_chw), key=tag, step=int(step))
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[to_uint8(image_chw)], step=int(step))
    elif isinstance(logger, CSVLogger) or getattr(logger, "log_dir", None):
        save_png(Path(logger.log_dir) / "images", tag, image_chw, step)
    elif type(logger).__name__ not in _warned:
        _warned.add(type(logger).__name__)
        log.warning("%s stores no images and has no folder: pictures such as %s are not kept", type(logger), tag)

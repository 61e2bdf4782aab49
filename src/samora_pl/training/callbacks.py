"""TensorBoard pictures, throughput and fusion diagnostics, shared by the stages.

Label maps are shown as colour overlays on the grey slice, because people judge a segmentation by
looking at it; one panel row per sample: slice | ground truth | prediction.
"""

import time

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from samora_pl.training.images import image_loggers

# Background transparent, then distinct colours for up to 13 classes (Synapse's 8 first).
PALETTE = (
    torch.tensor(
        [
            [0, 0, 0],
            [230, 25, 75],
            [60, 180, 75],
            [255, 225, 25],
            [0, 130, 200],
            [245, 130, 48],
            [145, 30, 180],
            [70, 240, 240],
            [240, 50, 230],
            [210, 245, 60],
            [250, 190, 190],
            [0, 128, 128],
            [170, 110, 40],
            [128, 128, 128],
        ],
        dtype=torch.float32,
    )
    / 255.0
)


def overlay(image: torch.Tensor, label: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Grey slice [H, W] in [0, 1] with label map [H, W] blended in colour -> RGB [3, H, W]."""
    grey = image.float().clamp(0, 1).unsqueeze(0).repeat(3, 1, 1)
    colours = PALETTE[label.long().clamp(0, len(PALETTE) - 1)].permute(2, 0, 1)
    mask = (label > 0).unsqueeze(0).float() * alpha
    return grey * (1 - mask) + colours * mask


def segmentation_panel(images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
    """Rows of (slice, ground truth, prediction) for a batch -> one RGB image [3, rows*H, 3*W]."""
    rows = []
    for image, label, pred in zip(images.cpu(), labels.cpu(), preds.cpu()):
        grey = image[0] if image.dim() == 3 else image
        rows.append(torch.cat([overlay(grey, torch.zeros_like(label)), overlay(grey, label), overlay(grey, pred)], 2))
    return torch.cat(rows, 1)


def tensorboard(trainer: L.Trainer):
    """The SummaryWriter of the trainer's TensorBoard logger, or None (other loggers, non-zero ranks)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
            return logger.experiment
    return None


class Throughput(L.Callback):
    """Logs training images per second (per process) once per logging interval, and on CUDA the peak
    memory allocated since training started (`perf/peak_memory_gib`), the figure that decides batch sizes."""

    def __init__(self):
        self._start = None
        self._images = 0

    def on_train_start(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        self._images += images.shape[0]
        if (batch_idx + 1) % max(trainer.log_every_n_steps, 1) == 0:
            elapsed = time.perf_counter() - self._start
            pl_module.log("perf/images_per_s", self._images / max(elapsed, 1e-9), on_step=True, on_epoch=False)
            if pl_module.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
                pl_module.log("perf/peak_memory_gib", peak, on_step=True, on_epoch=False)
            self._start, self._images = time.perf_counter(), 0


class FusionDiagnostics(L.Callback):
    """What the fusion modules do, per block, at each validation of a fine-tune (the sanity check excluded).

    Each fusion records only during validation (``Fusion.record_diagnostics``), so training keeps its fast
    attention path; at the end of the epoch every value goes to the run's tracker as ``fusion/blockNN/<name>``
    (HL-Attn: g1, g2, gamma, entropy_step1/2, entropy_uniform; MoLE: gate_<expert>, tau; LAC:
    weight_<expert>) and the latest set is kept in :attr:`latest` for the fine-tune's manifest. Each rank
    records its own validation share; rank zero's is the one written."""

    def __init__(self, fusions):
        self.fusions = list(fusions)
        self.latest = None

    def _record(self, on: bool) -> None:
        for fusion in self.fusions:
            fusion.record_diagnostics(on)

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._record(True)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not self.fusions or not self.fusions[0].recording:
            return
        blocks = {f"block{i:02d}": fusion.diagnostics() for i, fusion in enumerate(self.fusions)}
        self._record(False)
        blocks = {name: values for name, values in blocks.items() if values}
        if not blocks:
            return
        self.latest = {"epoch": trainer.current_epoch, "step": trainer.global_step, "blocks": blocks}
        scalars = {f"fusion/{block}/{key}": value for block, values in blocks.items() for key, value in values.items()}
        for logger in image_loggers(trainer):  # every tracker of the run, on rank zero
            logger.log_metrics(scalars, step=trainer.global_step)


class RandomState(L.Callback):
    """Keeps the global random generators (torch, CUDA, numpy, python) in every checkpoint and puts them back
    on resume, so a resumed run shuffles and augments exactly as the uninterrupted run would have.

    The data pipeline draws from torch's global generator (see data_modules/labelled/transforms.py); without this a
    run resumed from last.ckpt would replay the first epoch's randomness after `seed_everything`.
    """

    def state_dict(self) -> dict:
        import random

        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],  # plain types: weights_only loads
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        import random

        import numpy as np

        if "torch" in state_dict:
            torch.set_rng_state(state_dict["torch"].cpu())
        if "numpy" in state_dict:
            kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        if "python" in state_dict:
            version, internal, gauss = state_dict["python"]
            random.setstate((version, tuple(internal), gauss))
        if "cuda" in state_dict and torch.cuda.is_available() and len(state_dict["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state_dict["cuda"])

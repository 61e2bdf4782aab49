"""LightningModule of MAE continual pre-training: reconstruct the masked 75% of patches.

AdamW with betas (0.9, 0.95) and weight decay 0.05 (none on biases, norms, class and mask tokens), lr set
by the stage as base_lr x global batch / 256, linear warm-up then cosine decay per step. Reconstructions
(input | masked input | reconstruction with the visible patches pasted) go to TensorBoard at an interval.
"""

from collections.abc import Sequence

import torch
from torchvision.utils import make_grid

from samora_pl.models.teachers.mae import MaeTeacher
from samora_pl.stages.cpt.module import CptModule
from samora_pl.training.guards import guard_loss
from samora_pl.training.images import image_loggers, log_images


class MaeCpt(CptModule):
    PREFIX = "cpt_mae"
    NO_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")

    def __init__(
        self,
        teacher: MaeTeacher,
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_epochs: float = 1.0,
        image_log_every_n_epochs: int = 1,
    ):
        super().__init__(teacher, lr, weight_decay, warmup_epochs, image_log_every_n_epochs, betas)

    def training_step(self, images, batch_idx):
        loss, pred, mask = self.teacher(images)
        if guard_loss(self, loss) is None:
            return None  # skip_nonfinite: counted by the guard
        self.log(
            "cpt_mae/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0], sync_dist=True
        )
        if self.tally(loss, images.shape[0], batch_idx):
            self._log_reconstructions(images, pred, mask)
        return loss

    def _log_reconstructions(self, images, pred, mask) -> None:
        loggers = image_loggers(self.trainer)
        if not loggers:
            return
        n = min(8, images.shape[0])
        original, masked, pasted = self.teacher.reconstruct(images[:n], pred[:n].detach(), mask[:n])
        rows = torch.stack([original, masked, pasted], dim=1).flatten(0, 1).float().cpu()
        grid = make_grid(rows, nrow=3, padding=2, pad_value=1.0)
        log_images(loggers, "cpt_mae/reconstructions", grid, self.global_step)

"""LightningModule of MAE continual pre-training: reconstruct the masked 75% of patches.

AdamW with betas (0.9, 0.95) and weight decay 0.05 (none on biases, norms, class and mask tokens), lr set
by the stage as base_lr x global batch / 256, linear warm-up then cosine decay per step. Reconstructions
(input | masked input | reconstruction with the visible patches pasted) go to TensorBoard at an interval.
"""

import time
from typing import List, Sequence

import lightning as L
import torch
from torchvision.utils import make_grid

from samora_pl.callbacks import tensorboard
from samora_pl.guards import guard_loss
from samora_pl.image_cadence import ImageCadence
from samora_pl.models.mae import MaeTeacher
from samora_pl.schedules import lightning_scheduler, warmup_cosine
from samora_pl.stages.cpt_simclr import decay_groups

NO_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


class MaeCpt(L.LightningModule):
    def __init__(
        self,
        teacher: MaeTeacher,
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_epochs: float = 1.0,
        image_log_every_n_epochs: int = 1,
    ):
        super().__init__()
        self.teacher = teacher
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_epochs = warmup_epochs
        self.image_cadence = ImageCadence(image_log_every_n_epochs)
        self.epoch_losses: List[float] = []
        self._sum, self._count, self._images, self._started = 0.0, 0, 0, None

    def on_train_epoch_start(self) -> None:
        self._sum, self._count, self._images, self._started = 0.0, 0, 0, time.perf_counter()

    def training_step(self, images, batch_idx):
        loss, pred, mask = self.teacher(images)
        if guard_loss(self, loss) is None:
            return None  # skip_nonfinite: counted by the guard
        self.log(
            "cpt_mae/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0], sync_dist=True
        )
        self._sum += float(loss.detach())
        self._count += 1
        self._images += images.shape[0]
        if batch_idx == 0 and self.image_cadence.due(self.current_epoch):
            self._log_reconstructions(images, pred, mask)
        return loss

    def on_train_epoch_end(self) -> None:
        if self._count:  # all ranks together: mean loss, summed throughput
            strategy = self.trainer.strategy
            loss = strategy.reduce(torch.tensor(self._sum / self._count, device=self.device), reduce_op="mean")
            seconds = time.perf_counter() - self._started
            rate = torch.tensor(self._images / max(seconds, 1e-9), device=self.device)
            self.epoch_losses.append(float(loss))
            self.log("cpt_mae/epoch_images_per_s", strategy.reduce(rate, reduce_op="sum"))

    def _log_reconstructions(self, images, pred, mask) -> None:
        writer = tensorboard(self.trainer)
        if writer is None:
            return
        n = min(8, images.shape[0])
        original, masked, pasted = self.teacher.reconstruct(images[:n], pred[:n].detach(), mask[:n])
        rows = torch.stack([original, masked, pasted], dim=1).flatten(0, 1).float().cpu()
        writer.add_image("cpt_mae/reconstructions", make_grid(rows, nrow=3, padding=2, pad_value=1.0), self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["epoch_losses"] = list(self.epoch_losses)  # the loss history survives a resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.epoch_losses = list(checkpoint.get("epoch_losses", []))

    def configure_optimizers(self):
        groups = decay_groups(self.teacher, self.weight_decay, NO_DECAY)
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = self.trainer.estimated_stepping_batches
        per_epoch = total / max(self.trainer.max_epochs or 1, 1)
        schedule = warmup_cosine(total, int(self.warmup_epochs * per_epoch))
        return {"optimizer": optimizer, "lr_scheduler": lightning_scheduler(optimizer, schedule)}

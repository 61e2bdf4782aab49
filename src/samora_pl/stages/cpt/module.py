"""What the two CPT LightningModules share: the per-epoch loss history (kept in checkpoints, so a resumed
run reports the whole curve), epoch throughput summed over ranks, and AdamW with linear warm-up and cosine
decay stepped per batch. Subclasses compute the loss and call `tally`."""

import time
from collections.abc import Sequence

import lightning as L
import torch

from samora_pl.training.image_cadence import ImageCadence
from samora_pl.training.schedules import decay_groups, lightning_scheduler, warmup_cosine


class CptModule(L.LightningModule):
    PREFIX = "cpt"  # TensorBoard tag prefix
    NO_DECAY: Sequence[str] = ()  # parameter names (besides <= 1-D ones) without weight decay

    def __init__(
        self,
        teacher: torch.nn.Module,
        lr: float,
        weight_decay: float,
        warmup_epochs: float,
        image_log_every_n_epochs: int,
        betas: Sequence[float] = (0.9, 0.999),
    ):
        super().__init__()
        self.teacher = teacher
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_epochs = warmup_epochs
        self.image_cadence = ImageCadence(image_log_every_n_epochs)
        self.epoch_losses: list[float] = []
        self._sum, self._count, self._images, self._started = 0.0, 0, 0, None

    def tally(self, loss: torch.Tensor, images: int, batch_idx: int) -> bool:
        """Count a finite step's loss and images; True when this step logs images to TensorBoard."""
        self._sum += float(loss.detach())
        self._count += 1
        self._images += images
        return batch_idx == 0 and self.image_cadence.due(self.current_epoch)

    def on_train_epoch_start(self) -> None:
        self._sum, self._count, self._images, self._started = 0.0, 0, 0, time.perf_counter()

    def on_train_epoch_end(self) -> None:
        if self._count:  # all ranks together: mean loss, summed throughput
            strategy = self.trainer.strategy
            loss = strategy.reduce(torch.tensor(self._sum / self._count, device=self.device), reduce_op="mean")
            seconds = time.perf_counter() - self._started
            rate = torch.tensor(self._images / max(seconds, 1e-9), device=self.device)
            self.epoch_losses.append(float(loss))
            self.log(f"{self.PREFIX}/epoch_images_per_s", strategy.reduce(rate, reduce_op="sum"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["epoch_losses"] = list(self.epoch_losses)  # the loss history survives a resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.epoch_losses = list(checkpoint.get("epoch_losses", []))

    def configure_optimizers(self):
        groups = decay_groups(self.teacher.named_parameters(), self.weight_decay, self.NO_DECAY)
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = self.trainer.estimated_stepping_batches
        per_epoch = total / max(self.trainer.max_epochs or 1, 1)
        schedule = warmup_cosine(total, int(self.warmup_epochs * per_epoch))
        return {"optimizer": optimizer, "lr_scheduler": lightning_scheduler(optimizer, schedule)}

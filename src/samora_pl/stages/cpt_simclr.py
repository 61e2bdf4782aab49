"""LightningModule of SimCLRv2 continual pre-training: NT-Xent on two augmented views of each slice.

Both views go through the network in one batch (BatchNorm sees both, as in SimCLR); negatives are
gathered from every DDP rank. AdamW (no decay on biases and norms) with linear warm-up and cosine decay,
stepped per batch. LARS, used by SimCLRv2 for batches of thousands, is not implemented: AdamW is the
usual choice at the batch sizes of continual pre-training.
"""

import time
from typing import List

import lightning as L
import torch
from torchvision.utils import make_grid

from samora_pl.callbacks import tensorboard
from samora_pl.guards import guard_loss
from samora_pl.image_cadence import ImageCadence
from samora_pl.losses.nt_xent import nt_xent
from samora_pl.models.simclr import SimclrTeacher
from samora_pl.schedules import lightning_scheduler, warmup_cosine


def decay_groups(module: torch.nn.Module, weight_decay: float, no_decay_names=()) -> List[dict]:
    """Parameter groups: weight decay on matrices and kernels, none on biases, norms and named tokens."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in no_decay_names:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SimclrCpt(L.LightningModule):
    def __init__(
        self,
        teacher: SimclrTeacher,
        temperature: float = 0.1,
        lr: float = 3e-4,
        weight_decay: float = 1e-6,
        warmup_epochs: float = 1.0,
        gather_negatives: bool = True,
        image_log_every_n_epochs: int = 1,
    ):
        super().__init__()
        self.teacher = teacher
        self.temperature = temperature
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.gather_negatives = gather_negatives
        self.image_cadence = ImageCadence(image_log_every_n_epochs)
        self.epoch_losses: List[float] = []
        self._sum, self._count, self._images, self._started = 0.0, 0, 0, None

    def on_train_epoch_start(self) -> None:
        self._sum, self._count, self._images, self._started = 0.0, 0, 0, time.perf_counter()

    def training_step(self, batch, batch_idx):
        view1, view2 = batch
        z = self.teacher(torch.cat([view1, view2]))
        z1, z2 = z.chunk(2)
        loss, accuracy = nt_xent(z1, z2, self.temperature, gather=self.gather_negatives, return_accuracy=True)
        if guard_loss(self, loss) is None:
            return None  # skip_nonfinite: counted by the guard
        size = view1.shape[0]
        self.log("cpt_simclr/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("cpt_simclr/positive_top1", accuracy, on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
        self._sum += float(loss.detach())
        self._count += 1
        self._images += 2 * size
        if batch_idx == 0 and self.image_cadence.due(self.current_epoch):
            self._log_views(view1, view2)
        return loss

    def on_train_epoch_end(self) -> None:
        if self._count:  # all ranks together: mean loss, summed throughput
            strategy = self.trainer.strategy
            loss = strategy.reduce(torch.tensor(self._sum / self._count, device=self.device), reduce_op="mean")
            seconds = time.perf_counter() - self._started
            rate = torch.tensor(self._images / max(seconds, 1e-9), device=self.device)
            self.epoch_losses.append(float(loss))
            self.log("cpt_simclr/epoch_images_per_s", strategy.reduce(rate, reduce_op="sum"))

    def _log_views(self, view1: torch.Tensor, view2: torch.Tensor) -> None:
        writer = tensorboard(self.trainer)
        if writer is None:
            return
        n = min(8, view1.shape[0])
        pairs = torch.stack([view1[:n], view2[:n]], dim=1).flatten(0, 1).detach().float().cpu()
        writer.add_image("cpt_simclr/views", make_grid(pairs, nrow=2, padding=2, pad_value=1.0), self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["epoch_losses"] = list(self.epoch_losses)  # the loss history survives a resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.epoch_losses = list(checkpoint.get("epoch_losses", []))

    def configure_optimizers(self):
        groups = decay_groups(self.teacher, self.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        total = self.trainer.estimated_stepping_batches
        per_epoch = total / max(self.trainer.max_epochs or 1, 1)
        schedule = warmup_cosine(total, int(self.warmup_epochs * per_epoch))
        return {"optimizer": optimizer, "lr_scheduler": lightning_scheduler(optimizer, schedule)}

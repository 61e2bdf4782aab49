"""LightningModule of SimCLRv2 continual pre-training: NT-Xent on two augmented views of each slice.

Both views go through the network in one batch (BatchNorm sees both, as in SimCLR); negatives are
gathered from every DDP rank. AdamW (no decay on biases and norms) with linear warm-up and cosine decay,
stepped per batch. LARS, used by SimCLRv2 for batches of thousands, is not implemented: AdamW is the
usual choice at the batch sizes of continual pre-training.
"""

import torch
from torchvision.utils import make_grid

from samora_pl.losses.nt_xent import nt_xent
from samora_pl.models.teachers.simclr import SimclrTeacher
from samora_pl.stages.cpt.module import CptModule
from samora_pl.training.guards import guard_loss
from samora_pl.training.images import image_loggers, log_images


class SimclrCpt(CptModule):
    PREFIX = "cpt_simclr"

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
        super().__init__(teacher, lr, weight_decay, warmup_epochs, image_log_every_n_epochs)
        self.temperature = temperature
        self.gather_negatives = gather_negatives

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
        if self.tally(loss, 2 * size, batch_idx):
            self._log_views(view1, view2)
        return loss

    def _log_views(self, view1: torch.Tensor, view2: torch.Tensor) -> None:
        loggers = image_loggers(self.trainer)
        if not loggers:
            return
        n = min(8, view1.shape[0])
        pairs = torch.stack([view1[:n], view2[:n]], dim=1).flatten(0, 1).detach().float().cpu()
        log_images(loggers, "cpt_simclr/views", make_grid(pairs, nrow=2, padding=2, pad_value=1.0), self.global_step)

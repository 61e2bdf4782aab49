"""Stage 2 LightningModule: trains the fusion (HL-Attn or a baseline) and the mask decoder.

The module receives a built `SAMoraSegmenter` whose trainable parameters are already chosen
(`set_trainable(mode)`); it adds the loss, the optimiser schedule, validation Dice and image panels.
With H-SAM's decoder (`model.decoder=hsam`) the loss is H-SAM's two-stage loss (`losses/hsam.py`); both
stage losses and their weight go to TensorBoard, and the panels show each stage's prediction. AdamW's weight
decay reaches matrices and kernels only (`schedules.decay_groups`, as distillation and CPT), unless
`decay_all` (SAMed's and H-SAM's recipe: every trainable parameter).
"""

import lightning as L
import torch
from torchmetrics.segmentation import DiceScore

from samora_pl.losses.hsam import HSAMLoss
from samora_pl.losses.segmentation import SegmentationLoss
from samora_pl.training.callbacks import segmentation_panel
from samora_pl.training.guards import guard_loss
from samora_pl.training.image_cadence import ImageCadence
from samora_pl.training.images import image_loggers, log_images
from samora_pl.training.schedules import decay_groups, lightning_scheduler, schedule_steps, warmup_poly


class FinetuneModule(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        class_names,
        lr: float = 0.005,
        weight_decay: float = 0.1,
        decay_all: bool = False,
        betas=(0.9, 0.999),
        warmup_epochs: float = 1.0,
        warmup_steps=None,
        poly_power: float = 0.9,
        poly_horizon: str = "after_warmup",
        schedule_epochs=None,
        ce_weight: float = 0.2,
        dice_weight: float = 0.8,
        aux_weight: float = 0.0,
        image_log_every_n_epochs: int = 1,
    ):
        super().__init__()
        self.model = model
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.loss = SegmentationLoss(ce_weight, dice_weight)
        self.two_stage = getattr(model, "hsam_decoder", None) is not None
        self.hsam_loss = HSAMLoss(ce_weight, dice_weight) if self.two_stage else None
        self.aux_weight = aux_weight
        self.optim = dict(lr=lr, betas=tuple(betas))
        self.weight_decay, self.decay_all = weight_decay, decay_all
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.poly_power = poly_power
        self.image_cadence = ImageCadence(image_log_every_n_epochs)  # validation runs on some epochs only
        self.poly_horizon = poly_horizon
        self.schedule_epochs = schedule_epochs  # epochs the LR schedule spans; none -> the epochs trained
        self.val_dice = DiceScore(
            num_classes=self.num_classes + 1, include_background=False, average="none", input_format="index"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _two_stage_loss(self, batch, prefix: str):
        """H-SAM: (1 - w) L1 + w L2, each stage logged; returns (loss, stages)."""
        stages = self.model.forward_stages(batch["image"])
        parts = self.hsam_loss(stages.stage1, stages.stage2, batch["low_res_label"], batch["label"], self.current_epoch)
        n = len(batch["image"])
        self.log(f"{prefix}/loss_stage1", parts.stage1, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self.log(f"{prefix}/loss_stage2", parts.stage2, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        if prefix == "train":
            self.log("train/stage2_weight", parts.weight, on_step=False, on_epoch=True, batch_size=n)
        return parts.total, stages

    def training_step(self, batch, batch_idx):
        if self.two_stage:
            seg, stages = self._two_stage_loss(batch, "train")
            logits = stages.stage2
        else:
            logits = self.model(batch["image"])
            seg = self.loss(logits, batch["low_res_label"])
        loss = seg
        if self.aux_weight:
            aux = self.model.aux_loss()
            loss = seg + self.aux_weight * aux
            self.log("train/aux_loss", aux, on_step=True, on_epoch=False)
        if guard_loss(self, loss) is None:
            return None  # skip_nonfinite: counted by the guard
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch, batch_idx):
        size = batch["label"].shape[-2:]
        panels = {}
        if self.two_stage:
            loss, stages = self._two_stage_loss(batch, "val")
            logits = stages.combined(self.model.hsam_decoder.inference)
            for name, stage in (("stage1", stages.stage1), ("stage2", stages.stage2)):
                panels[f"val/slice_truth_{name}"] = _upsample(stage, size).argmax(1)
        else:
            logits = self.model(batch["image"])
            loss = self.loss(logits, batch["low_res_label"])
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(logits))
        pred = _upsample(logits, size).argmax(1)
        panels["val/slice_truth_prediction"] = pred
        self.val_dice.update(pred, batch["label"])
        if batch_idx == 0 and self.image_cadence.due(self.current_epoch):
            loggers = image_loggers(self.trainer)
            if loggers:
                count = min(4, len(pred))
                for tag, shown in panels.items():
                    panel = segmentation_panel(batch["image"][:count], batch["label"][:count], shown[:count])
                    log_images(loggers, tag, panel, self.global_step)

    def on_validation_epoch_end(self):
        per_class = self.val_dice.compute().reshape(-1)  # torchmetrics gives a 0-d tensor when K = 1
        self.val_dice.reset()
        for name, value in zip(self.class_names, per_class):
            self.log(f"val_dice/{name}", torch.nan_to_num(value), sync_dist=False)
        self.log("val/mean_dice", torch.nan_to_num(per_class).mean(), prog_bar=True, sync_dist=False)

    def configure_optimizers(self):
        # matrices decay; biases, norms, gates and temperatures (<= 1-D) do not: decoupled decay would shrink
        # HL-Attn's g1 / g2 and MoLE's tau on steps where their gradient is zero. decay_all: the baselines' recipe
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.decay_all:
            groups = [{"params": [p for _, p in named], "weight_decay": self.weight_decay}]
        else:
            groups = decay_groups(named, self.weight_decay)
        optimizer = torch.optim.AdamW(groups, **self.optim)
        # optimiser steps of this run; a stop epoch (SAMed's 160 of 200) trains the head of a longer schedule
        per_epoch, total = schedule_steps(
            self.trainer.estimated_stepping_batches, self.trainer.max_epochs, self.schedule_epochs
        )
        warmup = int(self.warmup_epochs * per_epoch) if self.warmup_steps is None else int(self.warmup_steps)
        factor = warmup_poly(total, warmup, self.poly_power, self.poly_horizon)
        return {"optimizer": optimizer, "lr_scheduler": lightning_scheduler(optimizer, factor)}


def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits.float()
    return torch.nn.functional.interpolate(logits.float(), size=size, mode="bilinear")

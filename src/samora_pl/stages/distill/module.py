"""Stage-1 distillation LightningModule: one LoRA expert of the SAM encoder, one level at a time.

The module receives a student whose only trainable parameters are the chosen expert's A/B factors and
per-block scales (``SAMoraSegmenter.set_trainable("distill:<level>")``), the level's head (see
``models/heads.py``) and, for the image and patch levels, a frozen teacher. It never changes SAM's
weights, another expert or the teacher: the optimiser only sees parameters that require grad, and the
teacher is kept in eval mode (BatchNorm statistics frozen) even when Lightning calls ``train()``.

Levels (docs/method.md, section Stage 1: continual pre-training and distillation):

* ``image``: batch ``{"image": view1, "view2": view2}``; teacher SimCLRv2 ``embed`` of each view, student
  neck output mean-pooled through the MLP; :func:`normalized_mse` between the L2-normalised vectors.
  ``image_pairing="same"`` matches each view's student feature with the teacher feature of the same view
  (the literal ``||F(x) - G(x)||^2``); ``"cross"`` matches the student on view 1 with the teacher on view 2
  and vice versa (a BYOL-style pairing that also asks for invariance to the augmentation).
* ``patch``: batch ``{"image": x}``; the MAE teacher encodes ``x`` (resized to its own input size) with
  ``mask_ratio`` of the patches masked and returns the visible tokens and their grid indices; the student
  encodes the full ``x`` (SAM's windowed attention cannot drop tokens), its last-block tokens are brought
  onto the teacher's patch grid and taken at exactly the teacher's visible indices, projected to the
  teacher's width, and matched token by token.
* ``pixel``: batch ``{"image": clean}``; ``degrade`` (blur with probability ``blur_prob``, noise
  ``noise_sigma``) gives the input, the decoder reconstructs the clean slice from the student's neck,
  loss ``overlap_weight x overlap + mse_weight x MSE`` with both images in [0, 1].

TensorBoard: ``train/loss`` (+ ``train/cosine`` for image and patch, ``train/overlap``, ``train/mse``,
``train/psnr`` for pixel) per step and epoch; one picture per level from the first batch, every
``image_log_every_n_epochs`` epochs (``ImageCadence``): the two views (image), the slice | what the teacher
sees of it (patch), noisy | clean | reconstruction (pixel).

Checkpoints hold only what trains (the expert and the head, plus the optimiser state): SAM and the teacher
are fixed inputs of the stage that are rebuilt from the config, so ``last.ckpt`` stays small even at
paper scale (``strict_loading`` is off so such a checkpoint loads back into a full module).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from samora_pl.config.choices import IMAGE_PAIRINGS, LEVELS
from samora_pl.errors import SamoraError
from samora_pl.losses.distillation import denoise_loss, normalized_mse
from samora_pl.models.heads import ImageProjection, PixelDecoder, TokenProjection
from samora_pl.stages.distill.targets import degrade, visible_mask, visible_student_tokens
from samora_pl.training.guards import guard_loss
from samora_pl.training.image_cadence import ImageCadence
from samora_pl.training.images import image_loggers, log_images
from samora_pl.training.schedules import decay_groups, lightning_scheduler, warmup_poly

TEACHER_KIND = {"image": "simclr", "patch": "mae", "pixel": None}
PAIRINGS = IMAGE_PAIRINGS
EPOCH_METRICS = {"image": ("loss", "cosine"), "patch": ("loss", "cosine"), "pixel": ("loss", "overlap", "mse", "psnr")}

__all__ = ["DistillModule", "build_head", "teacher_width", "LEVELS", "TEACHER_KIND", "PAIRINGS", "resize_to"]


def resize_to(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize square batches [B, C, H, W] to ``size`` (bilinear, antialiased); unchanged when equal or None."""
    if size is None or (images.shape[-2] == size and images.shape[-1] == size):
        return images
    return F.interpolate(images, size=(int(size), int(size)), mode="bilinear", align_corners=False, antialias=True)


def _student_widths(student: nn.Module) -> dict[str, int]:
    """Token width, embedding width and stride of the student (SAM's ViT, or SAM 2's Hiera, whose encoder
    names them: its embedding is the stride-16 neck map, its tokens the stride-16 stage-3 trunk map)."""
    enc = student.encoder
    if hasattr(enc, "embedding_dim"):
        neck, patch = enc.embedding_dim, enc.embedding_stride
    else:
        neck = enc.image_encoder.neck[0].out_channels
        patch = enc.image_encoder.patch_embed.proj.kernel_size[0]
    return {"embed": int(enc.embed_dim), "neck": int(neck), "patch": int(patch), "img_size": int(enc.img_size)}


@torch.no_grad()
def teacher_width(level: str, teacher: nn.Module) -> int:
    """The width the student must match: SimCLR's projection width, or MAE's token width."""
    if level == "image":
        if getattr(teacher, "proj_dim", None):
            return int(teacher.proj_dim)
        size = int(getattr(teacher, "img_size", 64))
        return int(teacher.embed(torch.zeros(2, 1, size, size)).shape[-1])
    if level == "patch":
        if getattr(teacher, "embed_dim", None):
            return int(teacher.embed_dim)
        size = int(teacher.img_size)
        return int(teacher.encode_visible(torch.zeros(1, 1, size, size), 0.75)[0].shape[-1])
    raise ValueError(f"level {level!r} has no teacher")


def build_head(
    level: str,
    student: nn.Module,
    teacher: nn.Module | None = None,
    *,
    image_hidden: int | None = None,
    patch_hidden: int | None = None,
    pixel_width: int = 128,
) -> nn.Module:
    """The level's head for this student (and teacher): projection MLP, token projection or decoder."""
    widths = _student_widths(student)
    if level == "image":
        return ImageProjection(widths["neck"], teacher_width("image", teacher), hidden=image_hidden)
    if level == "patch":
        return TokenProjection(widths["embed"], teacher_width("patch", teacher), hidden=patch_hidden)
    if level == "pixel":
        return PixelDecoder(widths["neck"], width=pixel_width, factor=widths["patch"])
    raise SamoraError(f"unknown distillation level {level!r}; choose one of {', '.join(LEVELS)}")


class DistillModule(L.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        level: str,
        head: nn.Module,
        teacher: nn.Module | None = None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_epochs: float = 1.0,
        poly_power: float = 0.9,
        mask_ratio: float = 0.75,
        image_pairing: str = "same",
        noise_sigma: float = 0.08,
        blur_prob: float = 0.5,
        blur_sigma: Sequence[float] = (0.5, 1.5),
        overlap_weight: float = 0.9,
        mse_weight: float = 0.1,
        image_log_every_n_epochs: int = 1,
        panel_rows: int = 4,
    ):
        super().__init__()
        if level not in LEVELS:
            raise SamoraError(f"distill.level is {level!r}; choose one of {', '.join(LEVELS)}")
        if TEACHER_KIND[level] and teacher is None:
            raise SamoraError(f"the {level} level needs a {TEACHER_KIND[level]} teacher")
        if image_pairing not in PAIRINGS:
            raise SamoraError(f"distill.image_pairing is {image_pairing!r}; allowed values: {', '.join(PAIRINGS)}")
        if not 0.0 <= mask_ratio < 1.0:
            raise SamoraError(f"distill.mask_ratio is {mask_ratio}; it must be in [0, 1)")
        self.level = level
        self.student = student
        self.head = head
        self.teacher = teacher if TEACHER_KIND[level] else None
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        self.optim = dict(lr=float(lr), betas=tuple(float(b) for b in betas))
        self.weight_decay = float(weight_decay)
        self.warmup_epochs = float(warmup_epochs)
        self.poly_power = float(poly_power)
        self.mask_ratio = float(mask_ratio)
        self.image_pairing = image_pairing
        self.noise_sigma = float(noise_sigma)
        self.blur_prob = float(blur_prob)
        self.blur_sigma = tuple(float(s) for s in blur_sigma)
        self.overlap_weight = float(overlap_weight)
        self.mse_weight = float(mse_weight)
        self.image_cadence = ImageCadence(image_log_every_n_epochs)
        self.panel_rows = int(panel_rows)
        self.strict_loading = False  # checkpoints hold only the trainable part (see on_save_checkpoint)
        self.history: list[dict[str, float]] = []  # per-epoch means (all ranks), for the manifest
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    # -- mode ------------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Lightning calls train() before every epoch; the teacher stays in eval (frozen BN statistics)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # -- the three objectives -------------------------------------------------------------------------
    @property
    def _teacher_size(self) -> int | None:
        size = getattr(self.teacher, "img_size", None)
        return int(size) if size else None

    def image_step(self, batch, batch_idx: int = -1) -> dict[str, torch.Tensor]:
        view1, view2 = batch["image"], batch["view2"]
        if self._picture_due(batch_idx):
            self._log_columns("distill/image_views", [view1, view2])
        views = torch.cat([view1, view2], 0)
        with torch.no_grad():
            target = self.teacher.embed(resize_to(views, self._teacher_size)).float()
        if self.image_pairing == "cross":
            half = view1.shape[0]
            target = torch.cat([target[half:], target[:half]], 0)
        student = self.head(self.student.encoder(views))
        loss, cosine = normalized_mse(student, target)
        return {"loss": loss, "cosine": cosine}

    def patch_targets(self, images: torch.Tensor):
        """The teacher's (visible tokens, ids_keep, grid) for a batch, without gradients."""
        with torch.no_grad():
            tokens, ids_keep, grid = self.teacher.encode_visible(resize_to(images, self._teacher_size), self.mask_ratio)
        return tokens.float(), ids_keep, tuple(int(g) for g in grid)

    def patch_step(self, batch, batch_idx: int = -1) -> dict[str, torch.Tensor]:
        images = batch["image"]
        target, ids_keep, grid = self.patch_targets(images)
        if self._picture_due(batch_idx):
            self._log_columns("distill/slice_teacher_visible", [images, images * visible_mask(ids_keep, grid, images)])
        tokens = self.student.encoder.forward_tokens(images)  # [B, hs, ws, C]
        student = self.head(visible_student_tokens(tokens, ids_keep, grid))
        loss, cosine = normalized_mse(student, target)
        return {"loss": loss, "cosine": cosine}

    def pixel_step(self, batch, batch_idx: int = -1) -> dict[str, torch.Tensor]:
        clean = batch["image"]
        noisy = degrade(clean, self.noise_sigma, self.blur_prob, self.blur_sigma)
        recon = self.head(self.student.encoder(noisy))
        loss, overlap, mse = denoise_loss(recon, clean, self.overlap_weight, self.mse_weight)
        psnr = -10.0 * torch.log10(mse.clamp_min(1e-10))
        if self._picture_due(batch_idx):
            self._log_columns("distill/noisy_clean_reconstruction", [noisy, clean, recon])
        return {"loss": loss, "overlap": overlap, "mse": mse, "psnr": psnr}

    def _picture_due(self, batch_idx: int) -> bool:
        return batch_idx == 0 and self._trainer is not None and self.image_cadence.due(self.current_epoch)

    def _log_columns(self, tag: str, columns: list[torch.Tensor]) -> None:
        """Images [B, C, H, W] side by side (first channel), one row per sample, up to `panel_rows` rows."""
        loggers = image_loggers(self.trainer)
        if not loggers:
            return
        rows = min(self.panel_rows, columns[0].shape[0])
        panel = torch.cat([column[:rows, :1].detach() for column in columns], dim=3)  # [r, 1, H, kW]
        panel = torch.cat(list(panel), dim=1).float().clamp(0, 1).cpu()  # [1, r*H, kW]
        log_images(loggers, tag, panel, self.global_step)

    def compute(self, batch, batch_idx: int = -1) -> dict[str, torch.Tensor]:
        if self.level == "image":
            return self.image_step(batch, batch_idx)
        if self.level == "patch":
            return self.patch_step(batch, batch_idx)
        return self.pixel_step(batch, batch_idx)

    # -- Lightning hooks ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        out = self.compute(batch, batch_idx)
        loss = out["loss"]
        if guard_loss(self, loss) is None:
            return None  # skip_nonfinite: counted by the guard
        size = batch["image"].shape[0]
        # logged values are this process's (no sync_dist): the epoch means of all processes are reduced
        # once per epoch in on_train_epoch_end, the only collective of this module, so every rank issues
        # the same collectives in the same order (rank zero's progress bar would otherwise sync alone)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in out.items():
            if name != "loss":
                self.log(
                    f"train/{name}", value, on_step=True, on_epoch=True, batch_size=size, prog_bar=name == "cosine"
                )
        for name, value in out.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.detach().float() * size
        self._count += size
        return loss

    def on_train_epoch_start(self) -> None:
        self._sums, self._count = {}, 0

    def on_train_epoch_end(self) -> None:
        """Sample-weighted epoch means over all processes (one all-reduce) -> ``history``."""
        names = EPOCH_METRICS[self.level]  # fixed per level, so every rank reduces the same tensor
        local = [torch.as_tensor(float(self._count))]
        local += [torch.as_tensor(self._sums.get(n, 0.0)).detach().float().cpu().reshape(()) for n in names]
        totals = torch.stack(local).to(self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        totals = totals.cpu()
        if float(totals[0]) <= 0:
            return
        means = {n: float(totals[i + 1] / totals[0]) for i, n in enumerate(names)}
        means["epoch"] = int(self.current_epoch)
        self.history.append(means)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        keep |= {f"head.{n}" for n, _ in self.head.named_buffers()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["samora_distill"] = {
            "level": self.level,
            "contents": "trainable parameters only",
            "history": list(self.history),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get("samora_distill", {})
        if info.get("level", self.level) != self.level:
            raise SamoraError(f"checkpoint of the {info['level']} level cannot resume the {self.level} level")
        self.history = list(info.get("history", []))

    def configure_optimizers(self):
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not params:
            raise SamoraError(f"nothing to train at the {self.level} level (no parameter requires grad)")
        optimizer = torch.optim.AdamW(decay_groups(params, self.weight_decay), **self.optim)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise SamoraError("distillation needs a finite number of steps (set distill.max_epochs)")
        total = int(total)
        per_epoch = max(total // max(self.trainer.max_epochs, 1), 1)
        warmup = int(self.warmup_epochs * per_epoch)
        return {
            "optimizer": optimizer,
            "lr_scheduler": lightning_scheduler(optimizer, warmup_poly(total, warmup, self.poly_power)),
        }

    def summary(self) -> dict[str, float]:
        """First and last epoch means (loss, cosine or overlap/mse/psnr) for the manifest."""
        if not self.history:
            return {}
        first, last = self.history[0], self.history[-1]
        out = {"epochs": len(self.history), "first_loss": first["loss"], "final_loss": last["loss"]}
        for name in ("cosine", "overlap", "mse", "psnr"):
            if name in last:
                out[f"first_{name}"] = first[name]
                out[f"final_{name}"] = last[name]
        if "final_cosine" in out:
            out["cosine_similarity"] = out["final_cosine"]
        return out

"""`samora distill`: stage 1b of SAMora, distilling each level into its own LoRA expert on SAM.

For each level (``distill.level``: all | image | patch | pixel; ``all`` runs image, patch, pixel in turn):

1. the teacher (image: SimCLRv2, patch: MAE, pixel: none) is ``distill.teacher`` or the run's
   ``runs/<run>/cpt/<simclr|mae>/teacher.pt``, checked against the checksum its CPT manifest recorded;
2. the student is SAM (from ``model.checkpoint`` or seeded by ``model.init_seed``, so fine-tuning sees the
   same frozen encoder) with ONE LoRA expert named after the level and ``fusion=single:<level>``, which is
   exactly SAMed's LoRA; only that expert's A/B and per-block scales train, plus the level's head;
3. training on the unlabeled pool (``cpt.sources``, or the dataset's own images, as CPT uses);
4. ``runs/<run>/distill/<level>/expert.safetensors`` (atomic, with metadata: level, rank, depth, width,
   img_size, variant, base_fingerprint, teacher sha256), ``checkpoints/last.ckpt`` (trainable part only),
   ``config.yaml`` and ``manifest.json`` (inputs with sha256, the expert's sha256, first/final loss and
   cosine similarity).

A level whose folder already holds a finished expert is reused when the settings that shape the expert
are unchanged, and an interrupted level resumes from its ``last.ckpt`` (so ``make distill LEVEL=all`` or
``make demo`` continues where it stopped); a folder made with other settings is an error unless
``overwrite=true``, which distils the level again from scratch.
"""

from __future__ import annotations

import logging
import shutil
import warnings

import lightning as L
import torch
from torchvision.transforms import v2 as T

from data_modules.pool.unlabeled import (
    NOTHING_HELD_OUT,
    HeldOut,
    UnlabeledDataModule,
    held_out_cases,
    pool_sources,
)
from samora_pl.config.plans import EXPERT_FILE, DistillPlan
from samora_pl.config.specs import ExpertLayout, SegmenterSpec
from samora_pl.errors import SamoraError
from samora_pl.models.factory import base_fingerprint, build_segmenter, log_trainable, sam_checkpoint_record
from samora_pl.models.teachers.files import load_teacher
from samora_pl.records.checkpoint_io import resumable
from samora_pl.records.manifest import (
    MANIFEST,
    StageRecord,
    is_rank_zero,
    read_manifest,
    save_config,
    sha256,
    verify_input,
)
from samora_pl.stages.distill.module import TEACHER_KIND, DistillModule, build_head
from samora_pl.training.callbacks import Throughput
from samora_pl.training.guards import check_finite_state, skipped_batches
from samora_pl.training.trainer import build_trainer

log = logging.getLogger(__name__)
EXPERT = EXPERT_FILE
__all__ = [
    "run",
    "run_level",
    "prepare_level",
    "load_level_teacher",
    "build_student",
    "build_data",
    "EXPERT",
]


# ----------------------------------------------------------------------------------------------- inputs


def load_level_teacher(plan: DistillPlan, level: str, record: StageRecord | None = None):
    """The frozen teacher of an image or patch level (None for pixel), verified and recorded."""
    kind = TEACHER_KIND[level]
    if kind is None:
        return None
    path = plan.teacher_files[level]
    run = plan.folders.run
    if not path.exists():
        where = "distill.teacher" if plan.teacher_given else f"the {kind} CPT output of run '{run}'"
        raise SamoraError(
            f"The {level}-level distillation needs the {kind} teacher {path} ({where}), which does not exist. "
            f"Make it with `make cpt TEACHER={kind} RUN={run} DATA={plan.dataset}`, or point "
            f"distill.teacher at an existing {kind} teacher.pt."
        )
    entry = verify_input(path, path.parent)
    teacher = load_teacher(path, kind=kind)
    if record is not None:
        record.add_input(f"teacher_{kind}", entry)
    return teacher, entry


def build_student(spec: SegmenterSpec, level: str):
    """SAM + one expert named `level` with SAMed-style single fusion; only that expert trains."""
    model = build_segmenter(spec, ExpertLayout((level,), f"single:{level}"), 1)
    model.set_trainable(f"distill:{level}")
    return model


class LevelViews:
    """Pool slice [1, H, W] in [0, 1] -> the level's training sample (a dict, so batches are dicts)."""

    def __init__(self, level: str, size: int, crop_scale, simclr: dict | None = None):
        self.level = level
        if level == "image":
            from data_modules.pool.ssl_views import simclr_augment

            self.augment = simclr_augment(size, **(simclr or {}))
        else:
            from data_modules.pool.ssl_views import Clamp01

            self.augment = T.Compose(
                [
                    T.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True),
                    T.RandomHorizontalFlip(),
                    Clamp01(),
                ]
            )

    def __call__(self, image: torch.Tensor) -> dict:
        image = image.float()
        if self.level == "image":
            return {"image": self.augment(image), "view2": self.augment(image)}
        return {"image": self.augment(image)}


def build_data(plan: DistillPlan, level: str, held_out: HeldOut = NOTHING_HELD_OUT):
    """The unlabeled pool (the same sources CPT reads, without the `held_out` test cases) with the level's
    augmentation (the image level's: the SimCLR teacher's pre-training views)."""
    views = LevelViews(level, plan.segmenter.img_size, plan.distill.crop_scale, plan.simclr_views)
    pool = plan.pool
    return UnlabeledDataModule(
        pool_sources(pool),
        transform=views,
        batch_size=plan.distill.batch_size,
        num_workers=pool.num_workers,
        skip_bad_files=pool.skip_bad_files,
        index_path=pool.index_path,
        cache_volumes=pool.cache_volumes,
        held_out=held_out,
    )


# ------------------------------------------------------------------------------------------------- runs


def prepare_level(plan: DistillPlan, level: str):
    """("done", manifest) for a finished level with the same settings, ("train", last.ckpt or None) otherwise.

    overwrite=true clears the level's outputs first; a finished or interrupted level trained with other
    shaping settings is an error naming them."""
    folder = plan.folder(level)
    last = folder / "checkpoints" / "last.ckpt"
    if plan.overwrite:
        if is_rank_zero():
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            for name in (EXPERT, MANIFEST, "config.yaml"):
                (folder / name).unlink(missing_ok=True)
        return "train", None
    manifest = read_manifest(folder)
    finished = bool(manifest) and manifest.get("status") == "complete" and (folder / EXPERT).exists()
    changed = plan.changed_in(folder, level)
    if changed and (finished or last.exists()):
        raise SamoraError(
            f"{folder} already holds a {level} expert distilled with other settings ({', '.join(changed[:8])}); "
            "add overwrite=true to distil it again, or use another RUN."
        )
    if finished:
        kind = TEACHER_KIND[level]
        recorded = manifest.get("inputs", {}).get(f"teacher_{kind}", {}).get("sha256") if kind else None
        current = plan.teacher_files[level] if kind else None
        if recorded and current.exists() and sha256(current) != recorded:
            raise SamoraError(
                f"{folder} holds a {level} expert distilled from an earlier {kind} teacher than {current} "
                "(the teacher was trained again since); add overwrite=true to distil it from the new teacher."
            )
        return "done", manifest
    return "train", resumable(last, f"distill {level}")


def _module(plan: DistillPlan, level: str, student, head, teacher) -> DistillModule:
    d = plan.distill
    return DistillModule(
        student,
        level,
        head,
        teacher,
        lr=d.lr,
        weight_decay=d.weight_decay,
        betas=d.betas,
        warmup_epochs=d.warmup_epochs,
        poly_power=d.poly_power,
        mask_ratio=d.mask_ratio,
        image_pairing=d.image_pairing,
        noise_sigma=d.noise_sigma,
        blur_prob=d.blur_prob,
        blur_sigma=d.blur_sigma,
        overlap_weight=d.pixel_overlap_weight,
        mse_weight=d.pixel_mse_weight,
        image_log_every_n_epochs=plan.trainer.image_log_every_n_epochs,
    )


def run_level(plan: DistillPlan, level: str, held_out: HeldOut = NOTHING_HELD_OUT) -> dict:
    """Distil one level; returns its metrics (and the expert path)."""
    folder = plan.folder(level)
    state, found = prepare_level(plan, level)
    if state == "done":
        log.info("distill %s: reusing the finished expert in %s (overwrite=true to redo)", level, folder)
        return dict(found.get("metrics", {}), expert=str(folder / EXPERT), reused=True)
    resume = found
    L.seed_everything(plan.seed, workers=True, verbose=False)
    record = StageRecord(plan.stage, plan.config, folder)
    loaded = load_level_teacher(plan, level, record)
    teacher, teacher_entry = loaded if loaded is not None else (None, None)
    student = build_student(plan.segmenter, level)
    sam_file = sam_checkpoint_record(plan.segmenter.checkpoint)
    if sam_file is not None:
        record.add_input("sam_checkpoint", sam_file)
    head = build_head(
        level,
        student,
        teacher,
        image_hidden=plan.distill.image_hidden,
        patch_hidden=plan.distill.patch_hidden,
        pixel_width=plan.distill.pixel_width,
    )
    data = build_data(plan, level, held_out)
    module = _module(plan, level, student, head, teacher)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    record.metrics["trainable_parameters"] = trainable
    record.metrics["expert_parameters"] = log_trainable(student, f"distill {level} (expert)")
    log.info("distill %s: %s trainable parameters (expert + head)", level, f"{trainable:,}")
    save_config(plan.config, folder)
    trainer = build_trainer(plan.trainer, plan.folders.root, folder, "distill", level, callbacks=[Throughput()])
    if resume is not None:
        log.info("distill %s: resuming from %s", level, resume)
    with warnings.catch_warnings():
        # the frozen teacher is in eval mode on purpose (BatchNorm statistics must not move)
        warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
        # logged epoch values are per process on purpose; the manifest's are reduced (see DistillModule)
        warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    if data.pool is not None:
        record.metrics["pool_slices"] = len(data.pool)
        record.add_input("pool", data.pool.summary())

    expert = folder / EXPERT
    if is_rank_zero():
        meta = {"seed": plan.seed, "run": plan.folders.run}
        meta["base_fingerprint"] = base_fingerprint(student)
        if teacher_entry is not None:
            meta["teacher_sha256"] = teacher_entry["sha256"]
            meta["teacher_kind"] = TEACHER_KIND[level]
        check_finite_state(student.named_parameters(), f"distill {level}", expert)
        student.cpu().save_expert(level, expert, **meta)
        record.add_output(expert)
        last = folder / "checkpoints" / "last.ckpt"
        if last.exists():
            record.add_output(last)
    metrics = dict(module.summary(), **skipped_batches(trainer))
    record.metrics.update(metrics)
    record.metrics["expert_sha256"] = record.outputs.get(EXPERT, {}).get("sha256") if record.outputs else None
    record.write()
    if is_rank_zero():
        log.info(
            "distill %s: loss %.4f -> %.4f over %d epochs; expert in %s",
            level,
            metrics.get("first_loss", float("nan")),
            metrics.get("final_loss", float("nan")),
            metrics.get("epochs", 0),
            expert,
        )
    return dict(metrics, expert=str(expert))


def run(plan: DistillPlan) -> dict[str, dict]:
    """`samora distill`: the planned level, or all three in turn; {level: metrics}."""
    held_out = held_out_cases(plan.pool)  # before anything is written: a bad cpt.include_test_cases stops here
    return {level: run_level(plan, level, held_out) for level in plan.levels}

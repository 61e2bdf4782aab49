"""`samora cpt`: continual pre-training of the SimCLRv2 and MAE teachers on the unlabeled pool.

For each teacher (`cpt.teacher` all | simclr | mae) this builds the network (optionally from a public
checkpoint), trains it on the pool and writes `runs/<run>/cpt/<teacher>/`: `teacher.pt` (the hand-off to
distillation, see `load_teacher`), `checkpoints/last.ckpt`, `config.yaml` and `manifest.json`.

The pool is indexed once before any training, so unreadable files stop the run before it starts. A
teacher whose folder already holds a finished run with the same settings is reused (overwrite=true trains
it again); a folder with a `last.ckpt` but no finished manifest is resumed from it, and a larger
`cpt.<teacher>.max_epochs` continues a finished run from its `last.ckpt`. Other changed settings are
refused (they would mix two experiments in one folder). `cpt.<teacher>.max_epochs=0` writes the teacher's
starting weights (the public checkpoint, else its random initialisation) untrained: the "without CPT"
teacher of the `cpt` ablation.
"""

import logging
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator

from data_modules.pool.ssl_views import TwoViews, mae_augment, simclr_augment
from data_modules.pool.unlabeled import (
    SlicePool,
    UnlabeledDataModule,
    build_pool,
    held_out_cases,
    pool_sources,
)
from samora_pl.config.plans import TEACHER_FILE, CptPlan
from samora_pl.config.schema import CptConfig, MaeConfig, SimclrConfig
from samora_pl.errors import SamoraError
from samora_pl.models.teachers.files import (  # noqa: F401 (load_teacher: API)
    load_public_checkpoint,
    load_teacher,
    save_teacher,
    simclr_normalize,
)
from samora_pl.models.teachers.mae import MaeTeacher
from samora_pl.models.teachers.simclr import SimclrTeacher
from samora_pl.records.checkpoint_io import resumable
from samora_pl.records.manifest import (
    MANIFEST,
    StageRecord,
    file_record,
    is_rank_zero,
    read_manifest,
    save_config,
)
from samora_pl.stages.cpt.mae import MaeCpt
from samora_pl.stages.cpt.simclr import SimclrCpt
from samora_pl.training.callbacks import Throughput
from samora_pl.training.guards import check_finite_state, skipped_batches
from samora_pl.training.trainer import build_trainer

log = logging.getLogger(__name__)


def build_simclr(s: SimclrConfig) -> SimclrTeacher:
    """The SimCLR teacher of cpt.simclr, its input normalisation resolved against cpt.simclr.checkpoint."""
    return SimclrTeacher(
        depth=s.depth,
        width=s.width,
        selective_kernel=s.selective_kernel,
        proj_dim=s.proj_dim,
        proj_hidden_dim=s.proj_hidden_dim,
        normalize=simclr_normalize(s.normalize, s.checkpoint),
        img_size=s.img_size,
    )


def build_mae(m: MaeConfig) -> MaeTeacher:
    return MaeTeacher(
        variant=m.variant,
        img_size=m.img_size,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        decoder_dim=m.decoder_dim,
        decoder_depth=m.decoder_depth,
        decoder_heads=m.decoder_heads,
        norm_pix_loss=m.norm_pix_loss,
        normalize=m.normalize,
        mask_ratio=m.mask_ratio,
    )


def _prepare(plan: CptPlan, kind: str):
    """'done' (with the recorded metrics) or 'train'; clears the folder first when overwrite=true."""
    folder = plan.folder(kind)
    if plan.overwrite:
        if is_rank_zero():
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            for name in (TEACHER_FILE, MANIFEST, "config.yaml"):
                (folder / name).unlink(missing_ok=True)
        return "train", None
    changed = plan.changed_in(folder, kind)
    manifest = read_manifest(folder)
    finished = manifest and manifest.get("status") == "complete" and (folder / TEACHER_FILE).exists()
    if changed and (finished or (folder / "checkpoints" / "last.ckpt").exists()):
        raise SamoraError(
            f"{folder} holds a {kind} teacher trained with other settings ({', '.join(changed)}); "
            "add overwrite=true to train it again, or choose another RUN."
        )
    if finished:
        done = int(manifest.get("metrics", {}).get("epochs") or 0)
        if plan.trainer[kind].max_epochs > done and (done == 0 or (folder / "checkpoints" / "last.ckpt").exists()):
            log.info(
                "cpt: continuing the %s teacher in %s from epoch %d to %d.",
                kind,
                folder,
                done,
                plan.trainer[kind].max_epochs,
            )
            return "train", None
        log.info("cpt: the %s teacher in %s is already trained; reusing it (overwrite=true retrains).", kind, folder)
        return "done", dict(manifest.get("metrics", {}))
    return "train", None


def run(plan: CptPlan) -> dict[str, dict]:
    """Pre-train the plan's teachers; returns {teacher: metrics} (loss first/last epoch, images/s, ...)."""
    held_out = held_out_cases(plan.pool)  # before anything is written: a bad cpt.include_test_cases stops here
    kinds = plan.teachers
    results: dict[str, dict] = {}
    todo = []
    for kind in kinds:
        state, metrics = _prepare(plan, kind)
        if state == "done":
            results[kind] = metrics
        else:
            todo.append(kind)
    if not todo:
        return results
    # teachers built (and public weights loaded) first: a file of another layout stops before anything is written
    starts = {kind: _starting_teacher(plan, kind) for kind in todo}
    pool = build_pool(pool_sources(plan.pool), plan.pool.skip_bad_files, plan.pool.index_path, held_out=held_out)
    log.info("cpt: pool of %d slices from %d files or series.", len(pool), len(pool.volumes))
    for kind in todo:
        results[kind] = _train(plan, kind, pool, *starts[kind])
    return results


def initial_teacher(cpt: CptConfig, seed: int, kind: str, load_checkpoint: bool = True):
    """(teacher, load report or None): the `kind` teacher as CPT starts it, before any step: the random
    initialisation seeded by `seed`, with the public `cpt.<kind>.checkpoint` loaded when set (and
    `load_checkpoint`). `samora probe` rebuilds the "before CPT" teacher with it."""
    L.seed_everything(seed, workers=True, verbose=False)
    sub = getattr(cpt, kind)
    teacher = build_simclr(cpt.simclr) if kind == "simclr" else build_mae(cpt.mae)
    if not sub.checkpoint or not load_checkpoint:
        return teacher, None
    return teacher, load_public_checkpoint(teacher, sub.checkpoint)


def _starting_teacher(plan: CptPlan, kind: str):
    """(teacher, load report or None): the `kind` teacher, from the public checkpoint unless it resumes."""
    sub = getattr(plan.cpt, kind)
    resumes = (plan.folder(kind) / "checkpoints" / "last.ckpt").exists()
    # a resumed run's weights come from its last.ckpt
    teacher, report = initial_teacher(plan.cpt, plan.seed, kind, load_checkpoint=not resumes)
    log.info(
        "cpt: %s input normalisation: %s (cpt.%s.normalize=%s)", kind, teacher.arch["normalize"], kind, sub.normalize
    )
    if not sub.checkpoint:
        log.info("cpt: %s starts from random initialisation (no cpt.%s.checkpoint).", kind, kind)
    elif report is not None:
        log.info("cpt: %s starts from %s (%s)", kind, sub.checkpoint, report)
    return teacher, report


def _train(plan: CptPlan, kind: str, pool: SlicePool, teacher, start_report) -> dict:
    L.seed_everything(plan.seed, workers=True, verbose=False)
    folder = plan.folder(kind)
    sub = getattr(plan.cpt, kind)
    record = StageRecord(plan.stage, plan.config, folder)
    record.add_input("pool", pool.summary())
    if kind == "simclr" and sub.channels_last:
        teacher.use_channels_last()
    resume = resumable(folder / "checkpoints" / "last.ckpt", f"cpt {kind}")
    if sub.checkpoint:
        record.add_input(
            "public_checkpoint",
            file_record(Path(sub.checkpoint)) if Path(sub.checkpoint).is_file() else {"path": sub.checkpoint},
        )
        if start_report is not None:
            record.metrics["start_checkpoint"] = start_report
    if resume is not None:
        log.info("cpt: resuming the %s teacher from %s", kind, resume)

    save_config(plan.config, folder)
    # built first: the process count (MAE's LR scaling, SyncBatchNorm) is the Trainer's, e.g. devices=-1
    trainer = build_trainer(plan.trainer[kind], plan.folders.root, folder, "cpt", kind, callbacks=[Throughput()])
    if kind == "simclr" and trainer.world_size > 1 and isinstance(trainer.accelerator, CUDAAccelerator):
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(teacher)  # global BatchNorm across GPUs, as SimCLR
    interval = plan.trainer[kind].image_log_every_n_epochs
    if kind == "simclr":
        transform = TwoViews(
            simclr_augment(sub.img_size, sub.crop_scale, sub.rotation_deg, sub.jitter, sub.blur_prob, sub.noise_std)
        )
        module = SimclrCpt(
            teacher,
            temperature=sub.temperature,
            lr=sub.lr,
            weight_decay=sub.weight_decay,
            warmup_epochs=sub.warmup_epochs,
            gather_negatives=sub.gather_negatives,
            image_log_every_n_epochs=interval,
        )
        lr = sub.lr
    else:
        lr = sub.base_lr * sub.batch_size * trainer.world_size / 256  # MAE's rule, on the global batch
        transform = mae_augment(sub.img_size, sub.crop_scale)
        module = MaeCpt(
            teacher,
            lr=lr,
            weight_decay=sub.weight_decay,
            betas=sub.betas,
            warmup_epochs=sub.warmup_epochs,
            image_log_every_n_epochs=interval,
        )
    data = UnlabeledDataModule(
        pool=pool,
        transform=transform,
        batch_size=sub.batch_size,
        num_workers=plan.pool.num_workers,
        skip_bad_files=plan.pool.skip_bad_files,
        cache_volumes=plan.pool.cache_volumes,
    )
    started = time.time()
    if sub.max_epochs > 0:
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    else:
        log.info("cpt: cpt.%s.max_epochs=0; the %s teacher keeps its starting weights.", kind, kind)
    seconds = time.time() - started

    losses = module.epoch_losses
    rate = trainer.callback_metrics.get(f"cpt_{kind}/epoch_images_per_s")
    metrics = {
        "loss_first_epoch": losses[0] if losses else None,
        "loss_last_epoch": losses[-1] if losses else None,
        "epoch_losses": [round(v, 5) for v in losses],
        "epochs": int(trainer.current_epoch),
        "steps": int(trainer.global_step),
        "images_per_s": float(rate) if rate is not None else None,
        "train_seconds": round(seconds, 2),
        "pool_slices": len(pool),
        "lr": lr,
        "normalize": teacher.arch["normalize"],  # the input normalisation teacher.pt records for distillation
        "teacher": str(folder / TEACHER_FILE),
        **skipped_batches(trainer),
    }
    if is_rank_zero():
        meta = {
            "run": plan.folders.run,
            "epochs": metrics["epochs"],
            "steps": metrics["steps"],
            "loss_last_epoch": metrics["loss_last_epoch"],
            "pool_slices": len(pool),
            "start_checkpoint": sub.checkpoint,
            "normalize": teacher.arch["normalize"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        check_finite_state(teacher.state_dict().items(), f"cpt {kind}", folder / TEACHER_FILE)
        save_teacher(teacher, folder / TEACHER_FILE, meta)
        record.add_output(folder / TEACHER_FILE)
        record.metrics.update(metrics)
        record.write()
        log.info(
            "cpt: %s teacher written to %s (loss %s -> %s over %d epochs)",
            kind,
            folder / TEACHER_FILE,
            _fmt(metrics["loss_first_epoch"]),
            _fmt(metrics["loss_last_epoch"]),
            metrics["epochs"],
        )
    return metrics


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"

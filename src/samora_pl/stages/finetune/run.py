"""`samora finetune`: stage 2 of SAMora, then the protocol evaluation (`stages/finetune/evaluate.py`).

Fine-tuning reads the experts distilled in the same run (all three, or `finetune.levels`; paths
overridable), trains the fusion and the mask decoder on the labelled fraction, saves `final.safetensors`,
then evaluates every test volume with the SAMed/TransUNet protocol. `mode=samed` is the SAMed baseline
(one LoRA, no experts needed). Everything it reads comes from its `FinetunePlan` (`config/plans.py`).
"""

import logging
from pathlib import Path

import lightning as L
from safetensors.torch import save_file

from data_modules import build_datamodule
from samora_pl.config.plans import FINAL_FILE, FinetunePlan
from samora_pl.errors import SamoraError
from samora_pl.models.adapters.lora import read_expert_metadata
from samora_pl.models.factory import base_fingerprint, build_segmenter, log_trainable, sam_checkpoint_record
from samora_pl.records.atomic import atomic_save
from samora_pl.records.checkpoint_io import resumable
from samora_pl.records.manifest import StageRecord, is_rank_zero, read_manifest, save_config, verify_input
from samora_pl.stages.finetune import lorahub
from samora_pl.stages.finetune.evaluate import evaluate_model, pretraining_saw_test_cases
from samora_pl.stages.finetune.module import FinetuneModule
from samora_pl.training.callbacks import FusionDiagnostics, Throughput
from samora_pl.training.guards import check_finite_state, skipped_batches
from samora_pl.training.trainer import build_trainer

log = logging.getLogger(__name__)
FINAL = FINAL_FILE


def expert_paths(plan: FinetunePlan) -> dict[str, Path]:
    """The distilled experts stage 2 fuses (configured paths, else the run's distill outputs), all present."""
    missing = [f"{level}: {path}" for level, path in plan.expert_files.items() if not path.exists()]
    if missing:
        levels = [line.split(":")[0] for line in missing]
        make = (
            "make distill LEVEL=all" if len(levels) == 3 else " and ".join(f"make distill LEVEL={lv}" for lv in levels)
        )
        raise SamoraError(
            "Fine-tuning in mode=samora needs the distilled LoRA experts, which are missing:\n  "
            + "\n  ".join(missing)
            + f"\nMake them with `{make} RUN={plan.folders.run} DATA={plan.dataset}` (after `make cpt`), point "
            "finetune.experts.<level> at existing files, or use finetune.zero_experts=true / mode=samed."
        )
    return dict(plan.expert_files)


def build_model(plan: FinetunePlan, num_classes: int, record: StageRecord | None = None):
    """The stage-2 model with its experts loaded and the right parameters trainable.

    For model.fusion=lorahub the one LoRA slot stays empty here; `lorahub.prepare` fills it. `record` gets the
    SAM checkpoint and the experts as inputs."""
    model = build_segmenter(plan.segmenter, plan.layout, num_classes)
    if plan.reads_experts:
        fingerprint = base_fingerprint(model)
        for level, path in expert_paths(plan).items():
            meta = read_expert_metadata(path)
            if meta.get("base_fingerprint") not in (None, fingerprint):
                raise SamoraError(
                    f"Expert {path} was distilled on another SAM encoder (model.checkpoint or model.init_seed "
                    "differ from this run); re-run `make distill` with this run's model settings."
                )
            model.load_expert(level, path)
            if record is not None:
                record.add_input(f"expert_{level}", verify_input(path, Path(path).parent))
    sam_file = sam_checkpoint_record(plan.segmenter.checkpoint) if record is not None else None
    if sam_file is not None:  # read: the model was built from it
        record.add_input("sam_checkpoint", sam_file)
    model.set_trainable(plan.mode)
    if plan.train_experts:
        model.train_expert_weights()
    return model


def _module(plan: FinetunePlan, model, class_names) -> FinetuneModule:
    o = plan.optim
    return FinetuneModule(
        model,
        class_names,
        lr=o.lr,
        weight_decay=o.weight_decay,
        decay_all=o.decay_all,
        betas=o.betas,
        warmup_epochs=o.warmup_epochs,
        warmup_steps=o.warmup_steps,
        poly_power=o.poly_power,
        poly_horizon=o.poly_horizon,
        schedule_epochs=plan.schedule_epochs,
        ce_weight=plan.loss.ce_weight,
        dice_weight=plan.loss.dice_weight,
        aux_weight=plan.mole_aux_weight,
        image_log_every_n_epochs=plan.trainer.image_log_every_n_epochs,
    )


def run(plan: FinetunePlan) -> dict:
    """Fine-tune, save the final model, evaluate; returns the metrics."""
    L.seed_everything(plan.seed, workers=True, verbose=False)
    folder, tag = plan.folder, plan.tag
    previous = read_manifest(folder)
    if previous and previous.get("status") == "complete" and not plan.overwrite:
        raise SamoraError(
            f"Fine-tuning {folder} already finished (mean Dice {previous['metrics'].get('mean_dice')}); "
            "add overwrite=true to run it again, or choose another RUN or finetune.tag."
        )
    resume = _resume_checkpoint(plan)
    record = StageRecord(plan.stage, plan.config, folder)
    data = build_datamodule(plan.data)
    model = build_model(plan, data.num_classes, record)
    diagnostics = FusionDiagnostics(model.fusion or [])
    callbacks = [Throughput(), diagnostics]
    if plan.uses_lorahub:  # the decoder warms up, the search runs mid-training, then the decoder trains on
        paths = {} if plan.zero_experts else expert_paths(plan)
        callbacks.append(lorahub.prepare(plan, model, data, paths, record))
    record.metrics["trainable_parameters"] = log_trainable(model, f"finetune {tag}")
    record.metrics["test_cases_in_pretraining"] = pretraining_saw_test_cases(plan)
    module = _module(plan, model, data.class_names)
    save_config(plan.config, folder)
    trainer = build_trainer(plan.trainer, plan.folders.root, folder, "finetune", tag, callbacks=callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    if plan.uses_lorahub:
        record.metrics["lorahub_weights"] = callbacks[-1].weights
    final = folder / FINAL
    if is_rank_zero():
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        check_finite_state(state.items(), f"finetune {tag}", final)
        decoder = plan.segmenter.decoder
        atomic_save(
            final, lambda tmp: save_file(state, str(tmp), metadata={"tag": tag, "mode": plan.mode, "decoder": decoder})
        )
        record.add_output(final)
        for split in sorted((folder / "splits").glob("*")):
            record.add_output(split)
    record.metrics.update(skipped_batches(trainer))
    if diagnostics.latest:
        record.metrics["fusion_diagnostics"] = diagnostics.latest
    metrics = {}
    monitored = trainer.callback_metrics.get("val/mean_dice")  # the last validation on held-out training slices
    if monitored is not None:  # what `samora sweep` optimises: never a test volume
        metrics["val_mean_dice"] = float(monitored)
        record.metrics["val_mean_dice"] = metrics["val_mean_dice"]
    if plan.evaluate:
        metrics.update(evaluate_model(plan, model, data, trainer.strategy.root_device, diagnostics.latest))
        record.metrics.update(metrics)
    record.write()
    return metrics


def _resume_checkpoint(plan: FinetunePlan):
    """`last.ckpt` of an interrupted fine-tune with the same settings, to continue from; else None."""
    last = plan.folder / "checkpoints" / "last.ckpt"
    if plan.overwrite or not last.exists():
        return None
    changed = plan.changed_in(plan.folder, plan.tag)
    if changed:
        raise SamoraError(
            f"{plan.folder} holds an interrupted fine-tune made with other settings ({', '.join(changed)}); "
            "add overwrite=true to start again, or choose another RUN or finetune.tag."
        )
    resume = resumable(last, f"finetune {plan.tag}")
    if resume is not None:
        log.info("finetune: resuming from %s", last)
    return resume

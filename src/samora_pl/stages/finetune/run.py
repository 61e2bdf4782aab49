"""`samora finetune` and `samora evaluate`: stage 2 of SAMora and the protocol evaluation.

Fine-tuning reads the experts distilled in the same run (all three, or `finetune.levels`; paths
overridable), trains the fusion and the mask decoder on the labelled fraction, saves `final.safetensors`,
then evaluates every test volume with the SAMed/TransUNet protocol. `mode=samed` is the SAMed baseline
(one LoRA, no experts needed). `samora evaluate` picks the run's fine-tune as `samora predict` does
(`finished_folder`) and rebuilds its model from the `config.yaml` it saved.
"""

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from data_modules import build_datamodule
from data_modules.labelled.base import subset_policy
from samora_pl.config.compose import (
    compose_on_saved,
    data_options,
    diff_keys,
    finetune_levels,
    load_saved,
    sam_checkpoint,
)
from samora_pl.errors import SamoraError
from samora_pl.evaluation import CaseMetricsPool, gather_rows, predict_volume, shard_cases, summarise, write_results
from samora_pl.evaluation.report import format_table
from samora_pl.models.adapters.lora import read_expert_metadata
from samora_pl.models.factory import (
    SAMED_EXPERT,
    base_fingerprint,
    build_segmenter,
    log_trainable,
    sam_checkpoint_record,
)
from samora_pl.runs.atomic import atomic_save
from samora_pl.runs.checkpoint_io import resumable
from samora_pl.runs.manifest import (
    StageRecord,
    is_rank_zero,
    read_manifest,
    run_dir,
    save_config,
    stage_dir,
    verify_input,
)
from samora_pl.runs.reuse import changed_settings
from samora_pl.stages.finetune import lorahub
from samora_pl.stages.finetune.module import FinetuneModule
from samora_pl.training.callbacks import FusionDiagnostics, Throughput
from samora_pl.training.effective_batch import accumulate_grad_batches
from samora_pl.training.guards import check_finite_state, skipped_batches
from samora_pl.training.progress import track
from samora_pl.training.trainer import build_fabric, build_trainer

log = logging.getLogger(__name__)
FINAL = "final.safetensors"
MASK_TOKENS = "mask_decoder.mask_tokens.weight"  # (K + 1, C): background and one token per class
TAG_KEYS = (  # make tag_of
    "mode",
    "model.fusion",
    "model.decoder",
    "finetune.levels",
    "finetune.zero_experts",
    "finetune.train_experts",
    "data.fraction",
)
# what a fine-tuned model is and what it reads: `samora evaluate` takes them from the fine-tune, never changes them
MODEL_KEYS = ("model.", "mode", "finetune.levels", "data.name", "data.intensity")
FREE_MODEL_KEYS = ("model.checkpoint", "model.grad_checkpoint")  # not read / memory only when evaluating
TRANSDUCTIVE_NOTE = (
    "Transductive: stage-1 pre-training read the test images (cpt.include_test_cases=true); these numbers "
    "do not compare with inductive results."
)
HSAM_PREFIX = "hsam_decoder."  # H-SAM's stage 2 (model.decoder=hsam); stage 1 is mask_decoder


def tag_of(cfg: DictConfig) -> str:
    if cfg.finetune.tag:
        return cfg.finetune.tag
    fusion = "lora" if cfg.mode == "samed" else cfg.model.fusion.replace(":", "-")
    zero = "-zero" if cfg.finetune.zero_experts and cfg.mode == "samora" else ""
    zero += "-trainexp" if cfg.finetune.train_experts and cfg.mode == "samora" else ""
    levels = "" if cfg.mode == "samed" or cfg.finetune.levels is None else "-" + "+".join(finetune_levels(cfg))
    decoder = "" if cfg.model.decoder == "sam" else f"-{cfg.model.decoder}"
    return f"{cfg.mode}-{fusion}{levels}{zero}{decoder}-f{cfg.data.fraction:g}"


def fusion_label(cfg: DictConfig) -> str:
    """The fusion as every results table states it, e.g. `hl_attn (hl_init=paper)`: HL-Attn's init decides
    whether its block starts as the authors' `x + base + LN(high)` or as mean fusion plus a correction."""
    if cfg.mode == "samed":
        return "none (mode=samed, one LoRA)"
    if cfg.model.fusion == "hl_attn":
        return f"hl_attn (hl_init={cfg.model.hl_init})"
    return str(cfg.model.fusion)


def build_data(cfg: DictConfig, folder: Path, **overrides):
    return build_datamodule(
        cfg.data.name,
        root=cfg.data.dir,
        img_size=cfg.model.img_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        fraction=cfg.data.fraction,
        fraction_by=cfg.data.fraction_by,
        fraction_list=cfg.data.fraction_list,
        seed=cfg.seed,
        subset_seed=cfg.data.subset_seed,
        split_dir=folder / "splits",
        augment=cfg.data.augment,
        val_slices=cfg.data.val_slices,
        cache=cfg.data.cache,
        train_size=cfg.data.train_size,
        **{**data_options(cfg), **overrides},
    )


def build_evaluation_data(cfg: DictConfig, folder: Path):
    """The data of a finished fine-tune, with the case split it wrote to `<folder>/splits` (datasets split by
    case), so re-evaluation tests the same cases even after the dataset's own lists or folder changed.
    A `data.list_dir` the user sets still wins."""
    data = build_data(cfg, folder)
    saved = folder / "splits"
    list_files = getattr(data, "list_files", ())
    if cfg.data.list_dir is None and list_files and all((saved / name).is_file() for name in list_files):
        log.info("evaluate: test cases from the run's split in %s", saved)
        data = build_data(cfg, folder, list_dir=str(saved))
    return data


def expert_paths(cfg: DictConfig) -> dict:
    """The distilled experts stage 2 fuses: configured paths, else the run's distill outputs."""
    paths = {}
    for level in finetune_levels(cfg):
        configured = cfg.finetune.experts[level]
        paths[level] = Path(configured) if configured else stage_dir(cfg, "distill", level) / "expert.safetensors"
    missing = [f"{level}: {path}" for level, path in paths.items() if not path.exists()]
    if missing:
        levels = [line.split(":")[0] for line in missing]
        make = (
            "make distill LEVEL=all" if len(levels) == 3 else " and ".join(f"make distill LEVEL={lv}" for lv in levels)
        )
        raise SamoraError(
            "Fine-tuning in mode=samora needs the distilled LoRA experts, which are missing:\n  "
            + "\n  ".join(missing)
            + f"\nMake them with `{make} RUN={cfg.run} DATA={cfg.data.name}` (after `make cpt`), point "
            "finetune.experts.<level> at existing files, or use finetune.zero_experts=true / mode=samed."
        )
    return paths


def pretraining_saw_test_cases(cfg: DictConfig) -> bool:
    """Whether stage 1 read the test images: cpt.include_test_cases=true here, or in the pool record of a
    distilled expert this fine-tune fuses (its manifest's inputs.pool)."""
    if cfg.cpt.include_test_cases:
        return True
    if cfg.mode == "samed" or cfg.finetune.zero_experts:
        return False
    for level in finetune_levels(cfg):
        configured = cfg.finetune.experts[level]
        folder = Path(configured).parent if configured else stage_dir(cfg, "distill", level)
        pool = ((read_manifest(folder) or {}).get("inputs") or {}).get("pool") or {}
        if pool.get("include_test_cases"):
            return True
    return False


def model_layout(cfg: DictConfig) -> tuple:
    """(expert slots, fusion) of the stage-2 model: SAMed's one LoRA, LoRAHub's one composed LoRA, or the experts."""
    if cfg.mode == "samed":
        return (SAMED_EXPERT,), f"single:{SAMED_EXPERT}"
    if cfg.model.fusion == "lorahub":
        return (lorahub.HUB,), f"single:{lorahub.HUB}"
    return finetune_levels(cfg), cfg.model.fusion


def uses_lorahub(cfg: DictConfig) -> bool:
    return cfg.mode == "samora" and cfg.model.fusion == "lorahub"


def build_model(cfg: DictConfig, num_classes: int, record: StageRecord = None):
    """The stage-2 model with its experts loaded and the right parameters trainable.

    For model.fusion=lorahub the one LoRA slot stays empty here; `lorahub.prepare` fills it. `record` gets the
    SAM checkpoint and the experts as inputs."""
    if cfg.mode == "samed" or uses_lorahub(cfg):
        model = build_segmenter(cfg, num_classes, *model_layout(cfg))
    else:
        model = build_segmenter(cfg, num_classes, finetune_levels(cfg), cfg.model.fusion)
        if not cfg.finetune.zero_experts:
            fingerprint = base_fingerprint(model)
            for level, path in expert_paths(cfg).items():
                meta = read_expert_metadata(path)
                if meta.get("base_fingerprint") not in (None, fingerprint):
                    raise SamoraError(
                        f"Expert {path} was distilled on another SAM encoder (model.checkpoint or model.init_seed "
                        "differ from this run); re-run `make distill` with this run's model settings."
                    )
                model.load_expert(level, path)
                if record is not None:
                    record.add_input(f"expert_{level}", verify_input(path, Path(path).parent))
    # read: the model was built from it
    sam_file = sam_checkpoint_record(sam_checkpoint(cfg)) if record is not None else None
    if sam_file is not None:
        record.add_input("sam_checkpoint", sam_file)
    model.set_trainable(cfg.mode)
    if cfg.finetune.train_experts:
        model.train_expert_weights()
    return model


def _module(cfg: DictConfig, model, class_names) -> FinetuneModule:
    uses_aux = cfg.mode == "samora" and cfg.model.fusion == "mole"
    return FinetuneModule(
        model,
        class_names,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        decay_all=cfg.optim.decay_all,
        betas=cfg.optim.betas,
        warmup_epochs=cfg.optim.warmup_epochs,
        warmup_steps=cfg.optim.warmup_steps,
        poly_power=cfg.optim.poly_power,
        poly_horizon=cfg.optim.poly_horizon,
        schedule_epochs=cfg.trainer.max_epochs,
        ce_weight=cfg.loss.ce_weight,
        dice_weight=cfg.loss.dice_weight,
        aux_weight=cfg.model.mole_balance_weight if uses_aux else 0.0,
        image_log_every_n_epochs=cfg.trainer.image_log_every_n_epochs,
    )


def run(cfg: DictConfig) -> dict:
    """Fine-tune, save the final model, evaluate; returns the metrics."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tag = tag_of(cfg)
    folder = stage_dir(cfg, "finetune", tag)
    previous = read_manifest(folder)
    if previous and previous.get("status") == "complete" and not cfg.overwrite:
        raise SamoraError(
            f"Fine-tuning {folder} already finished (mean Dice {previous['metrics'].get('mean_dice')}); "
            "add overwrite=true to run it again, or choose another RUN or finetune.tag."
        )
    resume = _resume_checkpoint(cfg, folder)
    record = StageRecord(cfg, folder)
    data = build_data(cfg, folder)
    model = build_model(cfg, data.num_classes, record)
    diagnostics = FusionDiagnostics(model.fusion or [])
    callbacks = [Throughput(), diagnostics]
    if uses_lorahub(cfg):  # the decoder warms up, the search runs mid-training, then the decoder trains on
        paths = {} if cfg.finetune.zero_experts else expert_paths(cfg)
        callbacks.append(lorahub.prepare(cfg, model, data, folder, paths, record))
    record.metrics["trainable_parameters"] = log_trainable(model, f"finetune {tag}")
    record.metrics["test_cases_in_pretraining"] = pretraining_saw_test_cases(cfg)
    module = _module(cfg, model, data.class_names)
    save_config(cfg, folder)
    trainer = build_trainer(
        cfg,
        folder,
        "finetune",
        tag,
        max_epochs=cfg.trainer.stop_epoch or cfg.trainer.max_epochs,  # SAMed's stop_epoch of its schedule
        callbacks=callbacks,
        accumulate_grad_batches=accumulate_grad_batches(cfg),
    )
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    if uses_lorahub(cfg):
        record.metrics["lorahub_weights"] = callbacks[-1].weights
    final = folder / FINAL
    if is_rank_zero():
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        check_finite_state(state.items(), f"finetune {tag}", final)
        atomic_save(
            final,
            lambda tmp: save_file(
                state, str(tmp), metadata={"tag": tag, "mode": cfg.mode, "decoder": cfg.model.decoder}
            ),
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
    if cfg.finetune.evaluate:
        metrics.update(evaluate_model(cfg, model, data, folder, trainer.strategy.root_device, diagnostics.latest))
        record.metrics.update(metrics)
    record.write()
    return metrics


def _resume_checkpoint(cfg: DictConfig, folder: Path):
    """`last.ckpt` of an interrupted fine-tune with the same settings, to continue from; else None."""
    last = folder / "checkpoints" / "last.ckpt"
    if cfg.overwrite or not last.exists():
        return None
    changed = changed_settings("finetune", folder.name, cfg, folder)
    if changed:
        raise SamoraError(
            f"{folder} holds an interrupted fine-tune made with other settings ({', '.join(changed)}); "
            "add overwrite=true to start again, or choose another RUN or finetune.tag."
        )
    resume = resumable(last, f"finetune {folder.name}")
    if resume is not None:
        log.info("finetune: resuming from %s", last)
    return resume


def evaluate_model(cfg: DictConfig, model, data, folder: Path, device=None, fusion_diagnostics=None) -> dict:
    """The evaluation protocol (docs/method.md) on every test volume; each rank takes its share, rank zero writes.
    `fusion_diagnostics` (the fine-tune's last validation, `FusionDiagnostics.latest`) goes into metrics.json."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()

    @torch.no_grad()
    def predict(batch: torch.Tensor) -> torch.Tensor:
        return model(batch.to(device)).float().cpu()

    every = list(data.test_cases())
    cases = shard_cases(every)  # this rank's share
    shown = "evaluate" if len(cases) == len(every) else f"evaluate (rank 0's share of {len(every)})"
    # eval.workers > 1: each case's Dice/HD95 runs in a worker process while the model predicts the next
    with CaseMetricsPool(data.num_classes, workers=cfg.eval.workers) as pool:
        for case in track(cases, shown, "volume"):  # rank zero's line only
            volume = data.load_volume(case)
            pred = predict_volume(
                predict,
                volume.image,
                cfg.model.img_size,
                batch_size=cfg.eval.batch_size,
                resize=cfg.eval.resize,
                two_step_size=cfg.eval.two_step_size,
            )
            pool.submit(volume.case, pred, volume.label, volume.spacing)
        rows = pool.rows()
    rows = gather_rows(rows)
    summary = summarise(rows, data.class_names)
    if is_rank_zero():
        transductive = pretraining_saw_test_cases(cfg)
        extra = {
            "resize_protocol": cfg.eval.resize,
            "hd95_unit": "voxels",
            "tag": folder.name,
            "test_cases_in_pretraining": transductive,
            "fusion": fusion_label(cfg),
            "labelled_subset": subset_policy_of(cfg),
        }
        if fusion_diagnostics:
            extra["fusion_diagnostics"] = fusion_diagnostics
        notes = [f"fusion: {fusion_label(cfg)}", f"Labelled subset: {extra['labelled_subset']}."]
        notes += [TRANSDUCTIVE_NOTE] if transductive else []
        write_results(rows, data.class_names, folder, extra=extra, notes=notes)
        print(format_table(summary, data.class_names, title=f"{cfg.run}/{folder.name}"))
    return {"mean_dice": summary["mean_dice"], "mean_hd95": summary["mean_hd95"]}


def subset_policy_of(cfg: DictConfig) -> str:
    """How this fine-tune's labelled subset was chosen (redrawn per seed, fixed seed or list), for its tables."""
    return subset_policy(cfg.data.fraction_by, cfg.data.fraction_list, cfg.data.subset_seed, cfg.data.fraction)


def finished_folder(cfg: DictConfig, overrides=()) -> Path:
    """The fine-tune a command reads (`samora evaluate`, `samora predict`): `finetune.tag`; else the one the
    command line names through the keys the tag is made of (mode=samed, data.fraction=...); else the run's
    only finished one. Several and none named: one error listing them."""
    root = run_dir(cfg) / "finetune"
    if cfg.finetune.tag:
        if not (root / cfg.finetune.tag / FINAL).is_file():
            raise SamoraError(
                f"No fine-tuned model at {root / cfg.finetune.tag / FINAL}; check run= and "
                "finetune.tag=, or run `make finetune` first."
            )
        return root / cfg.finetune.tag
    finished = sorted(p.name for p in root.iterdir() if (p / FINAL).is_file()) if root.is_dir() else []
    if not finished:
        raise SamoraError(
            f"No finished fine-tuning in {root} (no {FINAL}); run `make finetune RUN={cfg.run}` first, "
            "or name another run with run=... (RUN=...)."
        )
    choose = f"choose one with finetune.tag=<name> (make: ARGS=finetune.tag=<name>): {', '.join(finished)}"
    if any(item.split("=", 1)[0].strip() in TAG_KEYS for item in overrides):
        if tag_of(cfg) in finished:
            return root / tag_of(cfg)
        raise SamoraError(f"{root} holds no fine-tune {tag_of(cfg)} (the settings given name it); {choose}.")
    if len(finished) > 1:
        raise SamoraError(f"{root} holds several fine-tunes; {choose}.")
    return root / finished[0]


def evaluation_config(cfg: DictConfig, folder: Path, overrides=()) -> DictConfig:
    """The fine-tune's saved config with this command's settings on top (eval.*, trainer.*, data.list_dir);
    a command line that changes what the model is (MODEL_KEYS) is refused rather than failing to load."""
    evaluation = compose_on_saved(folder / "config.yaml", "evaluate", cfg, overrides)
    differ = diff_keys(load_saved(folder / "config.yaml"), evaluation, ignore=FREE_MODEL_KEYS)
    changed = [key for key in differ if key.startswith(MODEL_KEYS)]
    if changed:
        raise SamoraError(
            f"{folder} was fine-tuned with other {', '.join(changed)}; evaluate rebuilds the model from its "
            "config.yaml, so drop these settings or choose another fine-tune with finetune.tag=<name>."
        )
    return evaluation


def evaluate(cfg: DictConfig, overrides=()) -> dict:
    """`samora evaluate`: re-evaluate a finished fine-tune's final model and rewrite its results.

    The model is the one the fine-tune made (`finished_folder`, its saved config.yaml); `eval.checkpoint`
    instead evaluates a weights file as the model this command's config describes."""
    if cfg.eval.checkpoint:
        folder, weights = stage_dir(cfg, "finetune", tag_of(cfg)), Path(cfg.eval.checkpoint)
        if not weights.is_file():
            raise SamoraError(f"No fine-tuned model at {weights} (eval.checkpoint); check the path.")
    else:
        folder = finished_folder(cfg, overrides)
        cfg, weights = evaluation_config(cfg, folder, overrides), folder / FINAL
    verify_input(weights, folder)
    device = None
    fabric = build_fabric(cfg)
    if fabric.world_size > 1:  # DEVICES=2, -1, NUM_NODES=2: Fabric starts the ranks; each evaluates its share
        fabric.launch()
        device = fabric.device
    data = build_evaluation_data(cfg, folder)
    model = load_finetuned(cfg, weights, data.num_classes)
    diagnostics = ((read_manifest(folder) or {}).get("metrics") or {}).get("fusion_diagnostics")
    return evaluate_model(cfg, model, data, folder, device, diagnostics)


def load_finetuned(cfg: DictConfig, weights: Path, num_classes: int = None):
    """The stage-2 model of `cfg` holding a finished fine-tune's weights (`samora evaluate`, `samora predict`).

    Without `num_classes`, K is read from the weights (the decoder has K + 1 mask tokens), so a prediction
    needs no copy of the training data. The file holds every weight (the load is strict), so SAM's
    `model.checkpoint` is not read: a run still predicts after the .pth moved or on a machine without it."""
    state = load_file(str(weights))
    if num_classes is None:
        if MASK_TOKENS not in state:
            raise SamoraError(f"{weights} holds no {MASK_TOKENS}: it is not a fine-tuned SAMora model.")
        num_classes = state[MASK_TOKENS].shape[0] - 1
    saved = "hsam" if any(key.startswith(HSAM_PREFIX) for key in state) else "sam"
    if saved != cfg.model.decoder:
        raise SamoraError(
            f"{weights} holds a model.decoder={saved} model but the run is configured with "
            f"model.decoder={cfg.model.decoder}; set model.decoder={saved} or point at the matching weights."
        )
    model = build_segmenter(cfg, num_classes, *model_layout(cfg), load_sam=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SamoraError(f"{weights} does not match the configured model ({str(err).splitlines()[0]}).") from err
    return model

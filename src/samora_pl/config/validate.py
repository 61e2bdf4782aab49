"""Checks of a composed configuration that types cannot express, for every stage, before any work.

Each error names the key, the allowed values and the fix. `validate` runs every stage's checks (CPT's and
distillation's too) whatever the stage, so `samora demo distill.mask_ratio=1.5` stops before the teachers
train; `samora ablation` and `samora demo` compose (and so validate) every stage they will run first.
"""

from typing import cast

from omegaconf import DictConfig, ListConfig, OmegaConf

from data_modules.pool.unlabeled import source_dict
from samora_pl.config import choices
from samora_pl.config.choices import LEVELS
from samora_pl.config.schema import TrainerConfig
from samora_pl.errors import SamoraError
from samora_pl.models.teachers.grey_input import NORMALIZE, NORMALIZE_AUTO
from samora_pl.models.teachers.simclr import RESNET_DEPTHS
from samora_pl.training.effective_batch import accumulation, known_world_size
from samora_pl.training.loggers import check_logger

CHOICES = {
    "data.fraction_by": choices.FRACTION_MODES,
    "data.intensity": choices.INTENSITY_OPTIONS,
    "model.family": choices.FAMILIES,
    "model.fusion": choices.FUSIONS,
    "model.hl_order": choices.HL_ORDERS,
    "model.hl_init": choices.HL_INITS,
    "model.decoder": choices.DECODERS,
    "model.hsam_cmattn": choices.HSAM_CMATTN,
    "model.hsam_inference": choices.HSAM_INFERENCE,
    "model.pos_embed_resize": choices.POS_EMBED_RESIZE,
    "optim.poly_horizon": choices.POLY_HORIZONS,
    "mode": choices.MODES,
    "logger": choices.LOGGERS,
    "trainer.precision": choices.PRECISIONS,
    "trainer.accelerator": choices.ACCELERATORS,
    "eval.resize": choices.RESIZE_MODES,
    "cpt.teacher": ("all",) + choices.TEACHERS,
    "distill.level": ("all",) + LEVELS,
    "finetune.lorahub.start": choices.LORAHUB_STARTS,
    "predict.intensity": choices.INTENSITY_OPTIONS,
    "prepare.source": (None,) + choices.PREPARE_SOURCES,
}

NO_CHECKPOINT = "none"  # model.checkpoint=none: a random SAM on purpose, where a profile requires weights
# the official files (segment-anything's model card; SimCLRv2-Pytorch's convert.py names; MAE's release)
OFFICIAL_SAM = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
OFFICIAL_TEACHERS = {
    "simclr": "SimCLRv2 r50_2x_sk1.pth (convert.py of SimCLRv2-Pytorch, from the TF checkpoint r50_2x_sk1)",
    "mae": "mae_pretrain_vit_large.pth",
}
CHECKPOINT_STAGES = ("cpt", "distill", "finetune")  # the stages that start from public weights


def validate(cfg: DictConfig) -> None:
    """Checks that types cannot express; each error names the key and the allowed values."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise SamoraError(f"Config key '{key}' is {value!r}; allowed values: {', '.join(map(str, allowed))}.")
    variants = choices.VARIANTS[cfg.model.family]
    if cfg.model.variant not in variants:
        raise SamoraError(
            f"Config key 'model.variant' is {cfg.model.variant!r}; with model.family={cfg.model.family} "
            f"allowed values: {', '.join(variants)}."
        )
    if not 0.0 <= cfg.finetune.lorahub.warmup < 1.0:
        raise SamoraError(
            f"Config key 'finetune.lorahub.warmup' is {cfg.finetune.lorahub.warmup}; give the share of the decoder's "
            "training steps before the search, in [0, 1)."
        )
    if cfg.finetune.train_experts and (cfg.mode != "samora" or cfg.model.fusion == "lorahub"):
        raise SamoraError(
            "Config key 'finetune.train_experts' is true; it trains the experts of mode=samora with a fusion "
            f"other than lorahub (here mode={cfg.mode}, model.fusion={cfg.model.fusion}); leave it false."
        )
    if not 0.0 < cfg.data.fraction <= 1.0:
        raise SamoraError(f"Config key 'data.fraction' (FRACTION) is {cfg.data.fraction}; it must be in (0, 1].")
    if cfg.data.fraction_by == "list" and not cfg.data.fraction_list:
        raise SamoraError("Config key 'data.fraction_list' must name a slice-list file when data.fraction_by=list.")
    if cfg.data.subset_seed is not None and (cfg.data.fraction_by == "list" or cfg.data.subset_seed < 0):
        raise SamoraError(
            f"Config key 'data.subset_seed' is {cfg.data.subset_seed} with data.fraction_by={cfg.data.fraction_by}; "
            "give a seed >= 0 with fraction_by slice or case (a list file is fixed already), or leave it unset."
        )
    positive = {
        "model.img_size": cfg.model.img_size,
        "model.lora_rank": cfg.model.lora_rank,
        "data.batch_size": cfg.data.batch_size,
        "trainer.max_epochs": cfg.trainer.max_epochs,
        "trainer.num_nodes": cfg.trainer.num_nodes,
        "distill.max_epochs": cfg.distill.max_epochs,
        "predict.overlay_slices": cfg.predict.overlay_slices,
    }
    for key, value in positive.items():
        if value < 1:
            raise SamoraError(f"Config key '{key}' is {value}; it must be a positive integer.")
    if cfg.model.img_size % 16:
        raise SamoraError(f"Config key 'model.img_size' is {cfg.model.img_size}; it must be a multiple of 16.")
    _check_hsam(cfg)
    if cfg.model.family == "sam2" and cfg.model.img_size % 32:
        raise SamoraError(
            f"Config key 'model.img_size' is {cfg.model.img_size}; with model.family=sam2 it must be a multiple "
            "of 32 (Hiera tiles an 8x8 window position embedding over the stride-4 map), e.g. 224 or 512."
        )
    if not cfg.run or "/" in cfg.run or cfg.run.startswith("."):
        raise SamoraError(f"Config key 'run' is {cfg.run!r}; use a plain folder name (letters, digits, - and _).")
    _check_devices(cfg.trainer.devices)
    check_logger(cfg.logger)  # the tracker's package (mlflow, wandb) is installed
    _check_probe(cfg)
    _check_recipe(cfg)
    _check_levels(cfg)
    _check_lac_weights(cfg)
    _check_cpt(cfg)
    _check_distill(cfg)
    check_checkpoints(cfg)


def _check_probe(cfg: DictConfig) -> None:
    """probe.*: a split with both parts, and positive sizes."""
    p = cfg.probe
    if not 0.0 < p.holdout < 1.0:
        raise SamoraError(
            f"Config key 'probe.holdout' is {p.holdout}; give the held-out share of the training cases in (0, 1), "
            "e.g. 0.3."
        )
    if p.max_slices < 4:
        raise SamoraError(f"Config key 'probe.max_slices' is {p.max_slices}; it must be at least 4.")
    if p.l2 < 0:
        raise SamoraError(f"Config key 'probe.l2' is {p.l2}; it must be >= 0.")
    for key in ("knn_k", "max_patches", "batch_size"):
        if p[key] < 1:
            raise SamoraError(f"Config key 'probe.{key}' is {p[key]}; it must be a positive integer.")


def _check_recipe(cfg: DictConfig) -> None:
    """The fine-tune's stop epoch, train-time size and global batch (SAMed's recipe keys) fit together."""
    stop, epochs = cfg.trainer.stop_epoch, cfg.trainer.max_epochs
    if stop is not None and not 1 <= stop <= epochs:
        raise SamoraError(
            f"Config key 'trainer.stop_epoch' is {stop}; it must be in [1, trainer.max_epochs={epochs}] (training "
            "stops there, the LR schedule spans trainer.max_epochs), or unset (trainer.stop_epoch=null) to train "
            "every epoch of the schedule."
        )
    size = cfg.data.train_size
    if size is not None and size < 1:
        raise SamoraError(f"Config key 'data.train_size' is {size}; it must be a positive integer (e.g. 224) or unset.")
    if cfg.stage == "finetune":  # the other stages do not step this batch
        trainer = cast(TrainerConfig, OmegaConf.to_object(cfg.trainer))  # a structured TrainerConfig node
        world = known_world_size(trainer.devices, cfg.trainer.num_nodes)
        accumulation(cfg.data.effective_batch_size, cfg.data.batch_size, world)


def _check_lac_weights(cfg: DictConfig) -> None:
    """model.lac_weights: one fixed weight per fused expert, summing to 1 (MoLE's normalised composition)."""
    weights = cfg.model.lac_weights
    if weights is None:
        return
    levels = levels_of(cfg.finetune.levels)
    weights = [float(w) for w in weights]
    if len(weights) != len(levels) or abs(sum(weights) - 1.0) > 1e-6:
        example = {1: "1", 2: "0.5,0.5", 3: "0.5,0.25,0.25"}[len(levels)]
        raise SamoraError(
            f"Config key 'model.lac_weights' is {weights}; give {len(levels)} weights summing to 1, one per expert "
            f"in the order {', '.join(levels)} (e.g. model.lac_weights=[{example}]), or leave it unset for equal "
            "weights."
        )


def _check_devices(devices) -> None:
    """trainer.devices as Lightning takes it: a count, every device, or a list of device indices."""
    if isinstance(devices, ListConfig):
        indices = list(devices)
        good = bool(indices) and all(_whole(i) and i >= 0 for i in indices) and len(set(indices)) == len(indices)
    else:
        good = devices in ("auto", -1) or (_whole(devices) and devices >= 1)
    if not good:
        raise SamoraError(
            f"Config key 'trainer.devices' (DEVICES) is {devices!r}; allowed values: a number of devices >= 1 "
            "(e.g. 2), -1 or auto for every device, or a list of distinct device indices such as [0,1]."
        )


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checkpoint_path(value: str | None) -> str | None:
    """model.checkpoint as a path, or None for a random SAM (unset, or `none` on purpose)."""
    return None if value is None or str(value).strip().lower() == NO_CHECKPOINT else str(value)


def check_checkpoints(cfg: DictConfig) -> None:
    """A profile with `requires_checkpoints` (GPU scale) never trains from random weights by accident: a stage
    that starts from public weights stops before any work when they are not given."""
    if not cfg.requires_checkpoints or cfg.stage not in CHECKPOINT_STAGES:
        return
    if cfg.stage in ("distill", "finetune") and cfg.model.checkpoint is None:
        official = OFFICIAL_SAM.get(cfg.model.variant, "the official SAM .pth of model.variant")
        raise SamoraError(
            f"Config key 'model.checkpoint' is not set, and PROFILE={cfg.profile} needs SAM's public weights: "
            f"download {official} (SAM {cfg.model.variant}) and set model.checkpoint=<its path>, or "
            f"model.checkpoint={NO_CHECKPOINT} to run from a random SAM on purpose."
        )
    if cfg.stage == "cpt":
        kinds = ("simclr", "mae") if cfg.cpt.teacher == "all" else (cfg.cpt.teacher,)
        for kind in kinds:
            if not cfg.cpt[kind].checkpoint and not cfg.cpt[kind].from_scratch:
                raise SamoraError(
                    f"Config key 'cpt.{kind}.checkpoint' is not set, and PROFILE={cfg.profile} continues the public "
                    f"teacher weights: give {OFFICIAL_TEACHERS[kind]} as cpt.{kind}.checkpoint=<its path>, or set "
                    f"cpt.{kind}.from_scratch=true to pre-train that teacher from random weights on purpose."
                )


def _check_hsam(cfg: DictConfig) -> None:
    """H-SAM's class-wise attention runs over the N = (img_size/16)^2 positions: its heads must divide N."""
    heads = cfg.model.hsam_cmattn_heads
    tokens = (cfg.model.img_size // 16) ** 2
    if cfg.model.decoder == "hsam" and heads is not None and (heads < 1 or tokens % heads):
        raise SamoraError(
            f"Config key 'model.hsam_cmattn_heads' is {heads}; it must divide the token count N = {tokens} "
            f"((model.img_size/16)^2 at img_size {cfg.model.img_size}); choose a divisor or leave it unset."
        )
    if cfg.model.decoder == "hsam" and cfg.model.family == "sam2":
        raise SamoraError(
            "Config key 'model.decoder' is hsam with model.family=sam2: H-SAM's two-stage decoder is built on SAM "
            "(v1)'s mask decoder, whose upscaling has no slot for SAM 2's high-resolution features (conv_s0/conv_s1), "
            "so it is not available on Hiera yet; use model.decoder=sam with family=sam2, or family=sam with hsam."
        )
    if cfg.optim.warmup_steps is not None and cfg.optim.warmup_steps < 0:
        raise SamoraError(f"Config key 'optim.warmup_steps' is {cfg.optim.warmup_steps}; it must be >= 0.")


def levels_of(chosen) -> tuple[str, ...]:
    """The experts stage 2 fuses (`finetune.levels`), in the canonical order; all three when unset."""
    return LEVELS if chosen is None else tuple(lv for lv in LEVELS if lv in chosen)


def _check_levels(cfg: DictConfig) -> None:
    """finetune.levels: distinct known levels, and a fusion that can combine them (level ablation)."""
    if cfg.finetune.levels is None:
        return
    chosen = list(cfg.finetune.levels)
    if not chosen or len(set(chosen)) != len(chosen) or any(lv not in LEVELS for lv in chosen):
        raise SamoraError(
            f"Config key 'finetune.levels' is {chosen}; give one, two or three distinct levels of "
            f"{', '.join(LEVELS)} (e.g. finetune.levels=[image,patch]), or leave it unset for all three."
        )
    if cfg.mode != "samora":
        return
    fusion = cfg.model.fusion
    if fusion.startswith("single:") and fusion.split(":", 1)[1] not in chosen:
        raise SamoraError(f"model.fusion={fusion} uses an expert that finetune.levels={chosen} leaves out.")
    if fusion == "hl_attn" and len(chosen) < 2:
        raise SamoraError(
            f"model.fusion=hl_attn fuses two or three experts; with finetune.levels={chosen} use "
            f"model.fusion=single:{chosen[0]}."
        )


def _check_cpt(cfg: DictConfig) -> None:
    """The checks of cpt.* that types cannot express; each error names the key and the allowed values."""
    s, m = cfg.cpt.simclr, cfg.cpt.mae

    def need(ok: bool, key: str, value, rule: str) -> None:
        if not ok:
            raise SamoraError(f"Config key '{key}' is {value!r}; {rule}.")

    need(s.depth in RESNET_DEPTHS, "cpt.simclr.depth", s.depth, f"allowed: {', '.join(map(str, RESNET_DEPTHS))}")
    need(s.width > 0, "cpt.simclr.width", s.width, "it must be positive (1 or 2 for SimCLRv2 1x / 2x)")
    need(s.temperature > 0, "cpt.simclr.temperature", s.temperature, "it must be positive")
    need(s.batch_size >= 2, "cpt.simclr.batch_size", s.batch_size, "NT-Xent and BatchNorm need at least 2")
    need(m.batch_size >= 1, "cpt.mae.batch_size", m.batch_size, "it must be at least 1")
    need(0.0 <= m.mask_ratio < 1.0, "cpt.mae.mask_ratio", m.mask_ratio, "it must be in [0, 1)")
    for name, sub in (("simclr", s), ("mae", m)):
        need(sub.img_size >= 16, f"cpt.{name}.img_size", sub.img_size, "it must be at least 16")
        need(
            sub.max_epochs >= 0,
            f"cpt.{name}.max_epochs",
            sub.max_epochs,
            "it must be at least 0 (0 keeps the starting weights: no continual pre-training)",
        )
        allowed = (NORMALIZE_AUTO, *NORMALIZE) if name == "simclr" else NORMALIZE
        need(sub.normalize in allowed, f"cpt.{name}.normalize", sub.normalize, f"allowed: {', '.join(allowed)}")
        scale = list(sub.crop_scale)
        need(
            len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
            f"cpt.{name}.crop_scale",
            scale,
            "give [min, max] with 0 < min <= max <= 1",
        )
    need(0 <= s.blur_prob <= 1, "cpt.simclr.blur_prob", s.blur_prob, "it must be in [0, 1]")
    if m.patch_size is not None:
        need(
            m.img_size % m.patch_size == 0,
            "cpt.mae.img_size",
            m.img_size,
            f"it must be a multiple of cpt.mae.patch_size ({m.patch_size})",
        )
    for position, source in enumerate(cfg.cpt.sources):
        source_dict(source, position)


def _check_distill(cfg: DictConfig) -> None:
    """distill.*: ranges, pairs and a teacher file only where one level reads it."""
    d = cfg.distill
    if d.image_pairing not in choices.IMAGE_PAIRINGS:
        raise SamoraError(
            f"Config key 'distill.image_pairing' is {d.image_pairing!r}; allowed values: "
            f"{', '.join(choices.IMAGE_PAIRINGS)}."
        )
    if not 0.0 <= d.mask_ratio < 1.0:
        raise SamoraError(f"Config key 'distill.mask_ratio' is {d.mask_ratio}; it must be in [0, 1).")
    if not 0.0 <= d.blur_prob <= 1.0:
        raise SamoraError(f"Config key 'distill.blur_prob' is {d.blur_prob}; it must be in [0, 1].")
    if d.noise_sigma < 0:
        raise SamoraError(f"Config key 'distill.noise_sigma' is {d.noise_sigma}; it must be >= 0.")
    for key in ("blur_sigma", "crop_scale"):
        value = list(d[key])
        if len(value) != 2 or not 0 < value[0] <= value[1]:
            raise SamoraError(f"Config key 'distill.{key}' is {value}; give [low, high] with 0 < low <= high.")
    if d.batch_size < 1:
        raise SamoraError(f"Config key 'distill.batch_size' is {d.batch_size}; it must be a positive integer.")
    if cfg.stage == "distill" and d.level == "all" and d.teacher:
        raise SamoraError(
            "distill.teacher names one teacher file, but distill.level=all needs two (SimCLR and MAE); "
            "run the levels separately (distill.level=image / patch) with their own distill.teacher."
        )


# keys a stage command does not read, and the keys that do what the user meant
UNREAD_BY_STAGE = {
    "cpt": {"trainer.max_epochs": "cpt.simclr.max_epochs / cpt.mae.max_epochs"},
    "distill": {"trainer.max_epochs": "distill.max_epochs"},
}


def check_stage_overrides(stage: str, overrides) -> None:
    """A key given on a stage's own command line that the stage never reads is refused, naming the key that
    does (`samora cpt trainer.max_epochs=3` would otherwise train for cpt.<teacher>.max_epochs silently).
    The suites (demo, ablation) share one command line over several stages, so they are not checked here."""
    given = {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    for key, instead in UNREAD_BY_STAGE.get(stage, {}).items():
        if key in given:
            raise SamoraError(f"Config key '{key}' is not read by `samora {stage}`; set {instead} instead.")

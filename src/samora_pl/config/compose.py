"""Compose, validate and save the configuration of one stage.

Order of composition (later wins): schema defaults (`config/schema.py`) < `experiments/<stage>.yaml` <
`experiments/data/<data>.yaml` < `experiments/model/<profile>.yaml` (its `stages.<stage>` block last) <
command-line `key=value` overrides, among which `overrides_file=PATH` reads a YAML mapping of keys in its
place (`samora sweep` writes one). Values are parsed as YAML, never evaluated as code.
"""

import os
from collections.abc import Iterable
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from samora_pl.config import choices
from samora_pl.config.choices import LEVELS
from samora_pl.config.migrate import added_since
from samora_pl.config.schema import RootConfig
from samora_pl.errors import SamoraError
from samora_pl.training.effective_batch import accumulate_grad_batches
from samora_pl.training.loggers import check_logger

STAGES = ("cpt", "distill", "finetune", "evaluate", "check", "prepare", "predict", "probe")
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

PROFILE_FOR_DATA = {"demo": "tiny"}
NO_CHECKPOINT = "none"  # model.checkpoint=none: a random SAM on purpose, where a profile requires weights
# the official files (segment-anything's model card; SimCLRv2-Pytorch's convert.py names; MAE's release)
OFFICIAL_SAM = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
OFFICIAL_TEACHERS = {
    "simclr": "SimCLRv2 r50_2x_sk1.pth (convert.py of SimCLRv2-Pytorch, from the TF checkpoint r50_2x_sk1)",
    "mae": "mae_pretrain_vit_large.pth",
}
CHECKPOINT_STAGES = ("cpt", "distill", "finetune")  # the stages that start from public weights


def experiments_dir() -> Path:
    """The `experiments/` folder: $SAMORA_EXPERIMENTS, else the one in this checkout."""
    env = os.environ.get("SAMORA_EXPERIMENTS")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "experiments"
    if not path.is_dir():
        raise SamoraError(f"Config folder {path} not found; set SAMORA_EXPERIMENTS to the experiments/ folder.")
    return path


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as err:
        raise SamoraError(f"Cannot read config file {path}: {err}") from err


OVERRIDES_FILE = "overrides_file"  # overrides_file=PATH: a YAML mapping of overrides (`samora sweep`'s best.yaml)


def _parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """The command line's overrides as one tree; each `overrides_file=PATH` is read (YAML, never evaluated)
    where it stands, so a key=value after it wins over the file and one before it does not."""
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise SamoraError(f"Override '{item}' is not of the form key=value (e.g. data.fraction=0.1).")
    tree, run = OmegaConf.create(), []
    for item in [*items, None]:
        if item is not None and not item.startswith(f"{OVERRIDES_FILE}="):
            run.append(item)
            continue
        try:
            tree = OmegaConf.merge(tree, OmegaConf.from_dotlist(run))
        except OmegaConfBaseException as err:
            raise SamoraError(f"Cannot parse overrides {run}: {err}") from err
        run = []
        if item is not None:
            tree = OmegaConf.merge(tree, _overrides_file(item.split("=", 1)[1]))
    return tree


def _overrides_file(path: str) -> DictConfig:
    """A YAML mapping of config keys (nested, as experiments/*.yaml), checked against the schema by name."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SamoraError(f"{OVERRIDES_FILE}={path}: no such file; give a YAML file of config keys (e.g. best.yaml).")
    try:
        loaded = _load_yaml(file)
    except yaml.YAMLError as err:  # malformed YAML (the stage files' reader lets it through)
        raise SamoraError(f"Cannot read config file {file}: {err}") from err
    if not isinstance(loaded, DictConfig):
        raise SamoraError(
            f"{OVERRIDES_FILE}={path}: the file must hold a mapping of config keys, e.g. optim: {{lr: 0.001}}."
        )
    _merge(OmegaConf.structured(RootConfig), loaded, str(file))  # unknown keys and bad types, named with the file
    return loaded


def _merge(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as err:
        key = err.full_key or err.key
        parent = key.rsplit(".", 1)[0] if "." in str(key) else ""
        node = OmegaConf.select(base, parent) if parent else base
        known = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "?"
        raise SamoraError(f"Unknown config key '{key}' (from {source}). Known keys here: {known}.") from err
    except ValidationError as err:
        raise SamoraError(
            f"Bad value for config key '{err.full_key}' (from {source}): {str(err).splitlines()[0]}"
        ) from err
    except OmegaConfBaseException as err:
        raise SamoraError(f"Bad config (from {source}): {err}") from err


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
        accumulate_grad_batches(cfg)


def _check_lac_weights(cfg: DictConfig) -> None:
    """model.lac_weights: one fixed weight per fused expert, summing to 1 (MoLE's normalised composition)."""
    weights = cfg.model.lac_weights
    if weights is None:
        return
    levels = finetune_levels(cfg)
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


def sam_checkpoint(cfg: DictConfig) -> str | None:
    """model.checkpoint as a path, or None for a random SAM (unset, or `none` on purpose)."""
    path = cfg.model.checkpoint
    return None if path is None or str(path).strip().lower() == NO_CHECKPOINT else str(path)


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


def finetune_levels(cfg: DictConfig) -> tuple:
    """The experts stage 2 fuses, in the canonical order: `finetune.levels`, or all three."""
    chosen = cfg.finetune.levels
    return LEVELS if chosen is None else tuple(lv for lv in LEVELS if lv in chosen)


def data_options(cfg: DictConfig) -> dict:
    """The dataset options the user set (data.intensity, data.list_dir, data.split_seed), for every stage that
    builds data; unset ones are left out, so a dataset without them is only refused when they are asked for."""
    options = {
        "intensity": None if cfg.data.intensity == "auto" else cfg.data.intensity,
        "list_dir": cfg.data.list_dir,
        "split_seed": cfg.data.split_seed,
    }
    return {key: value for key, value in options.items() if value is not None}


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


def compose(stage: str, overrides: Iterable[str] = (), root: Path | None = None) -> DictConfig:
    """Build the validated, read-only config of `stage` from the experiment files and overrides."""
    if stage not in STAGES:
        raise SamoraError(f"Unknown stage '{stage}'; choose one of: {', '.join(STAGES)}.")
    root = root or experiments_dir()
    cli = _parse_overrides(overrides)
    cfg = OmegaConf.structured(RootConfig)
    stage_file = root / ("finetune.yaml" if stage in ("evaluate", "check") else f"{stage}.yaml")
    if stage_file.exists():
        cfg = _merge(cfg, _load_yaml(stage_file), str(stage_file))
    cfg = _merge(cfg, OmegaConf.create({"stage": stage}), "stage")

    data_name = OmegaConf.select(cli, "data.name", default=cfg.data.name)
    data_file = root / "data" / f"{data_name}.yaml"
    if not data_file.exists():
        known = sorted(p.stem for p in (root / "data").glob("*.yaml"))
        raise SamoraError(f"Unknown dataset '{data_name}' (DATA); known: {', '.join(known)}.")
    cfg = _merge(cfg, _load_yaml(data_file), str(data_file))

    profile = OmegaConf.select(cli, "profile", default=None) or cfg.profile
    profile = profile or PROFILE_FOR_DATA.get(data_name, "paper")
    profile_file = root / "model" / f"{profile}.yaml"
    if not profile_file.exists():
        known = sorted(p.stem for p in (root / "model").glob("*.yaml"))
        raise SamoraError(f"Unknown profile '{profile}' (PROFILE); known: {', '.join(known)}.")
    profile_cfg = _load_yaml(profile_file)
    per_stage = profile_cfg.pop("stages", None) or {}
    cfg = _merge(cfg, profile_cfg, str(profile_file))
    stage_key = "finetune" if stage in ("evaluate", "check") else stage
    if stage_key in per_stage:
        cfg = _merge(cfg, per_stage[stage_key], f"{profile_file} (stages.{stage_key})")
    cfg = _merge(cfg, OmegaConf.create({"profile": profile}), "profile")

    cfg = _merge(cfg, cli, "command line")
    if cfg.data.dir is None:
        cfg.data.dir = f"data/{cfg.data.name}"
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_saved(path: Path) -> DictConfig:
    """The read-only config a stage saved (its config.yaml), on today's schema so keys added since it ran
    take their defaults; for commands that reuse a finished stage's model (`samora predict`)."""
    cfg = _saved(path)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def compose_on_saved(path: Path, stage: str, now: DictConfig, overrides: Iterable[str] = ()) -> DictConfig:
    """A finished stage's config (its config.yaml) as the base of another command (`samora evaluate`): where
    the run lives and what it runs on (runs_dir, run, trainer.*, threads, data.num_workers) come from this
    command's config `now`, then its command-line `overrides` win; validated and read-only."""
    cfg = _saved(path)
    here = {key: now[key] for key in ("runs_dir", "run", "trainer", "threads")}
    here.update(stage=stage, data={"num_workers": now.data.num_workers})
    cfg = _merge(cfg, OmegaConf.create(here), "this command")
    cfg = _merge(cfg, _parse_overrides(overrides), "command line")
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _saved(path: Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise SamoraError(f"{path} is missing: the stage folder is incomplete; re-run the stage that made it.")
    raw = _load_yaml(path)
    return _merge(_merge(OmegaConf.structured(RootConfig), raw, str(path)), added_since(raw), "migration")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def diff_keys(old: DictConfig, new: DictConfig, ignore: Iterable[str] = ()) -> list:
    """Dotted keys whose values differ between two configs (for refusing a changed re-run)."""
    flat_old = _flatten(OmegaConf.to_container(old, resolve=True))
    flat_new = _flatten(OmegaConf.to_container(new, resolve=True))
    skip = tuple(ignore)
    keys = sorted(set(flat_old) | set(flat_new))
    return [k for k in keys if flat_old.get(k) != flat_new.get(k) and not k.startswith(skip)]


def changed_since(saved: Path, cfg: DictConfig, watched: Iterable[str], ignore: Iterable[str] = ()) -> list:
    """Watched keys whose values differ from the config a stage folder was made with (`saved`).

    An unreadable saved config counts as changed, so a damaged folder is never silently reused.
    """
    if not Path(saved).exists():
        return []
    try:
        old = _saved(saved)  # on today's schema, keys added since it was saved at their old-run values
    except SamoraError as err:
        return [f"{Path(saved).name} unreadable ({err})"]
    return [key for key in diff_keys(old, cfg, ignore) if key.startswith(tuple(watched))]


def flat_config(cfg: DictConfig) -> dict:
    """{dotted key: value} of a resolved config: what `changed_since` compares and ablations hash."""
    return _flatten(OmegaConf.to_container(cfg, resolve=True))


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}

"""Compose, validate and save the configuration of one stage.

Order of composition (later wins): schema defaults (`config/schema.py`) < `experiments/<stage>.yaml` <
`experiments/data/<data>.yaml` < `experiments/model/<profile>.yaml` (its `stages.<stage>` block last) <
command-line `key=value` overrides, among which `overrides_file=PATH` reads a YAML mapping of keys in its
place (`samora sweep` writes one). Values are parsed as YAML, never evaluated as code.
"""

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from samora_pl.config.migrate import added_since
from samora_pl.config.schema import RootConfig
from samora_pl.config.validate import validate
from samora_pl.errors import SamoraError

STAGES = ("cpt", "distill", "finetune", "evaluate", "check", "prepare", "predict", "probe")
PROFILE_FOR_DATA = {"demo": "tiny"}


def experiments_dir() -> Path:
    """The `experiments/` folder: $SAMORA_EXPERIMENTS, else the one in this checkout."""
    env = os.environ.get("SAMORA_EXPERIMENTS")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "experiments"
    if not path.is_dir():
        raise SamoraError(f"Config folder {path} not found; set SAMORA_EXPERIMENTS to the experiments/ folder.")
    return path


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as err:
        raise SamoraError(f"Cannot read config file {path}: {err}") from err
    if isinstance(loaded, ListConfig):  # a YAML list at the top: no config keys to merge
        raise SamoraError(f"Cannot read config file {path}: it holds a list, not a mapping of config keys.")
    return loaded


OVERRIDES_FILE = "overrides_file"  # overrides_file=PATH: a YAML mapping of overrides (`samora sweep`'s best.yaml)


def _parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """The command line's overrides as one tree; each `overrides_file=PATH` is read (YAML, never evaluated)
    where it stands, so a key=value after it wins over the file and one before it does not."""
    items = list(overrides)
    for given in items:
        if "=" not in given or given.startswith("="):
            raise SamoraError(f"Override '{given}' is not of the form key=value (e.g. data.fraction=0.1).")
    tree: DictConfig = OmegaConf.create()
    run: list[str] = []
    pending: list[str | None] = [*items, None]  # None closes the last run of key=value items
    for item in pending:
        if item is not None and not item.startswith(f"{OVERRIDES_FILE}="):
            run.append(item)
            continue
        try:
            tree = cast(DictConfig, OmegaConf.merge(tree, OmegaConf.from_dotlist(run)))
        except OmegaConfBaseException as err:
            raise SamoraError(f"Cannot parse overrides {run}: {err}") from err
        run = []
        if item is not None:
            tree = cast(DictConfig, OmegaConf.merge(tree, _overrides_file(item.split("=", 1)[1])))
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
        return cast(DictConfig, OmegaConf.merge(base, update))  # merging onto a DictConfig gives a DictConfig
    except ConfigKeyError as err:
        key = err.full_key or err.key
        parent = key.rsplit(".", 1)[0] if "." in str(key) else ""
        node = OmegaConf.select(base, parent) if parent else base
        known = ", ".join(sorted(map(str, node.keys()))) if isinstance(node, DictConfig) else "?"
        raise SamoraError(f"Unknown config key '{key}' (from {source}). Known keys here: {known}.") from err
    except ValidationError as err:
        raise SamoraError(
            f"Bad value for config key '{err.full_key}' (from {source}): {str(err).splitlines()[0]}"
        ) from err
    except OmegaConfBaseException as err:
        raise SamoraError(f"Bad config (from {source}): {err}") from err


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


def resolved_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers (a DictConfig's container is a dict with str keys)."""
    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))


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

"""Which finished fine-tune a command reads (`samora evaluate`, `samora predict`, `samora bundle`), and the
configuration it was made with: the model is always rebuilt from the fine-tune's own saved `config.yaml`."""

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf

from samora_pl.config.compose import compose_on_saved, diff_keys, load_saved, resolved_dict
from samora_pl.config.plans import FINAL_FILE, FinetunePlan, PredictPlan, build_plan, finetune_tag, folders_of
from samora_pl.config.schema import PredictConfig
from samora_pl.errors import SamoraError

TAG_KEYS = (  # what finetune_tag is made of
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


def finished_folder(cfg: DictConfig, overrides: Iterable[str] = ()) -> Path:
    """The fine-tune a command reads: `finetune.tag`; else the one the command line names through the keys
    the tag is made of (mode=samed, data.fraction=...); else the run's only finished one. Several and none
    named: one error listing them."""
    root = Path(cfg.runs_dir) / cfg.run / "finetune"
    if cfg.finetune.tag:
        if not (root / cfg.finetune.tag / FINAL_FILE).is_file():
            raise SamoraError(
                f"No fine-tuned model at {root / cfg.finetune.tag / FINAL_FILE}; check run= and "
                "finetune.tag=, or run `make finetune` first."
            )
        return root / cfg.finetune.tag
    finished = sorted(p.name for p in root.iterdir() if (p / FINAL_FILE).is_file()) if root.is_dir() else []
    if not finished:
        raise SamoraError(
            f"No finished fine-tuning in {root} (no {FINAL_FILE}); run `make finetune RUN={cfg.run}` first, "
            "or name another run with run=... (RUN=...)."
        )
    choose = f"choose one with finetune.tag=<name> (make: ARGS=finetune.tag=<name>): {', '.join(finished)}"
    if any(item.split("=", 1)[0].strip() in TAG_KEYS for item in overrides):
        tag = finetune_tag(cfg)
        if tag in finished:
            return root / tag
        raise SamoraError(f"{root} holds no fine-tune {tag} (the settings given name it); {choose}.")
    if len(finished) > 1:
        raise SamoraError(f"{root} holds several fine-tunes; {choose}.")
    return root / finished[0]


def evaluation_config(cfg: DictConfig, folder: Path, overrides: Iterable[str] = ()) -> DictConfig:
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


def _plan_in(cfg: DictConfig, folder: Path) -> FinetunePlan:
    """The fine-tune plan of `cfg`, living in `folder` (a renamed tag folder still evaluates)."""
    plan = build_plan(cfg)
    if not isinstance(plan, FinetunePlan):
        raise SamoraError(f"{folder}/config.yaml is the config of a {plan.stage} stage, not of a fine-tune.")
    return replace(plan, folder=folder, tag=folder.name, data=plan.data.with_options(split_dir=folder / "splits"))


def evaluate_plan(cfg: DictConfig, overrides: Iterable[str] = ()) -> tuple[FinetunePlan, Path]:
    """(plan, weights) of `samora evaluate`: the finished fine-tune the command names, on its saved config with
    this command's settings on top, and its final model; with `eval.checkpoint`, that file as the model the
    command's own config describes."""
    if cfg.eval.checkpoint:
        plan = build_plan(cfg)
        assert isinstance(plan, FinetunePlan)  # cfg.stage is "evaluate": PLANS builds it with _finetune_plan
        return plan, Path(cfg.eval.checkpoint)
    folder = finished_folder(cfg, overrides)
    return _plan_in(evaluation_config(cfg, folder, overrides), folder), folder / FINAL_FILE


def predict_plan(cfg: DictConfig, overrides: Iterable[str] = (), needs_io: bool = True) -> PredictPlan:
    """`samora predict`: this command's settings, the model of the finished fine-tune it names (as saved);
    `needs_io=False` for commands that read no volumes (`samora bundle`)."""
    if needs_io and (not cfg.predict.input or not cfg.predict.output):
        raise SamoraError(
            "predict.input (IN) and predict.output (OUT) are both needed: a volume or folder of "
            "volumes, and the folder the predictions go to."
        )
    folder = finished_folder(cfg, overrides)
    return PredictPlan(
        folders=folders_of(cfg),
        seed=cfg.seed,
        overwrite=cfg.overwrite,
        config=resolved_dict(cfg),
        predict=cast(PredictConfig, OmegaConf.to_object(cfg.predict)),  # a structured PredictConfig node
        model=_plan_in(load_saved(folder / "config.yaml"), folder),
        weights=folder / FINAL_FILE,
        threads=cfg.threads,
        accelerator=cfg.trainer.accelerator,
        batch_size=cfg.eval.batch_size,
    )

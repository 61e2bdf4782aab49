"""Stages build one typed plan from the validated config: every shipped command, profile and ablation variant
plans; derived facts live in the plan; the plan decides which settings shape a stage's output; and no
function below the stage entry points takes the whole config."""

import inspect
import pkgutil
import re
from importlib import import_module
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

import data_modules
import samora_pl
from samora_pl.cli import main
from samora_pl.config.compose import compose, experiments_dir, to_yaml
from samora_pl.config.plans import PLANS, CptPlan, DistillPlan, FinetunePlan, build_plan
from samora_pl.suites.ablation import load_ablation
from tests.stage_runs import planned

PROFILES = sorted(p.stem for p in (experiments_dir() / "model").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (experiments_dir() / "data").glob("*.yaml"))
ABLATIONS = sorted(p.stem for p in (experiments_dir() / "ablations").glob("*.yaml"))
# public weights are paths in the config; `none` / from_scratch opt out where a profile requires them
NO_WEIGHTS = ["model.checkpoint=none", "cpt.simclr.from_scratch=true", "cpt.mae.from_scratch=true"]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("stage", sorted(PLANS))
def test_every_command_profile_and_dataset_builds_its_plan(stage, data, profile):
    plan = build_plan(compose(stage, [f"data.name={data}", f"profile={profile}", *NO_WEIGHTS]))
    assert plan.stage == ("finetune" if stage == "evaluate" else stage)
    assert plan.config["profile"] == profile and plan.folders.run == "default"


@pytest.mark.parametrize("name", ABLATIONS)
def test_every_ablation_variant_builds_its_plan(name):
    for variant, extra in load_ablation(name)["variants"].items():
        plan = planned("finetune", [*(extra or []), f"finetune.tag={name}-{variant}-s0"])
        assert isinstance(plan, FinetunePlan) and plan.folder.name == f"{name}-{variant}-s0"


def test_the_plan_holds_the_derived_facts():
    plan = planned("finetune", ["finetune.levels=[pixel,image]", "model.fusion=sum", "data.fraction=0.1"])
    assert plan.levels == ("image", "pixel") and plan.layout.experts == ("image", "pixel")
    assert plan.layout.fusion == "sum" and plan.tag == "samora-sum-image+pixel-f0.1"
    assert plan.folder == plan.folders.root / "finetune" / plan.tag
    assert plan.data.options["split_dir"] == plan.folder / "splits"
    samed = planned("finetune", ["mode=samed", "model.fusion=mole"])
    assert samed.layout.experts == ("samed",) and samed.mole_aux_weight == 0.0 and not samed.reads_experts
    assert samed.fusion_label == "none (mode=samed, one LoRA)"
    hub = planned("finetune", ["model.fusion=lorahub"])
    assert hub.uses_lorahub and hub.layout.fusion == "single:hub" and not hub.reads_experts


def test_each_stage_trains_for_its_own_epochs():
    """trainer.max_epochs is the fine-tune's; CPT's teachers and distillation have their own keys."""
    cpt = planned("cpt", ["cpt.simclr.max_epochs=3", "cpt.mae.max_epochs=4"])
    assert isinstance(cpt, CptPlan)
    assert cpt.trainer["simclr"].max_epochs == 3 and cpt.trainer["mae"].max_epochs == 4
    distill = planned("distill", ["distill.max_epochs=5"])
    assert isinstance(distill, DistillPlan) and distill.trainer.max_epochs == 5
    finetune = planned("finetune", ["trainer.max_epochs=6", "trainer.stop_epoch=2"])
    assert finetune.trainer.max_epochs == 2 and finetune.schedule_epochs == 6


@pytest.mark.parametrize("stage, instead", [("cpt", "cpt.simclr.max_epochs"), ("distill", "distill.max_epochs")])
def test_trainer_max_epochs_on_a_stage_that_ignores_it_is_refused(tmp_path, capsys, stage, instead):
    assert main([stage, f"runs_dir={tmp_path}", "trainer.max_epochs=3"]) == 1
    err = capsys.readouterr().err
    assert "trainer.max_epochs" in err and instead in err and not (tmp_path / "default").exists()


def _saved(tmp_path, stage, overrides=()):
    folder = tmp_path / stage
    folder.mkdir()
    (folder / "config.yaml").write_text(to_yaml(compose(stage, list(overrides))))
    return folder


@pytest.mark.parametrize(
    "stage, sub, override, changed",
    [
        ("cpt", "simclr", "cpt.simclr.max_epochs=7", []),  # more epochs continue the same teacher
        ("cpt", "simclr", "cpt.mae.mask_ratio=0.5", []),  # the other teacher's block
        ("cpt", "simclr", "seed=5", ["seed"]),
        ("distill", "pixel", "distill.level=pixel", []),
        ("distill", "pixel", "model.lora_rank=2", ["model.lora_rank"]),
        ("distill", "pixel", "cpt.simclr.jitter=0.1", []),  # views shape the image expert only
        ("distill", "image", "cpt.simclr.jitter=0.1", ["cpt.simclr.jitter"]),
        ("finetune", "t", "finetune.evaluate=false", []),
        ("finetune", "t", "trainer.max_epochs=9", []),
        ("finetune", "t", "optim.lr=0.1", ["optim.lr"]),
    ],
)
def test_only_the_settings_that_shape_the_output_count(tmp_path, stage, sub, override, changed):
    folder = _saved(tmp_path, stage)
    assert planned(stage, [override]).changed_in(folder, sub) == changed


def test_a_caller_can_watch_and_ignore_more(tmp_path):
    folder = _saved(tmp_path, "finetune")
    plan = planned("finetune", ["trainer.max_epochs=9"])
    assert plan.changed_in(folder, "t", watch=("trainer.max_epochs",)) == ["trainer.max_epochs"]
    assert not planned("finetune", ["data.cache=true"]).changed_in(folder, "t")
    image, patch = planned("distill").shaping_keys("image")[0], planned("distill").shaping_keys("patch")[0]
    assert image[: len(patch)] == patch


def test_a_samed_fine_tune_is_not_refused_for_fusion_settings_it_never_reads(tmp_path):
    folder = _saved(tmp_path, "finetune", ["mode=samed"])
    assert planned("finetune", ["mode=samed", "model.hl_init=zero", "model.fusion=sum"]).changed_in(folder, "t") == []
    assert planned("finetune", ["mode=samed", "optim.lr=0.1"]).changed_in(folder, "t") == ["optim.lr"]
    folder = _saved(tmp_path / "samora", "finetune") if (tmp_path / "samora").mkdir() is None else None
    assert planned("finetune", ["model.hl_init=zero"]).changed_in(folder, "t") == ["model.hl_init"]


def _functions(package):
    """Every function and method defined in `package`'s modules, with its qualified name."""
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.endswith(".__main__"):  # runs the CLI when imported
            continue
        module = import_module(info.name)
        for _, obj in inspect.getmembers(module):
            candidates = [obj] + (
                [m for _, m in inspect.getmembers(obj, inspect.isfunction)] if inspect.isclass(obj) else []
            )
            for fn in candidates:
                if inspect.isfunction(fn) and fn.__module__ == module.__name__:
                    yield f"{module.__name__}.{fn.__qualname__}", fn


# the configuration layer reads the config by definition; the CLI and the suites compose every stage first
ABOVE_THE_STAGES = ("samora_pl.config.", "samora_pl.cli.", "samora_pl.suites.")


def test_no_function_below_the_stage_entry_points_takes_the_whole_config():
    offenders = set()
    for package in (samora_pl, data_modules):
        for name, fn in _functions(package):
            if name.startswith(ABOVE_THE_STAGES):
                continue
            for param in inspect.signature(fn).parameters.values():
                annotation = str(param.annotation)
                if param.name in ("cfg", "config_node") or "DictConfig" in annotation or "RootConfig" in annotation:
                    offenders.add(f"{name}({param.name})")
    assert not offenders, sorted(offenders)


def test_the_data_layer_imports_no_configuration_code():
    for info in pkgutil.walk_packages(data_modules.__path__, "data_modules."):
        source = Path(import_module(info.name).__file__).read_text()
        assert not re.search(r"^\s*(from|import) samora_pl\.config", source, re.M), info.name


def test_a_plan_is_frozen():
    plan = planned("finetune")
    with pytest.raises(AttributeError):
        plan.tag = "other"  # type: ignore[misc]
    assert isinstance(OmegaConf.create(plan.config), DictConfig)

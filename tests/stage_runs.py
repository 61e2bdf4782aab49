"""Tests run a stage the way `samora <stage>` does: compose (validate), build the plan, run the stage on it."""

from samora_pl.config.compose import compose
from samora_pl.config.plans import build_plan

RUNNERS = {
    "cpt": "samora_pl.stages.cpt.run",
    "distill": "samora_pl.stages.distill.run",
    "finetune": "samora_pl.stages.finetune.run",
    "probe": "samora_pl.stages.probe",
    "check": "samora_pl.stages.check",
}


def planned(stage: str, overrides=()):
    """The plan `samora <stage> overrides...` would run."""
    return build_plan(compose(stage, list(overrides)))


def run_stage(cfg):
    """Run the stage of the composed config `cfg` on its plan; returns what the stage returns."""
    import importlib

    return importlib.import_module(RUNNERS[cfg.stage]).run(build_plan(cfg))

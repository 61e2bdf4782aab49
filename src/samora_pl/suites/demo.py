"""`samora demo`: the whole SAMora chain on the built-in demo data, CPU-sized.

cpt (both teachers) -> distill (image, patch, pixel) -> finetune (HL-Attn, 10% of the slices) ->
evaluation. The three stages' plans are built first, so a bad value for any stage stops the demo before the
teachers train. Each stage that already finished in this run is reused (its manifest says so), so a second
`make demo` only redoes what is missing; `overwrite=true` redoes everything.
"""

import logging
from pathlib import Path

from samora_pl.config.compose import compose
from samora_pl.config.plans import CptPlan, DistillPlan, FinetunePlan, build_plan
from samora_pl.records.manifest import read_manifest

log = logging.getLogger(__name__)
DEMO_DEFAULTS = ["data.name=demo", "data.fraction=0.1"]


def _done(overwrite: bool, folders: list[Path]) -> bool:
    if overwrite:
        return False
    return all((read_manifest(folder) or {}).get("status") == "complete" for folder in folders)


def run_demo(overrides) -> dict:
    overrides = DEMO_DEFAULTS + list(overrides)
    from samora_pl.stages.cpt import run as cpt
    from samora_pl.stages.distill import run as distill
    from samora_pl.stages.finetune import run as finetune

    teachers = build_plan(compose("cpt", overrides))
    experts = build_plan(compose("distill", overrides + ["distill.level=all"]))
    model = build_plan(compose("finetune", overrides))
    assert isinstance(teachers, CptPlan) and isinstance(experts, DistillPlan) and isinstance(model, FinetunePlan)

    if _done(teachers.overwrite, [teachers.folder(kind) for kind in teachers.teachers]):
        log.info("demo: reusing the finished teachers in %s", teachers.folders.stage("cpt"))
    else:
        cpt.run(teachers)
    if _done(experts.overwrite, [experts.folder(level) for level in experts.levels]):
        log.info("demo: reusing the finished experts in %s", experts.folders.stage("distill"))
    else:
        distill.run(experts)
    if _done(model.overwrite, [model.folder]):
        log.info("demo: fine-tuning already finished in %s; results.md there (overwrite=true to redo)", model.folder)
        print((model.folder / "results.md").read_text())
        return read_manifest(model.folder)["metrics"]
    return finetune.run(model)

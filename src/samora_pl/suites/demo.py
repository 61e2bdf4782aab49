"""`samora demo`: the whole SAMora chain on the built-in demo data, CPU-sized.

cpt (both teachers) -> distill (image, patch, pixel) -> finetune (HL-Attn, 10% of the slices) ->
evaluation. Each stage that already finished in this run is reused (its manifest says so), so a second
`make demo` only redoes what is missing; `overwrite=true` redoes everything.
"""

import logging

from samora_pl.config.compose import compose
from samora_pl.runs.manifest import read_manifest, stage_dir

log = logging.getLogger(__name__)
DEMO_DEFAULTS = ["data.name=demo", "data.fraction=0.1"]


def _done(cfg, stage: str, subs) -> bool:
    if cfg.overwrite:
        return False
    return all((read_manifest(stage_dir(cfg, stage, sub)) or {}).get("status") == "complete" for sub in subs)


def run_demo(overrides) -> dict:
    overrides = DEMO_DEFAULTS + list(overrides)
    from samora_pl.stages.cpt import run as cpt
    from samora_pl.stages.distill import run as distill
    from samora_pl.stages.finetune import run as finetune

    cfg = compose("cpt", overrides)
    if _done(cfg, "cpt", ("simclr", "mae")):
        log.info("demo: reusing the finished teachers in %s", stage_dir(cfg, "cpt", ""))
    else:
        cpt.run(cfg)

    cfg = compose("distill", overrides + ["distill.level=all"])
    if _done(cfg, "distill", ("image", "patch", "pixel")):
        log.info("demo: reusing the finished experts in %s", stage_dir(cfg, "distill", ""))
    else:
        distill.run(cfg)

    cfg = compose("finetune", overrides)
    folder = stage_dir(cfg, "finetune", finetune.tag_of(cfg))
    if _done(cfg, "finetune", (folder.name,)):
        log.info("demo: fine-tuning already finished in %s; results.md there (overwrite=true to redo)", folder)
        print((folder / "results.md").read_text())
        return read_manifest(folder)["metrics"]
    return finetune.run(cfg)

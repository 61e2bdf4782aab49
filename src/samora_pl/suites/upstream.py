"""Stage-1 outputs (teachers, experts) of ablation variants: found or made once, shared by a settings hash.

A variant's fine-tune loads the experts it fuses (`finetune.levels`, default all three; none for
`mode=samed` or `finetune.zero_experts`, nor for a level whose `finetune.experts.<level>` is given), and the
image and patch experts need their CPT teacher (SimCLR, MAE) unless `distill.teacher` is given. Each of
these outputs is keyed by a sha256 of the resolved values of the keys its stage already watches to refuse
changed settings (the plans' `shaping_keys`, a teacher's max_epochs included), an expert's teacher named by the
teacher's key instead of a path. So:

- a key equal to the plain run's (the command line without the variant's overrides) is the run's own
  `runs/<run>/cpt/<teacher>` or `runs/<run>/distill/<level>`, exactly what `make cpt` / `make distill` make;
- any other key is `runs/<run>/upstream/<key8>/<stage>/<sub>`: a run of its own (config, manifest,
  checkpoints, TensorBoard) inside the run folder, shared by every variant, seed and ablation of the run
  with that key. The stages still check their folder's saved config, so even a clash of 8 hex digits could
  not mix two settings silently.

An output whose manifest says complete is used as is when its saved config agrees on those keys (else an
error names them; `overwrite=true` re-runs an ablation's fine-tunes,
not these; redo one with `make cpt` / `make distill ... overwrite=true`); a missing or interrupted one is
made by the stage's own `run`, which resumes from its `last.ckpt`. Upstream stages use the command line's
seed, not the fine-tuning seed: over an ablation's seeds only stage 2 varies, and the seeds share experts.
"""

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from samora_pl.config.compose import compose
from samora_pl.config.plans import (
    EXPERT_FILE,
    TEACHER_FILE,
    TEACHER_OF_LEVEL,
    CptPlan,
    DistillPlan,
    FinetunePlan,
    StagePlan,
    build_plan,
)
from samora_pl.errors import SamoraError
from samora_pl.records.manifest import read_manifest
from samora_pl.stages.cpt import run as cpt
from samora_pl.stages.distill import run as distill

log = logging.getLogger(__name__)
FOLDER = "upstream"
OUTPUT = {"cpt": TEACHER_FILE, "distill": EXPERT_FILE}
KEEP = ["overwrite=false"]  # a finished output is never redone here; an interrupted one resumes


def arg(key: str, value) -> str:
    """`key="value"`: quoted, so a hash such as 01234567 or a path stays a string."""
    return f"{key}={json.dumps(str(value))}"


def needed_levels(plan: FinetunePlan) -> tuple:
    """The experts a fine-tune reads from stage 1 (given paths excluded)."""
    if plan.mode == "samed" or plan.zero_experts:
        return ()
    return tuple(lv for lv in plan.levels if not plan.experts_given[lv])


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def teacher_key(plan: CptPlan, kind: str) -> str:
    """What shapes the `kind` teacher, from a `cpt` plan (its max_epochs included)."""
    return _key({"stage": "cpt", "sub": kind, **plan.values(plan.shaping_keys(kind)[0])})


def teacher_id(plans: dict[str, StagePlan], level: str) -> str | None:
    """The `level` expert's teacher as its key names it: none (pixel), the given file, or the teacher's key."""
    kind = TEACHER_OF_LEVEL[level]
    if kind is None:
        return None
    distill_plan = plans["distill"]
    assert isinstance(distill_plan, DistillPlan)
    if distill_plan.teacher_given:
        return str(distill_plan.teacher_files[level])
    return teacher_key(plans["cpt"], kind)


def expert_key(plans: dict[str, StagePlan], level: str) -> str:
    """What shapes the `level` expert, from a `distill` plan and its teacher."""
    plan = plans["distill"]
    shaping = plan.values(plan.shaping_keys(level)[0], ignore=("distill.level", "distill.teacher"))
    return _key({"stage": "distill", "sub": level, "teacher": teacher_id(plans, level), **shaping})


def _finished(folder: Path, stage: str, sub: str, plan: StagePlan) -> bool:
    """True (and logged) when `folder` holds a complete output of `stage` made with the settings of `plan`;
    a complete one made with other settings (the run's own, made with other ARGS) is an error naming them."""
    manifest = read_manifest(folder) or {}
    if manifest.get("status") == "complete" and (folder / OUTPUT[stage]).exists():
        # an expert's teacher is named in its key and checked by sha256 when the stage runs
        changed = plan.changed_in(folder, sub, ignore=("distill.teacher",) if stage == "distill" else ())
        if changed:
            raise SamoraError(
                f"{folder} holds a {stage} output ({sub}) made with other settings than this ablation's "
                f"({', '.join(changed[:8])}): run the ablation with the ARGS that made it, or redo it with "
                f"`make {stage} ... overwrite=true`."
            )
        log.info("ablation: reusing the finished %s %s in %s", stage, sub, folder)
        return True
    return False


class Upstream:
    """The stage-1 outputs of one run's ablation variants, relative to the plain run (`overrides`)."""

    def __init__(self, overrides: Sequence[str]):
        self.overrides = list(overrides)
        self.plain = {stage: build_plan(compose(stage, self.overrides + KEEP)) for stage in OUTPUT}
        self.root = self.plain["cpt"].folders.root / FOLDER
        self.index = self.plain["cpt"].pool.index_path  # one pool index for the run and its upstream runs

    def expert_overrides(self, extra: Sequence[str], plan: FinetunePlan) -> list[str]:
        """`finetune.experts.<level>=...` for the fine-tune `plan` of a variant with overrides `extra`,
        making its experts first where missing; none for experts that are the run's own."""
        levels = needed_levels(plan)
        if not levels:
            return []
        plans = {stage: build_plan(compose(stage, self.overrides + list(extra) + KEEP)) for stage in OUTPUT}
        paths = {level: self._expert(level, plans, list(extra)) for level in levels}
        return [arg(f"finetune.experts.{level}", path) for level, path in paths.items() if path is not None]

    def _expert(self, level: str, plans: dict[str, StagePlan], extra: list[str]) -> Path | None:
        """The variant's `level` expert file, or None when it is the run's own; made first if missing
        (its teacher too, but only then: a finished expert never needs its teacher again)."""
        key = expert_key(plans, level)
        plain = key == expert_key(self.plain, level)
        stage_args = [f"distill.level={level}"]
        folder = self._folder("distill", level, key, plain)
        kind = TEACHER_OF_LEVEL[level] if not plans["distill"].teacher_given else None
        if not _finished(folder, "distill", level, self._plan("distill", key, plain, extra, stage_args)):
            if kind:
                teacher = self._teacher(kind, plans["cpt"], extra)
                if not plain:  # the run's own experts find the run's own teachers by themselves
                    stage_args.append(arg("distill.teacher", teacher))
            log.info("ablation: making the distill %s in %s", level, folder)
            distill.run(self._plan("distill", key, plain, extra, stage_args))
        elif kind:  # a finished expert needs no teacher, but one still there must agree with the settings
            self._teacher(kind, plans["cpt"], extra, make=False)
        return None if plain else folder / EXPERT_FILE

    def _teacher(self, kind: str, plan: CptPlan, extra: list[str], make: bool = True) -> Path:
        """The variant's `kind` teacher file (from its `cpt` plan), made first if missing and `make`."""
        key = teacher_key(plan, kind)
        plain = key == teacher_key(self.plain["cpt"], kind)
        folder = self._folder("cpt", kind, key, plain)
        plan = self._plan("cpt", key, plain, extra, [f"cpt.teacher={kind}"])
        if not _finished(folder, "cpt", kind, plan) and make:
            log.info("ablation: making the cpt %s in %s", kind, folder)
            cpt.run(plan)
        return folder / TEACHER_FILE

    def _folder(self, stage: str, sub: str, key: str, plain: bool) -> Path:
        """Where one output lives: the run's own stage folder, or `upstream/<key8>/<stage>/<sub>`."""
        return self.plain[stage].folders.stage(stage, sub) if plain else self.root / key[:8] / stage / sub

    def _plan(self, stage: str, key: str, plain: bool, extra: list[str], stage_args: list[str]) -> StagePlan:
        """The plan that makes one output: the plain run's own, or the variant's in `upstream/<key8>`."""
        if plain:
            return build_plan(compose(stage, self.overrides + stage_args + KEEP))
        where = [arg("runs_dir", self.root), arg("run", key[:8]), arg("cpt.index_cache", self.index)]
        return build_plan(compose(stage, self.overrides + extra + stage_args + where + KEEP))

"""The one place for the settings that decide whether a stage folder's work may be reused.

A finished stage is used as is, and an interrupted one continued, only when the settings that shape its
output match the ones its `config.yaml` was saved with; otherwise the stage refuses with the keys that
differ. Ablations key the upstream outputs they share by a hash of the same settings
(`suites/upstream.py`). Keys are dotted prefixes: `distill.` watches every distill key.
"""

from pathlib import Path
from typing import Iterable, Tuple

from omegaconf import DictConfig

from samora_pl.config.compose import changed_since

# what a CPT teacher learns from, besides its own `cpt.<teacher>` block; data.list_dir / data.split_seed
# choose the test cases the pool leaves out
CPT_KEYS = (
    "seed",
    "data.name",
    "data.dir",
    "data.list_dir",
    "data.split_seed",
    "cpt.sources",
    "cpt.skip_bad_files",
    "cpt.include_test_cases",
)
# what changes an expert; the image level also sees CPT's SimCLR views (distill.simclr_view_settings)
DISTILL_KEYS = (
    "model.family",
    "model.variant",
    "model.img_size",
    "model.checkpoint",
    "model.init_seed",
    "model.lora_rank",
    "distill.",
    "cpt.sources",
    "cpt.include_test_cases",
    "data.name",
    "data.dir",
    "data.list_dir",
    "data.split_seed",
    "seed",
)
SIMCLR_VIEW_KEYS = ("crop_scale", "rotation_deg", "jitter", "blur_prob", "noise_std")
# what a fine-tune makes; data.cache, under data., does not change it (same slices, same augmentation)
FINETUNE_KEYS = ("model.", "data.", "optim.", "loss.", "mode", "seed", "finetune.")


def watched(stage: str, sub: str) -> Tuple[tuple, tuple]:
    """(keys that shape `stage`'s output `sub`, keys among them that do not): more CPT epochs continue the
    same teacher; the distill level and a fine-tune's evaluation or cache change nothing it makes."""
    if stage == "cpt":
        return CPT_KEYS + (f"cpt.{sub}",), (f"cpt.{sub}.max_epochs",)
    if stage == "distill":
        views = tuple(f"cpt.simclr.{key}" for key in SIMCLR_VIEW_KEYS) if sub == "image" else ()
        return DISTILL_KEYS + views, ("distill.level",)
    if stage == "finetune":
        return FINETUNE_KEYS, ("finetune.evaluate", "data.cache")
    raise ValueError(f"no reuse rule for stage {stage!r}")


def changed_settings(
    stage: str, sub: str, cfg: DictConfig, folder: Path, also_watch: Iterable[str] = (), also_ignore: Iterable[str] = ()
) -> list:
    """Keys that shape `stage`'s `sub` (plus `also_watch`, less `also_ignore`) whose values differ from the
    config `folder` was made with; empty when the folder may be reused (or has no saved config yet)."""
    keys, ignore = watched(stage, sub)
    return changed_since(Path(folder) / "config.yaml", cfg, keys + tuple(also_watch), ignore + tuple(also_ignore))

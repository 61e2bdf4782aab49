"""`samora ablation --name NAME`: run an ablation's fine-tuning variants and write one table.

An ablation file `experiments/ablations/<name>.yaml` lists named variants, each a list of `key=value`
overrides applied on top of the command line's; every variant is a stage-2 fine-tune with the same seed
and budget, tagged `<name>-<variant>` in the run. A variant whose fine-tune already finished is read back,
not re-run, so an interrupted ablation continues where it stopped. The stage-1 outputs (teachers and
experts) are those of the run, shared by every variant.
"""

import csv
import io
import logging
from pathlib import Path

from omegaconf import OmegaConf

from samora_pl.config import compose, experiments_dir
from samora_pl.errors import SamoraError
from samora_pl.runs import atomic_write_text, is_rank_zero, read_manifest, run_dir, stage_dir

log = logging.getLogger(__name__)


def load_ablation(name: str) -> dict:
    folder = experiments_dir() / "ablations"
    path = folder / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise SamoraError(f"Unknown ablation '{name}' (NAME); known: {known}.")
    spec = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(spec.get("variants"), dict) or not spec["variants"]:
        raise SamoraError(f"{path} must have a non-empty 'variants' mapping of name -> list of key=value.")
    return spec


def run_ablation(name: str, overrides) -> list:
    """Fine-tune every variant (reusing finished ones) and write table.md / table.csv; returns the rows."""
    from samora_pl.stages import finetune

    spec = load_ablation(name)
    rows = []
    for variant, extra in spec["variants"].items():
        cfg = compose("finetune", list(overrides) + list(extra or []) + [f"finetune.tag={name}-{variant}"])
        manifest = read_manifest(stage_dir(cfg, "finetune", cfg.finetune.tag)) or {}
        if manifest.get("status") == "complete" and not cfg.overwrite:
            log.info("ablation %s: reusing finished variant %s", name, variant)
            metrics = manifest["metrics"]
        else:
            log.info("ablation %s: running variant %s (%s)", name, variant, " ".join(extra or []) or "base")
            metrics = finetune.run(cfg)
        rows.append({"variant": variant, "overrides": " ".join(extra or []), **_means(metrics)})
    if is_rank_zero():
        write_table(rows, run_dir(cfg) / "ablations" / name, spec.get("description", name))
    return rows


def _means(metrics: dict) -> dict:
    return {"mean_dice": metrics.get("mean_dice"), "mean_hd95": metrics.get("mean_hd95")}


def write_table(rows: list, folder: Path, description: str) -> None:
    lines = [f"# {description}", "", "| variant | overrides | Mean Dice (%) | Mean HD95 |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['variant']} | `{row['overrides'] or '-'}` | {100 * row['mean_dice']:.2f} | {row['mean_hd95']:.2f} |"
        )
    atomic_write_text(folder / "table.md", "\n".join(lines) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["variant", "overrides", "mean_dice", "mean_hd95"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "table.csv", buffer.getvalue())
    print("\n".join(lines))

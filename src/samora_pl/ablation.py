"""`samora ablation NAME [seeds=N] ...`: run an ablation's variants and write one table.

An ablation file `experiments/ablations/<name>.yaml` lists named variants, each a list of `key=value`
overrides applied on top of the command line's; every variant is a stage-2 fine-tune with the same budget,
run once per seed (`seeds=N` runs seeds S..S+N-1, S being the command line's `seed`, default 0) and tagged
`<name>-<variant>-s<seed>` in the run. A fine-tune that already finished is read back, not re-run, so an
interrupted ablation continues where it stopped and raising `seeds` only runs the new seeds. The stage-1
outputs a variant needs (teachers and experts) are the run's own unless its overrides change them (rank,
CPT, distillation settings); those are made once per distinct setting under `runs/<run>/upstream/` and
shared (see `ablation_upstream.py`).

Outputs in `runs/<run>/ablations/<name>/`: `table.md` and `table.csv` (mean and sample standard deviation
over seeds of Mean Dice and HD95, and the mean Dice of every class), `table.png` (mean Dice per variant
with std error bars); the table also goes to TensorBoard's text tab under `runs/<run>/tb/ablations/<name>`.
"""

import csv
import io
import json
import logging
import math
from pathlib import Path

from omegaconf import OmegaConf

from samora_pl.config import changed_since, compose, experiments_dir
from samora_pl.errors import SamoraError
from samora_pl.runs import atomic_path, atomic_write_text, is_rank_zero, read_manifest, run_dir, stage_dir, tb_root

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


def run_ablation(name: str, overrides, seeds: int = 1) -> list:
    """Fine-tune every variant for every seed (reusing finished ones), write the table; returns the rows."""
    from samora_pl.ablation_upstream import Upstream
    from samora_pl.stages import finetune

    if int(seeds) < 1:
        raise SamoraError(f"seeds={seeds}: the number of seeds per variant must be at least 1.")
    spec = load_ablation(name)
    first = int(compose("finetune", list(overrides)).seed)
    upstream = Upstream(overrides)
    rows = []
    for variant, extra in spec["variants"].items():
        extra = list(extra or [])
        runs = []
        experts = None  # the variant's finetune.experts.* overrides, found on its first unfinished seed
        for seed in range(first, first + int(seeds)):
            tag = f"{name}-{variant}-s{seed}"
            own = [f"seed={seed}", f"finetune.tag={tag}"]
            cfg = compose("finetune", list(overrides) + extra + own)
            folder = stage_dir(cfg, "finetune", tag)
            manifest = read_manifest(folder) or {}
            if manifest.get("status") == "complete" and not cfg.overwrite:
                _check_reuse(cfg, folder)
                log.info("ablation %s: reusing finished %s", name, tag)
                metrics = manifest["metrics"]
            else:
                if experts is None:
                    experts = upstream.expert_overrides(extra, cfg)
                if experts:
                    cfg = compose("finetune", list(overrides) + extra + experts + own)
                log.info("ablation %s: running %s (%s)", name, tag, " ".join(extra) or "base")
                metrics = finetune.run(cfg)
            runs.append({**metrics, "per_class": _per_class(folder)})
        rows.append({"variant": variant, "overrides": " ".join(extra), **summarise_seeds(runs)})
    if is_rank_zero():
        write_table(rows, run_dir(cfg) / "ablations" / name, spec.get("description", name))
        write_tensorboard(rows, tb_root(cfg) / "ablations" / name, name, spec.get("description", name))
    return rows


def _check_reuse(cfg, folder: Path) -> None:
    """A finished fine-tune is reused by its tag only if it was made with the same settings (the experts it
    read are keyed by their own settings, and the cache changes nothing); else an error names them."""
    from samora_pl.stages.finetune import RESULT_KEYS

    ignore = ("finetune.evaluate", "finetune.experts.", "data.cache")
    changed = changed_since(folder / "config.yaml", cfg, RESULT_KEYS + ("trainer.max_epochs",), ignore=ignore)
    if changed:
        raise SamoraError(
            f"{folder} holds a finished fine-tune of this ablation made with other settings "
            f"({', '.join(changed[:8])}): run the ablation with the ARGS that made it, add overwrite=true to "
            "redo its fine-tunes, or use another RUN."
        )


def _per_class(folder: Path) -> dict:
    """{class name: Dice} from a fine-tune's metrics.json, or {} when it has none (evaluation off)."""
    path = folder / "metrics.json"
    if not path.exists():
        return {}
    per_class = json.loads(path.read_text()).get("per_class") or {}
    return {cls: entry["dice"] for cls, entry in per_class.items() if entry.get("dice") is not None}


def _mean_std(values: list) -> tuple:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None  # a sample std needs two seeds; shown as "-", not as a misleading 0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise_seeds(runs: list) -> dict:
    """Mean and sample std (None for one seed) of Mean Dice / HD95 over seeds, and each class's mean Dice."""
    dice, dice_std = _mean_std([r.get("mean_dice") for r in runs])
    hd95, hd95_std = _mean_std([r.get("mean_hd95") for r in runs])
    classes = []
    for run in runs:
        classes += [c for c in run["per_class"] if c not in classes]
    per_class = {c: _mean_std([r["per_class"].get(c) for r in runs])[0] for c in classes}
    return {
        "seeds": len(runs),
        "mean_dice": dice,
        "mean_dice_std": dice_std,
        "mean_hd95": hd95,
        "mean_hd95_std": hd95_std,
        "per_class": per_class,
    }


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(rows: list, description: str) -> str:
    classes = []
    for row in rows:
        classes += [c for c in row["per_class"] if c not in classes]
    head = ["variant", "overrides", "seeds", "Mean Dice (%)", "± std", "Mean HD95", "± std"] + classes
    lines = [f"# {description}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["variant"],
            f"`{row['overrides'] or '-'}`",
            str(row["seeds"]),
            _pct(row["mean_dice"]),
            _pct(row["mean_dice_std"]),
            _num(row["mean_hd95"]),
            _num(row["mean_hd95_std"]),
        ]
        cells += [_pct(row["per_class"].get(c)) for c in classes]
        lines.append("| " + " | ".join(cells) + " |")
    if classes:
        lines += ["", "Per-class columns: mean Dice (%) over seeds. std: sample standard deviation over seeds."]
    return "\n".join(lines) + "\n"


def write_table(rows: list, folder: Path, description: str) -> None:
    text = markdown_table(rows, description)
    atomic_write_text(folder / "table.md", text)
    classes = []
    for row in rows:
        classes += [c for c in row["per_class"] if c not in classes]
    fields = ["variant", "overrides", "seeds", "mean_dice", "mean_dice_std", "mean_hd95", "mean_hd95_std"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields + [f"dice_{c}" for c in classes])
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: row[k] for k in fields}, **{f"dice_{c}": row["per_class"].get(c) for c in classes}})
    atomic_write_text(folder / "table.csv", buffer.getvalue())
    write_plot(rows, folder / "table.png", description)
    print(text)


def write_plot(rows: list, path: Path, description: str) -> None:
    """Bar plot of mean Dice (%) per variant with std error bars (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["variant"] for row in rows]
    means = [100 * (row["mean_dice"] or 0.0) for row in rows]
    errors = [100 * (row["mean_dice_std"] or 0.0) for row in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.5))
    ax.bar(range(len(rows)), means, yerr=errors, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("Mean Dice (%)")
    seeds = sorted({row["seeds"] for row in rows})
    ax.set_title(f"{description}\n(error bars: std over {'/'.join(map(str, seeds))} seed(s))", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_tensorboard(rows: list, folder: Path, name: str, description: str) -> None:
    """The markdown table in TensorBoard's text tab (tag `ablation/<name>`)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        writer.add_text(f"ablation/{name}", markdown_table(rows, description))
    finally:
        writer.close()

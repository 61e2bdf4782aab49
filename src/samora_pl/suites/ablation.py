"""`samora ablation NAME [seeds=N] ...`: run an ablation's variants and write one table.

An ablation file `experiments/ablations/<name>.yaml` lists named variants, each a list of `key=value`
overrides applied on top of the command line's; every variant is a stage-2 fine-tune with the same budget,
run once per seed (`seeds=N` runs seeds S..S+N-1, S being the command line's `seed`, default 0) and tagged
`<name>-<variant>-s<seed>` in the run. A fine-tune that already finished is read back, not re-run, so an
interrupted ablation continues where it stopped and raising `seeds` only runs the new seeds. The stage-1
outputs a variant needs (teachers and experts) are the run's own unless its overrides change them (rank,
CPT, distillation settings); those are made once per distinct setting under `runs/<run>/upstream/` and
shared (see `suites/upstream.py`).

Outputs in `runs/<run>/ablations/<name>/`: `table.md` and `table.csv` (each variant's fusion, HL-Attn's with
its `model.hl_init`; mean and sample standard deviation over seeds of Mean Dice and HD95, the mean Dice of
every class and, with two seeds or more, the comparison with the reference variant below; and how the
labelled subset was chosen: redrawn per seed, or fixed by `data.subset_seed` or a list file, so that seeds
vary the training only), `table.png` (mean Dice per variant with 95 % confidence intervals of the mean over
seeds); the table also goes to TensorBoard's text tab under `runs/<run>/tb/ablations/<name>`.

How sure a table is: each variant is compared with the ablation's reference variant (`reference:` in the
ablation file, else the variant named `hl_attn`), paired by seed, since a seed fixes the data fraction,
order and initialisation that both share. With the per-seed differences d_s = Dice(variant, s) - Dice(ref, s)
over n seeds: `delta_vs_ref` = mean(d), the 95 % interval is mean(d) -/+ t(0.975, n-1) * sd(d) / sqrt(n)
(Student t, `scipy.stats.t`), and `p_value` is the two-sided paired t-test (`scipy.stats.ttest_rel`).
"""

import csv
import io
import json
import logging
import math
import textwrap
from pathlib import Path

from omegaconf import OmegaConf

from samora_pl.config.compose import compose, experiments_dir
from samora_pl.config.plans import FinetunePlan, build_plan
from samora_pl.errors import SamoraError
from samora_pl.records.atomic import atomic_path, atomic_write_text
from samora_pl.records.manifest import is_rank_zero, read_manifest

log = logging.getLogger(__name__)
DEFAULT_REFERENCE = "hl_attn"  # the variant compared against when an ablation file names no `reference`
PAIRED_TEST = "two-sided paired t-test over seeds (scipy.stats.ttest_rel)"


def load_ablation(name: str) -> dict:
    folder = experiments_dir() / "ablations"
    path = folder / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise SamoraError(f"Unknown ablation '{name}' (NAME); known: {known}.")
    spec = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(spec.get("variants"), dict) or not spec["variants"]:
        raise SamoraError(f"{path} must have a non-empty 'variants' mapping of name -> list of key=value.")
    reference = spec.get("reference", DEFAULT_REFERENCE if DEFAULT_REFERENCE in spec["variants"] else None)
    if reference not in spec["variants"]:
        raise SamoraError(
            f"{path}: 'reference' is {reference!r}; name the variant the others are compared with, one of "
            f"{', '.join(spec['variants'])} (e.g. reference: {next(iter(spec['variants']))})."
        )
    spec["reference"] = reference
    return spec


def run_ablation(name: str, overrides, seeds: int = 1) -> list:
    """Fine-tune every variant for every seed (reusing finished ones), write the table; returns the rows.

    Every variant's plan for every seed is built first, so a bad value anywhere stops the ablation before
    any training."""
    from samora_pl.stages.finetune import run as finetune
    from samora_pl.suites.upstream import Upstream

    if int(seeds) < 1:
        raise SamoraError(f"seeds={seeds}: the number of seeds per variant must be at least 1.")
    spec = load_ablation(name)
    first = int(compose("finetune", list(overrides)).seed)
    planned = {
        variant: [
            (seed, list(extra or []), _variant_plan(name, variant, overrides, extra, seed))
            for seed in range(first, first + int(seeds))
        ]
        for variant, extra in spec["variants"].items()
    }
    upstream = Upstream(overrides)
    rows = []
    for variant, seeded in planned.items():
        runs = []
        experts = None  # the variant's finetune.experts.* overrides, found on its first unfinished seed
        for seed, extra, plan in seeded:
            manifest = read_manifest(plan.folder) or {}
            if manifest.get("status") == "complete" and not plan.overwrite:
                _check_reuse(plan)
                log.info("ablation %s: reusing finished %s", name, plan.tag)
                metrics = manifest["metrics"]
            else:
                if experts is None:
                    experts = upstream.expert_overrides(extra, plan)
                if experts:
                    plan = _variant_plan(name, variant, overrides, extra + experts, seed)
                log.info("ablation %s: running %s (%s)", name, plan.tag, " ".join(extra) or "base")
                metrics = finetune.run(plan)
            runs.append({**metrics, "per_class": _per_class(plan.folder), "seed": seed})
        rows.append(
            {
                "variant": variant,
                "overrides": " ".join(extra),
                "fusion": plan.fusion_label,
                "subset": plan.subset_policy,  # the variant's (its last seed's; seeds share the policy)
                **summarise_seeds(runs),
            }
        )
    compare_to_reference(rows, spec["reference"])
    if is_rank_zero():
        write_table(rows, plan.folders.root / "ablations" / name, spec.get("description", name))
        write_tensorboard(rows, plan.folders.tb / "ablations" / name, name, spec.get("description", name))
    return rows


def _variant_plan(name: str, variant: str, overrides, extra, seed: int) -> FinetunePlan:
    """The fine-tune of `variant` at `seed`, tagged `<name>-<variant>-s<seed>` (composed, so validated)."""
    own = [f"seed={seed}", f"finetune.tag={name}-{variant}-s{seed}"]
    plan = build_plan(compose("finetune", list(overrides) + list(extra or []) + own))
    assert isinstance(plan, FinetunePlan)
    return plan


def _check_reuse(plan: FinetunePlan) -> None:
    """A finished fine-tune is reused by its tag only if it was made with the same settings (the experts it
    read are keyed by their own settings, and the cache changes nothing); else an error names them."""
    changed = plan.changed_in(
        plan.folder,
        plan.tag,
        watch=("trainer.max_epochs", "trainer.stop_epoch"),
        ignore=("finetune.experts.",),
    )
    if changed:
        raise SamoraError(
            f"{plan.folder} holds a finished fine-tune of this ablation made with other settings "
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


def t_interval(values: list, level: float = 0.95) -> tuple:
    """(low, high) Student-t confidence interval of the mean of `values`; (None, None) below two values."""
    from scipy import stats

    values = [float(v) for v in values if v is not None]
    mean, std = _mean_std(values)
    if std is None:
        return None, None
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean - half, mean + half


def summarise_seeds(runs: list) -> dict:
    """Mean and sample std (None for one seed) of Mean Dice / HD95 over seeds, the 95 % t interval of the
    mean Dice, each class's mean Dice, and the Dice of each seed (for the paired comparison)."""
    dice, dice_std = _mean_std([r.get("mean_dice") for r in runs])
    dice_low, dice_high = t_interval([r.get("mean_dice") for r in runs])
    hd95, hd95_std = _mean_std([r.get("mean_hd95") for r in runs])
    classes = []
    for run in runs:
        classes += [c for c in run["per_class"] if c not in classes]
    per_class = {c: _mean_std([r["per_class"].get(c) for r in runs])[0] for c in classes}
    return {
        "seeds": len(runs),
        "mean_dice": dice,
        "mean_dice_std": dice_std,
        "mean_dice_ci95_low": dice_low,
        "mean_dice_ci95_high": dice_high,
        "mean_hd95": hd95,
        "mean_hd95_std": hd95_std,
        "per_class": per_class,
        "dice_by_seed": {r["seed"]: r.get("mean_dice") for r in runs if "seed" in r},
    }


COMPARISON = ("delta_vs_ref", "delta_ci95_low", "delta_ci95_high", "p_value")


def paired_comparison(values: list, reference: list) -> dict:
    """`variant - reference` over paired seeds: mean difference, its 95 % t interval, paired t-test p-value.

    Fewer than two pairs give None for everything but the difference; differences without spread (the
    reference against itself, or a constant offset) give an interval of zero width and no p-value (the test
    is undefined there)."""
    from scipy import stats

    diffs = [float(v) - float(r) for v, r in zip(values, reference)]
    if not diffs:
        return dict.fromkeys(COMPARISON)
    low, high = t_interval(diffs)
    p_value = None
    if len(diffs) >= 2 and _mean_std(diffs)[1] > 1e-12:  # below: rounding noise of equal differences
        p_value = float(stats.ttest_rel(values, reference).pvalue)
    return {"delta_vs_ref": sum(diffs) / len(diffs), "delta_ci95_low": low, "delta_ci95_high": high, "p_value": p_value}


def compare_to_reference(rows: list, reference: str) -> None:
    """Add the COMPARISON columns to every row (in place), pairing each variant's seeds with `reference`'s.

    Only seeds where both have a Mean Dice pair up; with one seed the columns stay empty."""
    ref = next(row for row in rows if row["variant"] == reference)
    for row in rows:
        row["reference"] = reference
        seeds = [s for s, v in row["dice_by_seed"].items() if v is not None and ref["dice_by_seed"].get(s) is not None]
        if len(seeds) < 2:
            row.update(dict.fromkeys(COMPARISON))
            continue
        row.update(paired_comparison([row["dice_by_seed"][s] for s in seeds], [ref["dice_by_seed"][s] for s in seeds]))


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _signed_pct(value) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def _p(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def markdown_table(rows: list, description: str) -> str:
    classes = []
    for row in rows:
        classes += [c for c in row["per_class"] if c not in classes]
    subsets = list(dict.fromkeys(row.get("subset") or "-" for row in rows))
    head = ["variant", "overrides", "fusion", "seeds", "Mean Dice (%)", "± std", "95% CI", "Mean HD95", "± std"]
    head += ["Δ vs ref (pp)", "Δ 95% CI", "p"] + (["labelled subset"] if len(subsets) > 1 else []) + classes
    lines = [f"# {description}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["variant"],
            f"`{row['overrides'] or '-'}`",
            row.get("fusion") or "-",
            str(row["seeds"]),
            _pct(row["mean_dice"]),
            _pct(row["mean_dice_std"]),
            _interval(row.get("mean_dice_ci95_low"), row.get("mean_dice_ci95_high"), _pct),
            _num(row["mean_hd95"]),
            _num(row["mean_hd95_std"]),
            _signed_pct(row.get("delta_vs_ref")),
            _interval(row.get("delta_ci95_low"), row.get("delta_ci95_high"), _signed_pct),
            _p(row.get("p_value")),
        ]
        cells += [row.get("subset") or "-"] if len(subsets) > 1 else []
        cells += [_pct(row["per_class"].get(c)) for c in classes]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "std: sample standard deviation over seeds. 95% CI: Student-t interval of the mean over seeds."]
    lines += ["fusion: the variant's fusion; for HL-Attn with its model.hl_init (what its blocks compute at step 0)."]
    if len(subsets) == 1:  # whether seeds varied the labelled slices too, or the training only
        lines += [f"Labelled subset: {subsets[0]}."]
    if rows and rows[0].get("reference"):
        lines += [
            f"Δ vs ref: Mean Dice minus that of the reference variant `{rows[0]['reference']}`, in percentage "
            f"points, paired by seed; Δ 95% CI: Student-t interval of the mean paired difference; p: {PAIRED_TEST}. "
            "Empty with one seed."
        ]
    if classes:
        lines += ["Per-class columns: mean Dice (%) over seeds."]
    return "\n".join(lines) + "\n"


def _interval(low, high, fmt) -> str:
    return "-" if low is None or high is None else f"[{fmt(low)}, {fmt(high)}]"


def write_table(rows: list, folder: Path, description: str) -> None:
    text = markdown_table(rows, description)
    atomic_write_text(folder / "table.md", text)
    classes = []
    for row in rows:
        classes += [c for c in row["per_class"] if c not in classes]
    fields = ["variant", "overrides", "fusion", "subset", "seeds", "mean_dice", "mean_dice_std", "mean_dice_ci95_low"]
    fields += ["mean_dice_ci95_high", "mean_hd95", "mean_hd95_std", "reference", *COMPARISON]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields + [f"dice_{c}" for c in classes])
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: row.get(k) for k in fields}, **{f"dice_{c}": row["per_class"].get(c) for c in classes}})
    atomic_write_text(folder / "table.csv", buffer.getvalue())
    write_plot(rows, folder / "table.png", description)
    print(text)


def write_plot(rows: list, path: Path, description: str) -> None:
    """Bar plot of mean Dice (%) per variant with error bars = 95 % t interval of the mean over seeds (none
    for one seed); Agg backend, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["variant"] for row in rows]
    means = [100 * (row["mean_dice"] or 0.0) for row in rows]
    below = [
        m - 100 * row["mean_dice_ci95_low"] if row.get("mean_dice_ci95_low") is not None else 0.0
        for m, row in zip(means, rows)
    ]
    above = [
        100 * row["mean_dice_ci95_high"] - m if row.get("mean_dice_ci95_high") is not None else 0.0
        for m, row in zip(means, rows)
    ]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.5))
    ax.bar(range(len(rows)), means, yerr=[below, above], capsize=4, color="tab:blue")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("Mean Dice (%)")
    ax.set_ylim(0, 100)  # Dice's range: a wide interval (few seeds) runs off the axes instead of squashing the bars
    clipped = any(m - lo < 0 or m + hi > 100 for m, lo, hi in zip(means, below, above))
    seeds = sorted({row["seeds"] for row in rows})
    note = f"error bars: 95% CI of the mean over {'/'.join(map(str, seeds))} seed(s)"
    note += ", clipped to 0-100" if clipped else ""
    ax.set_title(f"{textwrap.fill(description, 85)}\n({note})", fontsize=8)
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

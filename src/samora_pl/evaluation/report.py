"""Evaluation outputs: ``results.csv``, ``metrics.json``, ``results.md`` and a console table.

Every file is written atomically (:mod:`samora_pl.records.atomic`),
so a crash never leaves a half-written file behind. In DDP, gather the rows first
(:func:`samora_pl.evaluation.gather_rows`) and write on rank zero only.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from samora_pl.evaluation.metrics import _names_by_id, sort_rows, summarise
from samora_pl.records.atomic import atomic_write_text

__all__ = ["write_results", "format_table", "RESIZE_DESCRIPTIONS"]

RESIZE_DESCRIPTIONS = {
    "direct": "direct: each slice resized once to the model size (cubic), label map back with nearest neighbour",
    "two_step": (
        "two_step (the reference code's exact protocol): each slice resized cubic to {two_step_size}, then cubic to "
        "the model size, label map back with nearest neighbour"
    ),
}


def _describe_resize(resize: str | None, two_step_size: int | None) -> str | None:
    if resize is None:
        return None
    if resize not in RESIZE_DESCRIPTIONS:
        return str(resize)
    return RESIZE_DESCRIPTIONS[resize].format(two_step_size=two_step_size if two_step_size is not None else 224)


def _csv_text(rows: list[dict], names: dict[int, str]) -> str:
    with_mm = all("hd95_mm" in r for r in rows)
    columns = ["case", "class_id", "class_name", "dice", "hd95"] + (["hd95_mm"] if with_mm else [])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        c = int(r["class_id"])
        line = [r["case"], c, names[c], repr(float(r["dice"])), repr(float(r["hd95"]))]
        if with_mm:
            line.append(repr(float(r["hd95_mm"])))
        writer.writerow(line)
    return buf.getvalue()


def format_table(
    summary: dict,
    class_names: Sequence[str] | dict | None = None,
    *,
    title: str | None = None,
    markdown: bool = False,
    resize: str | None = None,
    two_step_size: int | None = None,
) -> str:
    """The paper-style table of a :func:`~samora_pl.evaluation.summarise` result.

    One row per class and a Mean row; Dice in % with 2 decimals, HD95 in voxels with 2 decimals (and
    HD95 in mm when the summary has it). ``markdown=True`` gives a Markdown table, otherwise aligned
    plain text for the console. A closing note says which resize protocol was used and that HD95 is in
    voxels. ``class_names`` is accepted for symmetry with :func:`write_results` and unused (the summary
    already holds the names); ``title`` is printed above the table.
    """
    with_mm = "mean_hd95_mm" in summary
    header = ["Class", "Dice (%)", "HD95"] + (["HD95 (mm)"] if with_mm else [])
    body = []
    for name, v in summary["per_class"].items():
        line = [name, f"{100 * v['dice']:.2f}", f"{v['hd95']:.2f}"]
        if with_mm:
            line.append(f"{v['hd95_mm']:.2f}")
        body.append(line)
    mean = ["Mean", f"{100 * summary['mean_dice']:.2f}", f"{summary['mean_hd95']:.2f}"]
    if with_mm:
        mean.append(f"{summary['mean_hd95_mm']:.2f}")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        lines.append("| " + " | ".join([f"**{mean[0]}**"] + [f"**{x}**" for x in mean[1:]]) + " |")
    else:
        table = [header] + body + [mean]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]

        def fmt(r: list[str]) -> str:
            return "  ".join([r[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(r[1:], widths[1:])])

        rule = "-" * len(fmt(header))
        lines = [fmt(header), rule] + [fmt(r) for r in body] + [rule, fmt(mean)]
    notes = [
        f"{summary.get('num_cases', '?')} test cases. HD95 in voxels (unit spacing, SAMed/TransUNet protocol)"
        + ("; HD95 (mm) uses the voxel spacing." if with_mm else ".")
    ]
    absent = {n: v["absent_predicted"] for n, v in summary["per_class"].items() if v.get("absent_predicted")}
    if "mean_dice_present" in summary and any(v.get("dice_present") is not None for v in summary["per_class"].values()):
        notes.append(
            f"Dice over the cases that hold each class (not the protocol's): {100 * summary['mean_dice_present']:.2f} %"
            + (
                "; the protocol scored 1 for a class predicted where it is absent: "
                + ", ".join(f"{n} in {k} case(s)" for n, k in absent.items())
                if absent
                else ""
            )
            + "."
        )
    described = _describe_resize(resize, two_step_size)
    if described:
        notes.append(f"Resize protocol: {described}.")
    head = ""
    if title:
        head = f"# {title}\n\n" if markdown else f"{title}\n"
    sep = "\n\n" if markdown else "\n"
    return head + "\n".join(lines) + sep + sep.join(notes) + "\n"


def write_results(
    rows: Iterable[dict],
    class_names: Sequence[str] | dict,
    out_dir: str | os.PathLike,
    *,
    extra: dict | None = None,
    resize: str | None = None,
    two_step_size: int | None = None,
    title: str | None = None,
    notes: Sequence[str] = (),
) -> dict:
    """Write ``results.csv``, ``metrics.json`` and ``results.md`` into ``out_dir``; return the summary.

    Args:
        rows: per-(case, class) rows with ``case, class_id, dice, hd95[, hd95_mm]`` (any order).
        class_names: names of classes 1..K in order, or ``{class_id: name}``.
        out_dir: the folder (created if needed).
        extra: more keys for ``metrics.json`` (e.g. tag, checkpoint); JSON-serialisable. Its
            ``resize_protocol`` (or ``resize``) / ``two_step_size`` are used when the arguments below
            are not given.
        resize: the resize protocol used ("direct" / "two_step"); recorded in ``metrics.json`` as
            ``resize_protocol`` and stated in ``results.md``.
        two_step_size: the intermediate size of ``two_step`` (stated in the text).
        title: an optional heading for ``results.md``.
        notes: more sentences for the end of ``results.md`` (e.g. that pre-training saw the test images).
    """
    extra = dict(extra or {})
    if resize is None:
        resize = extra.get("resize_protocol", extra.get("resize"))
    if two_step_size is None:
        two_step_size = extra.get("two_step_size")
    rows = sort_rows(rows)
    summary = summarise(rows, class_names)
    names = _names_by_id(class_names, [int(r["class_id"]) for r in rows])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    metrics: dict[str, Any] = dict(summary)
    metrics["hd95_unit"] = "voxels"
    if resize is not None:
        metrics["resize_protocol"] = resize
        if resize == "two_step":
            metrics["two_step_size"] = two_step_size if two_step_size is not None else 224
    metrics.update(extra)
    json_text = json.dumps(metrics, indent=2, default=str) + "\n"
    md = format_table(summary, markdown=True, title=title, resize=resize, two_step_size=two_step_size)
    if notes:
        md = md.rstrip("\n") + "\n\n" + "\n".join(notes) + "\n"

    atomic_write_text(out / "results.csv", _csv_text(rows, names))
    atomic_write_text(out / "metrics.json", json_text)
    atomic_write_text(out / "results.md", md)
    return summary

"""results.csv / metrics.json / results.md and the console table."""

import csv
import json
import os

import pytest

from samora_pl.evaluation import format_table, summarise, write_results
from samora_pl.records import atomic

NAMES = ["spleen", "liver", "aorta"]


def make_rows(with_mm=False):
    rows = []
    values = {
        "case0002": [(0.9, 3.0), (0.95, 1.4142135623730951), (0.1 + 0.2, 12.5)],
        "case0001": [(0.8, 5.0), (1.0, 0.0), (0.0, 0.0)],
    }
    for case, per_class in values.items():
        for c, (d, h) in enumerate(per_class, start=1):
            row = {"class_id": c, "dice": d, "hd95": h, "case": case}
            if with_mm:
                row["hd95_mm"] = 2 * h
            rows.append(row)
    return rows


def test_writes_three_files_with_the_right_content(tmp_path):
    rows = make_rows()
    extra = {"resize_protocol": "two_step", "tag": "samora-hlattn-f0.1"}
    summary = write_results(rows, NAMES, tmp_path / "out", extra=extra)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "results.csv", "results.md"]

    with open(out / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["case", "class_id", "class_name", "dice", "hd95"]
    assert [(r["case"], r["class_id"], r["class_name"]) for r in table] == [
        (case, str(c), NAMES[c - 1]) for case in ("case0001", "case0002") for c in (1, 2, 3)
    ]
    by_key = {(r["case"], r["class_id"]): r for r in rows}
    for r in table:  # floats round-trip exactly
        src = by_key[(r["case"], int(r["class_id"]))]
        assert float(r["dice"]) == src["dice"] and float(r["hd95"]) == src["hd95"]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean_dice"] == summary["mean_dice"] == pytest.approx((0.85 + 0.975 + 0.15) / 3)
    assert metrics["mean_hd95"] == pytest.approx((4.0 + 1.4142135623730951 / 2 + 6.25) / 3)
    assert metrics["per_class"]["liver"]["dice"] == 0.975 and metrics["per_class"]["aorta"]["hd95"] == 6.25
    assert set(metrics["per_class"]) == set(NAMES)
    assert metrics["resize_protocol"] == "two_step" and metrics["two_step_size"] == 224
    assert metrics["tag"] == "samora-hlattn-f0.1" and metrics["hd95_unit"] == "voxels"
    assert metrics["num_cases"] == 2

    md = (out / "results.md").read_text()
    assert "| spleen | 85.00 | 4.00 |" in md
    assert "| liver | 97.50 | 0.71 |" in md
    assert "| aorta | 15.00 | 6.25 |" in md
    assert "| **Mean** | **65.83** |" in md
    assert "HD95 in voxels" in md and "two_step" in md and "224" in md


def test_spacing_column_and_direct_protocol(tmp_path):
    summary = write_results(make_rows(with_mm=True), {1: "spleen", 2: "liver", 3: "aorta"}, tmp_path, resize="direct")
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header == "case,class_id,class_name,dice,hd95,hd95_mm"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mean_hd95_mm"] == pytest.approx(2 * metrics["mean_hd95"])
    assert metrics["per_class"]["aorta"]["hd95_mm"] == 12.5
    assert metrics["resize_protocol"] == "direct" and "two_step_size" not in metrics
    md = (tmp_path / "results.md").read_text()
    assert "HD95 (mm)" in md and "direct" in md
    assert summary["mean_hd95_mm"] == metrics["mean_hd95_mm"]


def test_console_table():
    summary = summarise(make_rows(), NAMES)
    text = format_table(summary, NAMES, title="demo/samora", resize="direct")
    lines = text.splitlines()
    assert lines[0] == "demo/samora"
    assert lines[1].split() == ["Class", "Dice", "(%)", "HD95"]
    assert any(line.split() == ["spleen", "85.00", "4.00"] for line in lines)
    assert any(line.split()[:2] == ["Mean", "65.83"] for line in lines)
    assert "HD95 in voxels" in text and "direct" in text


def test_atomic_writes_leave_no_partial_or_temporary_files(tmp_path, monkeypatch):
    write_results(make_rows(), NAMES, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("metrics.json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    changed = make_rows()
    changed[0]["dice"] = 0.5
    with pytest.raises(OSError, match="disk full"):
        write_results(changed, NAMES, tmp_path)
    # metrics.json keeps its old, complete content; no temporary file is left behind
    assert (tmp_path / "metrics.json").read_bytes() == before["metrics.json"]
    json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)

import csv
import json
import shutil

import pytest

from samora_pl import ablation
from samora_pl.config import compose, experiments_dir
from samora_pl.errors import SamoraError
from samora_pl.stages import finetune


@pytest.fixture
def experiments(tmp_path, monkeypatch):
    copy = tmp_path / "experiments"
    shutil.copytree(experiments_dir(), copy)
    (copy / "ablations" / "pair.yaml").write_text(
        "description: two variants\nvariants:\n  a: [mode=samed]\n  b: [mode=samed, loss.ce_weight=0.5]\n"
    )
    monkeypatch.setenv("SAMORA_EXPERIMENTS", str(copy))
    return copy


def _fake_finetune(calls, fail_on=None):
    """Stands in for a fine-tune: records the tag, writes metrics.json (per-class Dice), finishes the manifest."""

    def fake_run(cfg):
        from samora_pl.runs import StageRecord, atomic_write_text, stage_dir

        if cfg.finetune.tag == fail_on:
            raise KeyboardInterrupt("killed")
        calls.append(cfg.finetune.tag)
        folder = stage_dir(cfg, "finetune", cfg.finetune.tag)
        dice = (0.5 if cfg.loss.ce_weight == 0.5 else 0.25) + 0.1 * cfg.seed
        per_class = {
            "liver": {"class_id": 1, "dice": dice, "hd95": 2.0},
            "spleen": {"class_id": 2, "dice": 0.0, "hd95": 0.0},
        }
        atomic_write_text(folder / "metrics.json", json.dumps({"mean_dice": dice, "per_class": per_class}))
        record = StageRecord(cfg, folder)
        record.metrics.update(mean_dice=dice, mean_hd95=3.0 + cfg.seed)
        record.write()
        return dict(record.metrics)

    return fake_run


def test_runs_variants_writes_table_and_reuses_finished(tmp_path, experiments, monkeypatch):
    calls = []
    monkeypatch.setattr(finetune, "run", _fake_finetune(calls))
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run=r"]
    rows = ablation.run_ablation("pair", overrides)
    assert calls == ["pair-a-s0", "pair-b-s0"] and [r["mean_dice"] for r in rows] == [0.25, 0.5]
    assert rows[0]["mean_dice_std"] is None  # one seed has no spread to report
    folder = tmp_path / "runs" / "r" / "ablations" / "pair"
    table = (folder / "table.md").read_text()
    assert "| a |" in table and "50.00" in table and "| 25.00 | - |" in table
    assert (folder / "table.csv").exists()
    ablation.run_ablation("pair", overrides)  # a resumed ablation redoes nothing that finished
    assert calls == ["pair-a-s0", "pair-b-s0"]


def test_seeds_give_per_seed_tags_spread_and_per_class(tmp_path, experiments, monkeypatch):
    calls = []
    monkeypatch.setattr(finetune, "run", _fake_finetune(calls))
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run=r"]
    rows = ablation.run_ablation("pair", overrides, seeds=3)
    assert calls == [f"pair-{v}-s{s}" for v in "ab" for s in range(3)]
    a = rows[0]
    assert a["seeds"] == 3 and a["mean_dice"] == pytest.approx(0.35) and a["mean_dice_std"] == pytest.approx(0.1)
    assert a["mean_hd95"] == pytest.approx(4.0) and a["mean_hd95_std"] == pytest.approx(1.0)
    assert a["per_class"] == {"liver": pytest.approx(0.35), "spleen": 0.0}
    folder = tmp_path / "runs" / "r" / "ablations" / "pair"
    with open(folder / "table.csv") as handle:
        table = list(csv.DictReader(handle))
    assert float(table[1]["mean_dice_std"]) == pytest.approx(0.1)
    assert float(table[1]["dice_liver"]) == pytest.approx(0.6)
    assert "± std" in (folder / "table.md").read_text() and "liver" in (folder / "table.md").read_text()


def test_killed_ablation_resumes_and_more_seeds_run_only_new_ones(tmp_path, experiments, monkeypatch):
    calls = []
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run=r"]
    monkeypatch.setattr(finetune, "run", _fake_finetune(calls, fail_on="pair-b-s0"))
    with pytest.raises(KeyboardInterrupt):
        ablation.run_ablation("pair", overrides, seeds=1)
    assert calls == ["pair-a-s0"]
    monkeypatch.setattr(finetune, "run", _fake_finetune(calls))
    ablation.run_ablation("pair", overrides, seeds=2)
    assert calls == ["pair-a-s0", "pair-a-s1", "pair-b-s0", "pair-b-s1"]


def test_plot_and_tensorboard_text(tmp_path, experiments, monkeypatch):
    monkeypatch.setattr(finetune, "run", _fake_finetune([]))
    ablation.run_ablation("pair", [f"runs_dir={tmp_path / 'runs'}", "run=r"], seeds=2)
    png = tmp_path / "runs" / "r" / "ablations" / "pair" / "table.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((tmp_path / "runs" / "r" / "tb" / "ablations" / "pair").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags().get("tensors", [])
    assert "ablation/pair/text_summary" in tags
    text = acc.Tensors("ablation/pair/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| a |" in text


def test_cli_seeds_token(monkeypatch):
    from samora_pl import cli

    seen = {}
    monkeypatch.setattr(
        ablation, "run_ablation", lambda name, overrides, seeds=1: seen.update(n=name, o=overrides, s=seeds)
    )
    cli.run_command("ablation", ["pair", "seeds=3", "run=r"])
    assert seen == {"n": "pair", "o": ["run=r"], "s": 3}
    with pytest.raises(SamoraError, match="seeds"):
        cli.run_command("ablation", ["pair", "seeds=x"])


def test_unknown_ablation_lists_known(experiments):
    with pytest.raises(SamoraError, match="mechanism"):
        ablation.load_ablation("nope")


def test_shipped_ablations_compose():
    for name in ("mechanism", "fusion", "order"):
        for extra in ablation.load_ablation(name)["variants"].values():
            compose("finetune", extra)  # every variant's keys and values are valid

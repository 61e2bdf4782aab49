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


def test_runs_variants_writes_table_and_reuses_finished(tmp_path, experiments, monkeypatch):
    calls = []

    def fake_run(cfg):  # stands in for a fine-tune: records the variant and finishes its manifest
        from samora_pl.runs import StageRecord, stage_dir

        calls.append(cfg.finetune.tag)
        record = StageRecord(cfg, stage_dir(cfg, "finetune", cfg.finetune.tag))
        record.metrics.update(mean_dice=0.5 if cfg.loss.ce_weight == 0.5 else 0.25, mean_hd95=3.0)
        record.write()
        return record.metrics

    monkeypatch.setattr(finetune, "run", fake_run)
    overrides = [f"runs_dir={tmp_path / 'runs'}", "run=r"]
    rows = ablation.run_ablation("pair", overrides)
    assert calls == ["pair-a", "pair-b"] and [r["mean_dice"] for r in rows] == [0.25, 0.5]
    table = (tmp_path / "runs" / "r" / "ablations" / "pair" / "table.md").read_text()
    assert "| a |" in table and "50.00" in table
    assert (tmp_path / "runs" / "r" / "ablations" / "pair" / "table.csv").exists()
    ablation.run_ablation("pair", overrides)  # a resumed ablation redoes nothing that finished
    assert calls == ["pair-a", "pair-b"]


def test_unknown_ablation_lists_known(experiments):
    with pytest.raises(SamoraError, match="mechanism"):
        ablation.load_ablation("nope")


def test_shipped_ablations_compose():
    for name in ("mechanism", "fusion", "order"):
        for extra in ablation.load_ablation(name)["variants"].values():
            compose("finetune", extra)  # every variant's keys and values are valid

"""A bad value for any stage a suite runs stops it before the first stage trains or writes a file: `samora demo`
and `samora ablation` compose and plan every stage (every variant and seed) first."""

import shutil

import pytest

from samora_pl.cli import main
from samora_pl.config.compose import experiments_dir
from samora_pl.stages.cpt import run as cpt
from samora_pl.stages.distill import run as distill
from samora_pl.stages.finetune import run as finetune


@pytest.fixture
def no_stage_may_run(monkeypatch):
    def refuse(plan):
        raise AssertionError(f"the {plan.stage} stage ran before the bad value was refused")

    for stage in (cpt, distill, finetune):
        monkeypatch.setattr(stage, "run", refuse)


@pytest.mark.parametrize(
    "bad, key",
    [
        ("distill.mask_ratio=1.5", "distill.mask_ratio"),  # a distillation key: the teachers would train first
        ("model.lac_weights=[0.5,0.1,0.1]", "model.lac_weights"),  # a fine-tune key: CPT and distill first
        ("cpt.mae.mask_ratio=1.0", "cpt.mae.mask_ratio"),
    ],
)
def test_demo_refuses_a_bad_value_of_any_stage_before_work(tmp_path, capsys, no_stage_may_run, bad, key):
    assert main(["demo", f"runs_dir={tmp_path / 'runs'}", f"data.dir={tmp_path / 'demo'}", bad]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and key in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "demo").exists()


def test_ablation_refuses_a_bad_variant_before_any_variant_runs(tmp_path, monkeypatch, capsys, no_stage_may_run):
    copy = tmp_path / "experiments"
    shutil.copytree(experiments_dir(), copy)
    (copy / "ablations" / "late.yaml").write_text(
        "description: the last variant is bad\nreference: a\nvariants:\n  a: [mode=samed]\n  b: [model.fusion=concat]\n"
    )
    monkeypatch.setenv("SAMORA_EXPERIMENTS", str(copy))
    assert main(["ablation", "late", "seeds=2", f"runs_dir={tmp_path / 'runs'}"]) == 1
    err = capsys.readouterr().err
    assert "model.fusion" in err and "concat" in err and not (tmp_path / "runs").exists()

"""Which settings let a stage reuse a folder's finished work: one rule per stage, read by the stages and
the ablation's upstream keys."""

import pytest

from samora_pl.config.compose import compose, to_yaml
from samora_pl.runs.reuse import changed_settings, watched


def saved(tmp_path, stage, overrides=()):
    folder = tmp_path / stage
    folder.mkdir()
    (folder / "config.yaml").write_text(to_yaml(compose(stage, list(overrides))))
    return folder


@pytest.mark.parametrize(
    "stage, sub, override, changed",
    [
        ("cpt", "simclr", "cpt.simclr.max_epochs=7", []),  # more epochs continue the same teacher
        ("cpt", "simclr", "cpt.mae.mask_ratio=0.5", []),  # the other teacher's block
        ("cpt", "simclr", "seed=5", ["seed"]),
        ("distill", "pixel", "distill.level=pixel", []),
        ("distill", "pixel", "model.lora_rank=2", ["model.lora_rank"]),
        ("distill", "pixel", "cpt.simclr.jitter=0.1", []),  # views shape the image expert only
        ("distill", "image", "cpt.simclr.jitter=0.1", ["cpt.simclr.jitter"]),
        ("finetune", "t", "finetune.evaluate=false", []),
        ("finetune", "t", "trainer.max_epochs=9", []),
        ("finetune", "t", "optim.lr=0.1", ["optim.lr"]),
    ],
)
def test_only_the_settings_that_shape_the_output_count(tmp_path, stage, sub, override, changed):
    folder = saved(tmp_path, stage)
    assert changed_settings(stage, sub, compose(stage, [override]), folder) == changed


def test_a_caller_can_watch_and_ignore_more(tmp_path):
    folder = saved(tmp_path, "finetune")
    cfg = compose("finetune", ["trainer.max_epochs=9"])
    assert changed_settings("finetune", "t", cfg, folder, also_watch=("trainer.max_epochs",)) == ["trainer.max_epochs"]
    assert not changed_settings("finetune", "t", compose("finetune", ["data.cache=true"]), folder)
    assert watched("distill", "image")[0][: len(watched("distill", "patch")[0])] == watched("distill", "patch")[0]

"""Saved configs from before a key existed: reused for what their runs did, refused where that differs."""

import yaml
from omegaconf import OmegaConf

from samora_pl.config.compose import changed_since, compose, load_saved
from samora_pl.config.migrate import ADDED_KEYS
from samora_pl.records.manifest import save_config
from tests.stage_runs import planned


def _saved_without(tmp_path, cfg, keys):
    """config.yaml as today's code writes it, with `keys` removed (as a run made before they existed)."""
    save_config(OmegaConf.to_container(cfg, resolve=True), tmp_path)
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for key in keys:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node[part]
        del node[leaf]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    return tmp_path / "config.yaml"


def test_a_key_added_with_the_old_behaviour_as_default_changes_nothing(tmp_path):
    cfg = compose("finetune", ["optim.decay_all=true"])
    saved = _saved_without(tmp_path, cfg, ["finetune.train_experts", "data.train_size", "trainer.stop_epoch"])
    keys, ignore = planned("finetune").shaping_keys("")
    assert changed_since(saved, cfg, keys, ignore) == []
    assert load_saved(saved).finetune.train_experts is False


def test_a_key_whose_default_is_not_the_old_behaviour_is_refused(tmp_path):
    """Fine-tunes before optim.decay_all decayed every parameter: today's default (false) is another recipe."""
    saved = _saved_without(tmp_path, compose("finetune", []), list(ADDED_KEYS)[:2])
    keys, ignore = planned("finetune").shaping_keys("")
    assert changed_since(saved, compose("finetune", []), keys, ignore) == ["optim.decay_all"]
    assert changed_since(saved, compose("finetune", ["optim.decay_all=true"]), keys, ignore) == []
    assert load_saved(saved).optim.decay_all is True


def test_every_added_key_is_in_the_schema():
    cfg, absent = compose("finetune", []), object()
    assert [key for key in ADDED_KEYS if OmegaConf.select(cfg, key, default=absent) is absent] == []

"""`overrides_file=PATH`: a YAML file of config keys among the command line's overrides (a sweep's best.yaml)."""

import pytest

from samora_pl.config.compose import compose
from samora_pl.errors import SamoraError


def test_a_file_of_overrides_is_read_in_its_place(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text("optim:\n  lr: 0.0012\n  warmup_steps: 40\ndata:\n  batch_size: 2\n")
    cfg = compose("finetune", [f"overrides_file={best}"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.data.batch_size) == (0.0012, 40, 2)
    after = compose("finetune", [f"overrides_file={best}", "optim.lr=0.5"])  # a later key=value wins
    before = compose("finetune", ["optim.lr=0.5", f"overrides_file={best}"])  # an earlier one does not
    assert after.optim.lr == 0.5 and before.optim.lr == 0.0012 and after.data.batch_size == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optim:\n  lrr: 0.1\n", "Unknown config key 'optim.lrr'"),
        ("optim:\n  lr: fast\n", "optim.lr"),
        ("- optim.lr=0.1\n", "mapping of config keys"),
        ("optim: {lr: [0.1\n", "Cannot read config file"),
    ],
)
def test_a_bad_file_of_overrides_is_one_message_naming_it(tmp_path, text, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SamoraError, match="bad.yaml|mapping") as err:
        compose("finetune", [f"overrides_file={bad}"])
    assert expected in str(err.value)


def test_a_missing_file_of_overrides_is_refused(tmp_path):
    with pytest.raises(SamoraError, match="no such file"):
        compose("finetune", [f"overrides_file={tmp_path / 'none.yaml'}"])

"""`samora sweep NAME`: Optuna over fine-tune settings, scored on held-out training slices, resumable, and
never reading a test volume (the test files are made unreadable before it runs)."""

import csv
import shutil
from pathlib import Path

import pytest
import yaml

import samora_pl.cli as cli
from samora_pl.cli import main
from samora_pl.config.compose import compose
from samora_pl.errors import SamoraError
from samora_pl.suites.sweep import load_sweep, trial_tag

GARBAGE = b"not a volume: a sweep must never read the test set\n"


@pytest.fixture
def blind_demo(tmp_path, demo_dir) -> Path:
    """A copy of the demo data whose test volumes are garbage: any read of one fails."""
    copy = tmp_path / "demo"
    shutil.copytree(demo_dir, copy)
    volumes = sorted((copy / "test_vol_h5").glob("*.h5"))
    assert volumes
    for volume in volumes:
        volume.write_bytes(GARBAGE)
    return copy


@pytest.fixture
def tiny(tmp_path, blind_demo):
    """Overrides of a seconds-long fine-tune per trial on the blinded demo data (profile tiny)."""
    return [
        f"runs_dir={tmp_path / 'runs'}",
        f"data.dir={blind_demo}",
        "run=s",
        "mode=samed",  # no experts needed: the sweep itself is under test
        "data.fraction=0.1",
        "data.val_slices=4",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.check_val_every_n_epoch=1",
        "trainer.image_log_every_n_epochs=1",
    ]


@pytest.fixture
def calls(monkeypatch):
    """The fine-tunes the sweep runs (their overrides), through the stable entry `cli.run_command`."""
    seen = []
    real = cli.run_command

    def counting(command, overrides):
        if command == "finetune":
            seen.append(list(overrides))
        return real(command, overrides)

    monkeypatch.setattr(cli, "run_command", counting)
    return seen


def _rows(folder: Path) -> list:
    with open(folder / "trials.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_lr_sweep_never_reads_the_test_volumes_and_writes_an_override_file(tmp_path, tiny, blind_demo, calls):
    assert main(["sweep", "lr", "trials=2", *tiny]) == 0
    assert len(calls) == 2 and all("finetune.evaluate=false" in args for args in calls)
    folder = tmp_path / "runs" / "s" / "sweeps" / "lr"
    rows = _rows(folder)
    assert [row["state"] for row in rows] == ["complete", "complete"]
    assert all(0.0 <= float(row["val_mean_dice"]) <= 1.0 for row in rows)
    assert (folder / "optuna.db").is_file() and (folder / "trials.png").stat().st_size > 1000
    assert "never" in (folder / "summary.md").read_text() or "no test volume" in (folder / "summary.md").read_text()
    for volume in (blind_demo / "test_vol_h5").glob("*.h5"):
        assert volume.read_bytes() == GARBAGE  # untouched, and unreadable all along
    for row in rows:
        trial = tmp_path / "runs" / "s" / "finetune" / row["tag"]
        assert (trial / "final.safetensors").is_file() and not (trial / "metrics.json").exists()  # no evaluation
    # the best trial's settings, as a file make finetune takes (OVERRIDES=... / ARGS=overrides_file=...)
    best = yaml.safe_load((folder / "best.yaml").read_text())
    top = max(rows, key=lambda row: float(row["val_mean_dice"]))
    cfg = compose("finetune", [*tiny, f"overrides_file={folder / 'best.yaml'}"])
    assert cfg.optim.lr == pytest.approx(float(top["optim.lr"])) == pytest.approx(best["optim"]["lr"])
    assert cfg.optim.warmup_steps == int(top["optim.warmup_steps"]) and cfg.data.batch_size == int(
        top["data.batch_size"]
    )

    # same command: every trial is read back, nothing runs; more trials: only the new one runs
    assert main(["sweep", "lr", "trials=2", *tiny]) == 0 and len(calls) == 2
    assert main(["sweep", "lr", "trials=3", *tiny]) == 0 and len(calls) == 3
    assert [row["state"] for row in _rows(folder)] == ["complete"] * 3


@pytest.mark.slow
def test_an_interrupted_trial_is_asked_again_and_other_settings_are_refused(tmp_path, tiny, monkeypatch, capsys):
    real = cli.run_command
    interrupted = []

    def stop_once(command, overrides):
        if command == "finetune" and not interrupted:
            interrupted.append(next(a.split("=", 1)[1] for a in overrides if a.startswith("finetune.tag=")))
            raise KeyboardInterrupt
        return real(command, overrides)

    monkeypatch.setattr(cli, "run_command", stop_once)
    assert main(["sweep", "lr", "trials=1", *tiny]) == 130
    assert main(["sweep", "lr", "trials=1", *tiny]) == 0
    rows = _rows(tmp_path / "runs" / "s" / "sweeps" / "lr")
    assert [row["tag"] for row in rows if row["state"] == "complete"] == interrupted  # the same settings again
    capsys.readouterr()
    assert main(["sweep", "lr", "trials=2", *tiny, "loss.ce_weight=0.5"]) == 1
    err = capsys.readouterr().err
    assert "loss.ce_weight" in err and "overwrite=true" in err


def test_trial_tags_follow_the_settings():
    assert trial_tag("lr", {"optim.lr": 0.001, "data.batch_size": 4}) == trial_tag(
        "lr", {"data.batch_size": 4, "optim.lr": 0.001}
    )
    assert trial_tag("lr", {"optim.lr": 0.001}) != trial_tag("lr", {"optim.lr": 0.002})


def test_the_shipped_sweep_searches_lr_warmup_and_batch_size():
    spec = load_sweep("lr")
    assert set(spec["space"]) == {"optim.lr", "optim.warmup_steps", "data.batch_size"}
    assert spec["space"]["optim.lr"]["log"] and spec["space"]["data.batch_size"]["kind"] == "categorical"


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ("{optim.lrr: {low: 0.1, high: 1.0}}", "not a config key"),
        ("{finetune.evaluate: {choices: [true, false]}}", "cannot search"),
        ("{optim.lr: {low: 1.0, high: 0.1}}", "low < high"),
        ("{optim.lr: {low: 0.0, high: 0.1, log: true}}", "low > 0"),
        ("{data.batch_size: {choices: []}}", "non-empty list"),
        ("{}", "non-empty 'space'"),
    ],
)
def test_a_bad_sweep_file_is_one_message(tmp_path, monkeypatch, repo_root, space, expected):
    experiments = tmp_path / "experiments"
    shutil.copytree(repo_root / "experiments", experiments)
    (experiments / "sweeps" / "bad.yaml").write_text(f"trials: 2\nspace: {space}\n")
    monkeypatch.setenv("SAMORA_EXPERIMENTS", str(experiments))
    with pytest.raises(SamoraError, match=expected):
        load_sweep("bad")


def test_an_unknown_sweep_lists_the_known_ones(capsys):
    assert main(["sweep", "nosuch"]) == 1
    assert "lr" in capsys.readouterr().err


def test_a_sweep_needs_held_out_monitoring_slices(capsys):
    assert main(["sweep", "lr", "data.fraction=0.1", "data.val_slices=0"]) == 1
    assert "data.val_slices" in capsys.readouterr().err
    assert main(["sweep", "lr", "data.fraction=1.0"]) == 1  # nothing held out: the score would be fit
    assert "FRACTION < 1" in capsys.readouterr().err

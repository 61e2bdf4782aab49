"""Progress output in a log file: a line per epoch, not a tqdm redraw per step; under DDP from rank zero only."""

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, TensorDataset

from samora_pl.cli import _rank_zero_or_warning
from samora_pl.training import progress
from samora_pl.training.progress import LineProgressBar, progress_bar, track


class _Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_not_a_terminal_gives_one_line_per_epoch_with_its_means(capsys):
    assert isinstance(progress_bar("finetune x"), LineProgressBar)  # pytest captures stderr: not a terminal
    data = DataLoader(TensorDataset(torch.rand(32, 2), torch.rand(32, 1)), batch_size=4)
    trainer = L.Trainer(
        max_epochs=3,
        check_val_every_n_epoch=2,
        callbacks=[LineProgressBar("finetune x")],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(_Regression(), data, data)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune x:")]
    assert [line.split(" (")[0] for line in lines] == [f"finetune x: epoch {e}/3" for e in (1, 2, 3)]
    assert all("train/loss_epoch=" in line and "train/loss_step" not in line for line in lines)
    assert "val/loss=" in lines[1] and "val/loss=" not in lines[0]


def test_track_prints_a_summary_line(capsys):
    assert list(track(range(3), "evaluate", "volume")) == [0, 1, 2]
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("evaluate: 3/3 volumes in ")
    assert list(track([], "evaluate", "volume")) == [] and capsys.readouterr().err == ""


@pytest.mark.parametrize("terminal", [False, True])
def test_track_speaks_on_rank_zero_only(capsys, monkeypatch, terminal):
    """Under DDP each rank evaluates its share; only global rank zero prints the `evaluate:` line (or bar)."""
    monkeypatch.setattr(progress, "interactive", lambda: terminal)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert list(track(range(3), "evaluate", "volume")) == [0, 1, 2]  # the work is done, silently
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert list(track(range(3), "evaluate", "volume")) == [0, 1, 2]
    assert "evaluate: " in capsys.readouterr().err


def test_epoch_lines_come_from_global_rank_zero_only(capsys):
    """Lightning disables the progress callback on other ranks (`setup`); the epoch lines honour that."""
    for global_zero, printed in ((False, ""), (True, "finetune x: epoch 1/2\n")):
        bar = LineProgressBar("finetune x")
        bar.setup(SimpleNamespace(is_global_zero=global_zero), None, "fit")
        bar._emit("epoch 1/2")
        assert capsys.readouterr().err == printed


def test_cli_info_lines_come_from_rank_zero_only(monkeypatch):
    """Every DDP rank runs the CLI; its info lines (checkpoint loaded, resuming...) are rank zero's, its
    warnings and errors every rank's."""
    record = logging.LogRecord("samora_pl", logging.INFO, __file__, 1, "loaded", None, None)
    warning = logging.LogRecord("samora_pl", logging.WARNING, __file__, 1, "careful", None, None)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert not _rank_zero_or_warning(record) and _rank_zero_or_warning(warning)
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert _rank_zero_or_warning(record) and _rank_zero_or_warning(warning)


@pytest.mark.slow
def test_finetune_log_file_stays_small_and_ends_with_the_results(tmp_path):
    """The tiny SAMed fine-tune (100 epochs) with stdout and stderr in a file: 190 KB of tqdm redraws before."""
    from data_modules.labelled.demo import ensure_demo

    demo = ensure_demo(tmp_path / "demo")
    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]), OMP_NUM_THREADS="1")
    args = ["mode=samed", "data.fraction=0.1", f"data.dir={demo}", f"runs_dir={tmp_path / 'runs'}", "run=log"]
    log = tmp_path / "finetune.log"
    with open(log, "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "samora_pl", "finetune", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert log.stat().st_size <= 30_000, f"{log.stat().st_size} bytes of output"
    assert "epoch 100/100" in text and "\r" not in text
    tail = text.rstrip().splitlines()[-16:]
    assert tail[-1].startswith("samora finetune finished") and any(line.startswith("Mean ") for line in tail)

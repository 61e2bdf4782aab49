"""Progress output in a log file: a line per epoch, not a tqdm redraw per step."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from samora_pl.progress import LineProgressBar, progress_bar, track


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


@pytest.mark.slow
def test_finetune_log_file_stays_small_and_ends_with_the_results(tmp_path):
    """The tiny SAMed fine-tune (100 epochs) with stdout and stderr in a file: 190 KB of tqdm redraws before."""
    from data_modules.demo import ensure_demo

    demo = ensure_demo(tmp_path / "demo")
    root = Path(__file__).resolve().parents[2]
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

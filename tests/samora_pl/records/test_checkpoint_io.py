"""Checkpoints are replaced whole or not at all, and a stage whose `last.ckpt` is unreadable starts afresh
with one warning instead of dying in PyTorch's zip reader."""

import errno
import json
import logging
from pathlib import Path

import numpy as np
import torch

from samora_pl.cli import main
from samora_pl.records.checkpoint_io import AtomicCheckpointIO, resumable, unreadable_reason


def full_disk_after_half(monkeypatch, from_call: int = 1) -> list:
    """From the `from_call`-th checkpoint write on, only half of the bytes reach the file, then the write fails
    as on a full disk (ENOSPC, naming no file, like a failed write())."""
    write = AtomicCheckpointIO.write
    calls = []

    def half_then_enospc(path, data):
        calls.append(path)
        if len(calls) < from_call:
            return write(path, data)
        write(path, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AtomicCheckpointIO, "write", staticmethod(half_then_enospc))
    return calls


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    last = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0, "weights": torch.arange(4096.0)}, last)
    before = last.read_bytes()
    full_disk_after_half(monkeypatch)
    try:
        AtomicCheckpointIO().save_checkpoint({"epoch": 1, "weights": torch.zeros(4096)}, last)
    except OSError as err:
        assert err.errno == errno.ENOSPC and err.filename == str(last)  # the file the user knows
    else:
        raise AssertionError("the failed write was not reported")
    assert last.read_bytes() == before
    assert list(last.parent.iterdir()) == [last]  # the half-written temporary file is gone
    assert torch.load(last, weights_only=True)["epoch"] == 0


def test_truncated_and_missing_checkpoints_are_not_resumable(tmp_path, caplog):
    last = tmp_path / "last.ckpt"
    assert resumable(last, "distill pixel") is None and not caplog.records  # nothing to resume: no message
    AtomicCheckpointIO().save_checkpoint({"epoch": 3, "weights": torch.arange(4096.0)}, last)
    assert unreadable_reason(last) is None and resumable(last, "distill pixel") == last
    last.write_bytes(last.read_bytes()[:-1000])
    caplog.set_level(logging.WARNING, logger="samora_pl")
    assert unreadable_reason(last) and resumable(last, "distill pixel") is None
    assert [r.getMessage() for r in caplog.records] == [
        f"distill pixel: checkpoint {last} is unreadable ({unreadable_reason(last)}); starting the stage afresh."
    ]


def pixel_args(tmp_path: Path, tiny_pixel: list, epochs: int = 2) -> list:
    pool = tmp_path / "pool"
    if not pool.exists():
        pool.mkdir()
        np.savez(pool / "vol.npz", image=np.random.default_rng(0).random((8, 64, 64), dtype=np.float32))
    return [
        "distill",
        f"runs_dir={tmp_path / 'runs'}",
        "run=t",
        f"data.dir={tmp_path / 'demo'}",
        *tiny_pixel,
        f"distill.max_epochs={epochs}",
        "data.num_workers=0",
        "trainer.log_every_n_steps=1",
        f"cpt.sources=[{{path: '{pool}', format: npz, intensity: none}}]",
    ]


def test_a_full_disk_keeps_the_last_checkpoint_and_the_same_command_then_resumes(
    tmp_path, monkeypatch, capsys, caplog, tiny_pixel
):
    last = tmp_path / "runs" / "t" / "distill" / "pixel" / "checkpoints" / "last.ckpt"
    with monkeypatch.context() as patch:
        full_disk_after_half(patch, from_call=2)  # epoch 0 is saved, the save after epoch 1 meets a full disk
        assert main(pixel_args(tmp_path, tiny_pixel)) == 1
    err = capsys.readouterr().err
    assert f"{last}: No space left on device" in err and "Traceback" not in err
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    assert list(last.parent.iterdir()) == [last]

    caplog.set_level(logging.INFO, logger="samora_pl")
    assert main(pixel_args(tmp_path, tiny_pixel)) == 0  # space is free again: the same command continues from epoch 0
    assert f"resuming from {last}" in caplog.text
    manifest = json.loads((last.parents[1] / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["epochs"] == 2


def test_a_truncated_last_checkpoint_starts_the_stage_afresh_with_one_warning(tmp_path, caplog, tiny_pixel):
    last = tmp_path / "runs" / "t" / "distill" / "pixel" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    AtomicCheckpointIO().save_checkpoint({"epoch": 0, "weights": torch.arange(4096.0)}, last)
    last.write_bytes(last.read_bytes()[:2000])  # what a full disk left before writes were atomic
    caplog.set_level(logging.INFO, logger="samora_pl")
    assert main(pixel_args(tmp_path, tiny_pixel)) == 0
    about = [r.getMessage() for r in caplog.records if "last.ckpt" in r.getMessage()]
    assert len(about) == 1 and str(last) in about[0] and "starting the stage afresh" in about[0]
    assert "resuming" not in caplog.text
    manifest = json.loads((last.parents[1] / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["epochs"] == 2
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 1  # replaced by a whole one

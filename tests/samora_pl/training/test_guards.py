"""Reliability: a non-finite loss stops every stage cleanly (or is skipped), runs are deterministic, and a
fine-tune killed with SIGKILL resumes to the same result as an uninterrupted one."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from samora_pl.cli import main
from samora_pl.errors import SamoraError
from samora_pl.losses.segmentation import SegmentationLoss
from samora_pl.models.teachers.mae import MaeTeacher
from samora_pl.stages.distill import module as distill_module
from samora_pl.training.guards import check_finite_state

TAG = "samed-lora-f0.1"


@pytest.fixture
def finetune_args(demo_dir):
    """``finetune_args(runs, *extra)``: a seconds-long SAMed fine-tune on the demo data (2 batches an epoch)."""

    def args(runs: Path, *extra):
        return [
            "finetune",
            f"runs_dir={runs}",
            f"data.dir={demo_dir}",
            "run=t",
            "mode=samed",
            "data.fraction=0.1",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "data.val_slices=4",
            "trainer.log_every_n_steps=1",
            *extra,
        ]

    return args


def nan_from(monkeypatch, owner, name, first: int, last: int = 10**9, pick=lambda out: out, put=None):
    """Make owner.name's training calls (grad enabled) number first..last return a NaN loss."""
    original = getattr(owner, name)
    calls = []

    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if first <= len(calls) <= last:
                loss = pick(out) * float("nan")
                return put(out, loss) if put else loss
        return out

    monkeypatch.setattr(owner, name, patched)
    return calls


# ------------------------------------------------------------------------------------- numerical guard


@pytest.mark.slow
def test_nan_loss_stops_finetune_and_keeps_the_previous_model(tmp_path, monkeypatch, capsys, finetune_args):
    runs = tmp_path / "runs"
    assert main(finetune_args(runs, "finetune.evaluate=false")) == 0
    folder = runs / "t" / "finetune" / TAG
    before = (folder / "final.safetensors").read_bytes()
    manifest = (folder / "manifest.json").read_bytes()
    capsys.readouterr()
    nan_from(monkeypatch, SegmentationLoss, "forward", first=3)  # the first batch of the second epoch
    assert main(finetune_args(runs, "finetune.evaluate=false", "overwrite=true", "trainer.max_epochs=2")) == 1
    err = capsys.readouterr().err
    assert f"finetune {TAG}" in err and "non-finite" in err and "global step 2" in err
    assert str(folder / "checkpoints" / "last.ckpt") in err and "skip_nonfinite=true" in err
    assert "Traceback" not in err
    assert (folder / "final.safetensors").read_bytes() == before
    assert (folder / "manifest.json").read_bytes() == manifest


@pytest.mark.slow
def test_skip_nonfinite_finishes_and_counts_the_skipped_batches(tmp_path, monkeypatch, finetune_args):
    runs = tmp_path / "runs"
    nan_from(monkeypatch, SegmentationLoss, "forward", first=2, last=2)
    assert main(finetune_args(runs, "finetune.evaluate=false", "skip_nonfinite=true", "trainer.max_epochs=2")) == 0
    folder = runs / "t" / "finetune" / TAG
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["skipped_nonfinite_batches"] == 1
    assert all(torch.isfinite(v).all() for v in load_file(str(folder / "final.safetensors")).values())


@pytest.mark.slow
def test_nan_loss_stops_a_distill_level_before_its_expert(tmp_path, monkeypatch, capsys, npz_pool, tiny_pixel):
    runs = tmp_path / "runs"
    args = [
        "distill",
        f"runs_dir={runs}",
        "run=t",
        f"data.dir={tmp_path / 'demo'}",
        *tiny_pixel,
        "distill.max_epochs=2",
        "trainer.limit_train_batches=2",
        f"cpt.sources=[{{path: '{npz_pool(tmp_path / 'pool', size=64)}', format: npz}}]",
    ]
    nan_from(
        monkeypatch,
        distill_module,
        "denoise_loss",
        first=3,
        pick=lambda out: out[0],
        put=lambda out, loss: (loss, *out[1:]),
    )
    assert main(args) == 1
    err = capsys.readouterr().err
    folder = runs / "t" / "distill" / "pixel"
    assert "distill pixel" in err and "global step 2" in err and str(folder / "checkpoints" / "last.ckpt") in err
    assert "Traceback" not in err
    assert not (folder / "expert.safetensors").exists() and not (folder / "manifest.json").exists()


@pytest.mark.slow
def test_nan_loss_stops_cpt_and_keeps_the_previous_teacher(tmp_path, monkeypatch, capsys, npz_pool, tiny_cpt):
    runs = tmp_path / "runs"
    args = [
        "cpt",
        f"runs_dir={runs}",
        "run=t",
        f"data.dir={tmp_path / 'demo'}",
        "cpt.teacher=mae",
        f"cpt.sources=[{{path: '{npz_pool(tmp_path / 'pool')}', format: npz}}]",
        *tiny_cpt,
    ]
    assert main(args + ["cpt.mae.max_epochs=1"]) == 0
    teacher = runs / "t" / "cpt" / "mae" / "teacher.pt"
    before = teacher.read_bytes()
    capsys.readouterr()
    nan_from(
        monkeypatch, MaeTeacher, "forward", first=1, pick=lambda out: out[0], put=lambda out, loss: (loss, *out[1:])
    )
    assert main(args + ["cpt.mae.max_epochs=2"]) == 1  # continues the finished run: its epoch 1 is NaN
    err = capsys.readouterr().err
    assert "cpt mae" in err and "global step 2" in err and "last.ckpt" in err and "Traceback" not in err
    assert teacher.read_bytes() == before


def test_non_finite_weights_are_never_written():
    with pytest.raises(SamoraError, match="was not written"):
        check_finite_state([("w", torch.tensor([1.0, float("nan")]))], "finetune x", Path("final.safetensors"))
    check_finite_state([("w", torch.ones(2)), ("step", torch.tensor([3]))], "finetune x", Path("final.safetensors"))


# ---------------------------------------------------------------------------- determinism and SIGKILL


def same_tensors(a: dict, b: dict) -> bool:
    """Bit-identical weights (not file bytes: safetensors' metadata order varies between writes)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_deterministic_finetunes_give_identical_metrics(tmp_path, finetune_args):
    """Same seed: the same metrics.json and bit-identical weights (the tiny run's Dice is 0, so the weights are
    the sensitive part); another seed gives other weights, so the comparison is not vacuous."""
    metrics, weights = [], []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert main(finetune_args(tmp_path / name, "deterministic=true", f"seed={seed}", "trainer.max_epochs=2")) == 0
        folder = tmp_path / name / "t" / "finetune" / TAG
        metrics.append(json.loads((folder / "metrics.json").read_text()))
        weights.append(load_file(str(folder / "final.safetensors")))
    assert metrics[0] == metrics[1] and same_tensors(weights[0], weights[1])
    assert not same_tensors(weights[2], weights[0])


@pytest.mark.slow
def test_sigkilled_finetune_resumes_to_the_uninterrupted_result(
    tmp_path, caplog, repo_root, subprocess_env, finetune_args
):
    """With a data worker and validation every epoch: the augmenting worker is re-seeded every epoch from the
    checkpointed generator, and the validation loader draws its worker seed from a generator of its own."""
    root, env = repo_root, subprocess_env
    same = ["deterministic=true", "trainer.max_epochs=4", "trainer.accelerator=cpu", "data.num_workers=1"]
    same.append("trainer.check_val_every_n_epoch=1")
    args = finetune_args(tmp_path / "killed", *same)
    last = tmp_path / "killed" / "t" / "finetune" / TAG / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "samora_pl", *args],
        env=env,
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300  # a busy CI machine is several times slower
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert last.exists(), "the fine-tune never wrote last.ckpt"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] < 3
    caplog.set_level(logging.INFO, logger="samora_pl")
    assert main(args) == 0  # the same command again continues from last.ckpt
    assert f"resuming from {last}" in caplog.text
    assert main(finetune_args(tmp_path / "whole", *same)) == 0
    killed, whole = (tmp_path / name / "t" / "finetune" / TAG for name in ("killed", "whole"))
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((whole / "metrics.json").read_text())
    assert same_tensors(load_file(str(killed / "final.safetensors")), load_file(str(whole / "final.safetensors")))


@pytest.mark.slow
def test_sigkilled_ddp_finetune_resumes_to_the_uninterrupted_result(tmp_path, repo_root, subprocess_env, finetune_args):
    """Two CPU processes (gloo), each with a data worker, both killed after a checkpoint, then the same command
    again: it continues from the last.ckpt rank zero wrote and ends bit-identical to a run that was never
    interrupted (the resumed first epoch shards as that epoch, not as epoch 0: data_modules/labelled/sampling.py)."""
    root, env = repo_root, subprocess_env

    def command(runs: Path) -> list:
        return [
            sys.executable,
            "-m",
            "samora_pl",
            *finetune_args(
                runs,
                "deterministic=true",
                "trainer.max_epochs=4",
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "data.num_workers=1",
            ),
        ]

    last = tmp_path / "killed" / "t" / "finetune" / TAG / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        command(tmp_path / "killed"),
        env=env,
        cwd=root,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert last.exists(), "the DDP fine-tune never wrote last.ckpt"
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks: rank 1 is a child of the launching process
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] < 3
    again = subprocess.run(command(tmp_path / "killed"), env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {last}" in again.stdout + again.stderr
    whole = subprocess.run(command(tmp_path / "whole"), env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed, whole = (tmp_path / name / "t" / "finetune" / TAG for name in ("killed", "whole"))
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((whole / "metrics.json").read_text())
    assert same_tensors(load_file(str(killed / "final.safetensors")), load_file(str(whole / "final.safetensors")))


# ------------------------------------------------------------------------------ unwritable run folder


def test_read_only_runs_folder_is_one_clear_error(tmp_path, monkeypatch, capsys, finetune_args):
    # chmod cannot stop root (CI runs as root), so the file system's refusal is simulated where folders are made
    runs = tmp_path / "runs"
    real_mkdir = Path.mkdir

    def refuse_under_runs(self, *args, **kwargs):
        if str(self).startswith(str(runs)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse_under_runs)
    assert main(finetune_args(runs, "finetune.evaluate=false")) == 1
    err = capsys.readouterr().err
    assert "Permission denied" in err and str(runs) in err and "runs_dir=" in err and "Traceback" not in err


def test_runs_folder_under_a_file_is_one_clear_error(tmp_path, capsys, finetune_args):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    assert main(finetune_args(blocker / "runs", "finetune.evaluate=false")) == 1
    err = capsys.readouterr().err
    assert str(blocker) in err and "Not a directory" in err and "runs_dir=" in err and "Traceback" not in err

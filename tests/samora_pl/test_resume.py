"""Resuming is invisible: every stage killed after a checkpoint and re-run in a fresh process ends with the
same weights, bit for bit, as the run that was never interrupted.

The killed run and the resumed run are separate processes (`kill_after_checkpoints.py` SIGKILLs itself right
after its first `last.ckpt`), so nothing but the checkpoint carries state from one to the other. One data
worker per run: the views, masks and noise come from worker and main-process generators alike, and a worker
that outlives an epoch would keep a generator no checkpoint holds. Three epochs of two steps each, tiny models.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from samora_pl.cli import main
from samora_pl.models.teachers.files import save_teacher

ROOT = Path(__file__).resolve().parents[2]
KILLER = Path(__file__).with_name("kill_after_checkpoints.py")
# the frozen teacher is in eval mode on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*")

COMMON = [
    "run=t",
    "deterministic=true",
    "data.num_workers=1",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
]
# on top of the shared tiny CPT settings: batches of six (two a pool) over three epochs
CPT = [
    "cpt.simclr.batch_size=6",
    "cpt.simclr.max_epochs=3",
    "cpt.mae.batch_size=6",
    "cpt.mae.max_epochs=3",
]
DISTILL = [
    "model.img_size=64",
    "distill.batch_size=6",
    "distill.max_epochs=3",
    "distill.image_hidden=16",
    "distill.pixel_width=16",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_simclr, tiny_mae):
    """A 12-slice pool (two batches of six) and tiny SimCLR / MAE teachers for the image and patch levels."""
    root = tmp_path_factory.mktemp("resume")
    (root / "pool").mkdir()
    rng = np.random.default_rng(0)
    np.savez(root / "pool" / "vol.npz", image=rng.random((12, 64, 64), dtype=np.float32))
    torch.manual_seed(1)
    simclr = tiny_simclr(width=0.125, proj_hidden_dim=16, normalize="none", img_size=32)
    mae = tiny_mae(depth=1, num_heads=2, decoder_heads=2, normalize="none")
    save_teacher(simclr, root / "simclr.pt")
    save_teacher(mae, root / "mae.pt")
    return root


def stage_args(root: Path, runs: Path, stage: str, sub: str, tiny_cpt: list) -> list:
    """The command line of one run; COMMON comes after `tiny_cpt` so that its one data worker wins."""
    pool = f"cpt.sources=[{{path: '{root / 'pool'}', format: npz, intensity: none}}]"
    args = [stage, f"runs_dir={runs}", f"data.dir={root / 'demo'}", "data.name=demo", pool]
    if stage == "cpt":
        return args + tiny_cpt + CPT + COMMON + [f"cpt.teacher={sub}"]
    args += COMMON
    teacher = {"image": [f"distill.teacher={root / 'simclr.pt'}"], "patch": [f"distill.teacher={root / 'mae.pt'}"]}
    return args + DISTILL + [f"distill.level={sub}"] + teacher.get(sub, [])


def final_weights(runs: Path, stage: str, sub: str) -> dict:
    folder = runs / "t" / stage / sub
    if stage == "cpt":
        return torch.load(folder / "teacher.pt", map_location="cpu", weights_only=True)["state_dict"]
    return load_file(str(folder / "expert.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, sub",
    [("cpt", "simclr"), ("cpt", "mae"), ("distill", "image"), ("distill", "patch"), ("distill", "pixel")],
)
def test_a_stage_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(workspace, stage, sub, tiny_cpt):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), OMP_NUM_THREADS="1")
    killed_runs, whole_runs = workspace / f"killed-{sub}", workspace / f"whole-{sub}"
    args = stage_args(workspace, killed_runs, stage, sub, tiny_cpt)

    killed = subprocess.run(
        [sys.executable, str(KILLER), "1", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = killed_runs / "t" / stage / sub / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0  # one of three epochs done

    resumed = subprocess.run(
        [sys.executable, "-m", "samora_pl", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from {last}" in resumed.stderr  # it did continue from the checkpoint

    assert main(stage_args(workspace, whole_runs, stage, sub, tiny_cpt)) == 0
    got, want = final_weights(killed_runs, stage, sub), final_weights(whole_runs, stage, sub)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# two CPU processes on gloo: each rank gets half of the 12 slices, so batches of three keep two steps an epoch
DDP = ["trainer.devices=2", "cpt.simclr.batch_size=3", "cpt.mae.batch_size=3", "distill.batch_size=3"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, sub",
    [("cpt", "simclr"), ("cpt", "mae"), ("distill", "image"), ("distill", "patch"), ("distill", "pixel")],
)
def test_a_ddp_stage_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(
    workspace, stage, sub, tiny_cpt, subprocess_env
):
    """The same under DDP with two processes: the whole process group (both ranks, each with its data worker)
    is killed the moment rank zero's first last.ckpt is on disk, the same command continues from it, and the
    weights equal those of a two-process run that was never interrupted."""
    killed_runs, whole_runs = workspace / f"ddp-killed-{sub}", workspace / f"ddp-whole-{sub}"
    args = stage_args(workspace, killed_runs, stage, sub, tiny_cpt) + DDP

    def run(*command):
        # a session of its own: the killer takes its process group (rank 1 is a child of rank 0) down with it
        return subprocess.run(
            [sys.executable, *command],
            env=subprocess_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            start_new_session=True,
        )

    killed = run(str(KILLER), "1", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = killed_runs / "t" / stage / sub / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0  # one of three epochs done

    resumed = run("-m", "samora_pl", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from {last}" in resumed.stderr  # it did continue from the checkpoint

    whole = run("-m", "samora_pl", *stage_args(workspace, whole_runs, stage, sub, tiny_cpt), *DDP)
    assert whole.returncode == 0, whole.stderr[-3000:]
    got, want = final_weights(killed_runs, stage, sub), final_weights(whole_runs, stage, sub)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"

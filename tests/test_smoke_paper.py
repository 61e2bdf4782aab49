"""`make smoke-paper`: the paper profile at its real sizes, through the README's exact Synapse commands.

Every other test runs the tiny profile; this one runs `PROFILE=paper` (the default for DATA=synapse) as a user
with the public weights would: SAM ViT-B at 224 px, the SimCLRv2 R50-2x+SK and MAE ViT-L/16 teachers, each
started from a file written in its official layout:

- `sam_vit_b_01ec64.pth`: segment-anything's own builder (`sam_model_registry["vit_b"](checkpoint=None)`),
  its state dict saved as the release is, at 1024 px, so the loader's position-table resize to 224 runs;
- `mae_pretrain_vit_large.pth`: `{"model": <ViT-L/16 encoder in timm key names>}`, as MAE's release;
- `r50_2x_sk1.pth`: SimCLRv2-Pytorch's `convert.py` layout (`{"resnet": {"net.0.0.weight", ...}, "head": ...}`)
  at width 2 with selective kernels.

The commands are read from the README's "Real data" block and run by `make` (this checkout's Makefile, its
`samora` being this interpreter's `python -m samora_pl`) with the download, data and checkpoint paths moved
into a temporary folder and only sizes added to `ARGS`: one epoch of 2 batches of 2 per stage, no loader
workers, on the CPU. The data is a raw NIfTI download of one test and six training cases (64 x 64 in-plane,
8 slices), so `make prepare` runs too. The weight files are written once per test session (about 2.2 GB).
The wall time of each stage is printed (docs/design.md, section Tests and benchmarks, has the measured ones).
"""

import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from samora_pl.records.manifest import file_record
from tests.data_modules.prepare.test_raw import write_raw_synapse
from tests.samora_pl.models.teachers.test_simclrv2_keys import write_layout

REPO = Path(__file__).resolve().parents[1]
CASES = (1, 5, 6, 7, 9, 10, 21)  # case 1 is one of Synapse's 12 test cases, the others are training cases
SHAPE_XYZ = (64, 64, 8)
# the README's placeholders -> folders under the test's tmp
PLACES = {"/downloads/Synapse": "raw", "/data/Synapse": "data", "/ckpt": "ckpt"}
SMALL = {  # the stage's own keys: cpt and distill count epochs in cpt.<teacher>.max_epochs / distill.max_epochs
    "cpt": "cpt.simclr.batch_size=2 cpt.mae.batch_size=2 cpt.simclr.max_epochs=1 cpt.mae.max_epochs=1",
    "distill": "distill.batch_size=2 distill.max_epochs=1",
    "finetune": "data.batch_size=2 trainer.max_epochs=1 data.val_slices=2",
}
ON_CPU = "trainer.accelerator=cpu trainer.limit_train_batches=2 data.num_workers=0"
STAGES = ("prepare", "check", "cpt", "distill", "finetune")


def readme_commands() -> list:
    """The commands of the README's "Real data" code block, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Real data\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def official_checkpoints(tmp_path_factory):
    """(folder, seconds): the three public weight files in their release layouts (random values), written once
    per session."""
    started = time.time()
    folder = tmp_path_factory.mktemp("ckpt")
    from segment_anything import sam_model_registry
    from timm import create_model

    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), folder / "sam_vit_b_01ec64.pth")
    encoder = create_model("vit_large_patch16_224", pretrained=False, num_classes=0)
    torch.save({"model": encoder.state_dict()}, folder / "mae_pretrain_vit_large.pth")
    del encoder
    torch.save(write_layout(50, True, proj_dim=128, width=2.0), folder / "r50_2x_sk1.pth")
    yield folder, time.time() - started
    shutil.rmtree(folder, ignore_errors=True)  # 2.2 GB; pytest keeps the last few tmp folders


def make_command(line: str, tmp_path: Path) -> tuple:
    """(stage, argv) of one README line: make with this checkout's Makefile, the README's variables with the
    paths moved under `tmp_path`, and ARGS extended by the smoke sizes."""
    for placeholder, name in PLACES.items():
        line = line.replace(placeholder, str(tmp_path / name))
    words = shlex.split(line)
    assert words[0] == "make", line
    stage = words[1]
    variables = dict(word.split("=", 1) for word in words[2:])
    if stage in SMALL:
        variables["ARGS"] = " ".join(filter(None, (variables.get("ARGS"), SMALL[stage], ON_CPU)))
    stamp = "no-venv-stamp"  # the Makefile's venv stamp, never rebuilt here (-o): this interpreter runs samora
    argv = ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "-o", stamp, f"STAMP={stamp}"]
    argv += [f"SAMORA={sys.executable} -m samora_pl", stage, *(f"{k}={v}" for k, v in variables.items())]
    return stage, argv


def steps(folder: Path) -> int:
    """Optimiser steps the stage took, from its last.ckpt."""
    return torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


def manifest(path: Path) -> dict:
    data = json.loads((path / "manifest.json").read_text())
    assert data["status"] == "complete", path
    return data


def saved(folder: Path, key: str):
    return OmegaConf.select(OmegaConf.load(folder / "config.yaml"), key)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_readme_synapse_commands_run_the_paper_profile_at_its_real_sizes(tmp_path, official_checkpoints):
    lines = readme_commands()
    assert [line.split()[1] for line in lines] == list(STAGES), lines  # the README's chain, in order
    checkpoints, writing = official_checkpoints
    (tmp_path / "ckpt").symlink_to(checkpoints)
    write_raw_synapse(tmp_path / "raw", numbers=CASES, shape=SHAPE_XYZ)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    seconds, logs = {}, {}
    for line in lines:
        stage, argv = make_command(line, tmp_path)
        started = time.time()
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
        seconds[stage] = time.time() - started
        logs[stage] = done.stdout + done.stderr
        (tmp_path / f"{stage}.log").write_text(f"{shlex.join(argv)}\n{logs[stage]}")
        assert done.returncode == 0, f"{shlex.join(argv)}\n{logs[stage][-6000:]}"
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # GiB (ru_maxrss is in KiB)
    times = ", ".join(f"{stage} {t:.0f} s" for stage, t in seconds.items())
    print(f"\nsmoke-paper wall time: weight files {writing:.0f} s, {times}; peak RSS {peak:.1f} GiB", file=sys.stderr)

    runs = tmp_path / "runs" / "syn"
    assert "no problems found" in logs["check"], logs["check"]
    # the paper's sizes, not a smaller stand-in: the saved configs of the stages
    assert saved(runs / "cpt" / "simclr", "profile") == "paper"
    simclr_size = [saved(runs / "cpt" / "simclr", f"cpt.simclr.{k}") for k in ("depth", "width", "selective_kernel")]
    assert simclr_size == [50, 2.0, True], simclr_size
    assert saved(runs / "cpt" / "mae", "cpt.mae.variant") == "vit_large_patch16_224"
    for kind in ("simclr", "mae"):
        metrics = manifest(runs / "cpt" / kind)["metrics"]
        assert metrics["steps"] == 2 and metrics["epochs"] == 1, (kind, metrics)
        assert saved(runs / "cpt" / kind, f"cpt.{kind}.img_size") == 224
    simclr = manifest(runs / "cpt" / "simclr")["metrics"]["start_checkpoint"]  # the public file was loaded
    assert simclr["head"] == "loaded" and manifest(runs / "cpt" / "simclr")["metrics"]["normalize"] == "none"
    assert manifest(runs / "cpt" / "mae")["metrics"]["start_checkpoint"]["decoder"] == "initialised"
    # SAM's 1024-px tables resized to 224: pos_embed and the 4 global blocks' rel_pos_h / rel_pos_w
    assert re.search(r"loaded SAM checkpoint .*: \d+ tensors loaded, 9 resized", logs["distill"]), logs["distill"]
    sam = file_record(checkpoints / "sam_vit_b_01ec64.pth")["sha256"]
    for level in ("image", "patch", "pixel"):
        folder = runs / "distill" / level
        assert (folder / "expert.safetensors").is_file()
        assert manifest(folder)["metrics"]["epochs"] == 1 and steps(folder) == 2, level
        assert manifest(folder)["inputs"]["sam_checkpoint"]["sha256"] == sam, level  # recorded as CPT's teachers
        assert (saved(folder, "model.variant"), saved(folder, "model.img_size")) == ("vit_b", 224)
    (tune,) = (runs / "finetune").iterdir()
    assert steps(tune) == 2 and manifest(tune)["inputs"]["sam_checkpoint"]["sha256"] == sam
    assert saved(tune, "model.hl_init") == "paper" and saved(tune, "data.cache") is True
    metrics = json.loads((tune / "metrics.json").read_text())
    assert "mean_dice" in metrics and (tune / "results.csv").is_file(), metrics
    assert "hl_attn (hl_init=paper)" in (tune / "results.md").read_text()
    for big in (*runs.rglob("last.ckpt"), *runs.rglob("teacher.pt")):  # ~10 GB; logs and manifests stay
        big.unlink()

"""`samora cpt` end to end on a tiny pool: hand-off files, re-runs, bad input leaves nothing half-written."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from samora_pl.config.compose import compose
from samora_pl.config.plans import build_plan
from samora_pl.errors import SamoraError
from samora_pl.stages.cpt.run import load_teacher
from tests.data_modules.volume_writers import write_synapse_tree
from tests.stage_runs import run_stage as run


def teacher_file(cfg, kind: str) -> Path:
    """Where the planned CPT writes the `kind` teacher."""
    return build_plan(cfg).teacher_file(kind)


FAST_MAE = dict(img_size=32, depth=1, num_heads=2, decoder_heads=2)  # the MAE of tiny_cpt, for checkpoints


def test_tiny_profile_composes():
    cfg = compose("cpt", ["data.name=demo"])
    assert cfg.profile == "tiny"
    assert cfg.cpt.simclr.depth == 18 and cfg.cpt.mae.img_size == 128 and cfg.cpt.mae.patch_size == 16
    paper = compose("cpt", ["data.name=synapse", "cpt.simclr.from_scratch=true", "cpt.mae.from_scratch=true"])
    assert paper.cpt.simclr.width == 2.0 and paper.cpt.simclr.selective_kernel
    assert paper.cpt.mae.variant == "vit_large_patch16_224" and paper.cpt.mae.decoder_dim == 512


@pytest.mark.slow
def test_both_teachers_end_to_end_and_rerun(tmp_path, config):
    cfg = config(tmp_path)
    metrics = run(cfg)
    assert set(metrics) == {"simclr", "mae"}
    for kind in ("simclr", "mae"):
        folder = tmp_path / "runs" / "t" / "cpt" / kind
        for name in ("teacher.pt", "config.yaml", "manifest.json", "checkpoints/last.ckpt"):
            assert (folder / name).exists(), name
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["status"] == "complete" and "teacher.pt" in manifest["outputs"]
        assert manifest["inputs"]["pool"]["slices"] == 16
        assert manifest["inputs"]["pool"]["cases"] == [f"s{k:03d}" for k in range(16)]
        assert manifest["inputs"]["pool"]["excluded_cases"] == []  # a pool outside the dataset's folder
        assert metrics[kind]["steps"] == 2 and metrics[kind]["loss_first_epoch"] > 0
        events = EventAccumulator(str(tmp_path / "runs" / "t" / "tb" / "cpt" / kind))
        events.Reload()
        assert {"simclr": "cpt_simclr/views", "mae": "cpt_mae/reconstructions"}[kind] in events.Tags()["images"]
    assert metrics["mae"]["lr"] == pytest.approx(cfg.cpt.mae.base_lr * 8 / 256)  # base_lr x batch / 256

    simclr = load_teacher(teacher_file(cfg, "simclr"), kind="simclr")
    assert simclr.embed(torch.rand(2, 1, 32, 32)).shape == (2, 16)
    mae = load_teacher(teacher_file(cfg, "mae"), kind="mae")
    tokens, ids_keep, grid = mae.encode_visible(torch.rand(2, 1, 32, 32), 0.75)
    assert tokens.shape == (2, 1, 32) and grid == (2, 2) and mae.patch_size == 16

    # same settings: reused, nothing retrained
    stamp = teacher_file(cfg, "mae").stat().st_mtime_ns
    again = run(config(tmp_path))
    assert again["mae"]["loss_last_epoch"] == metrics["mae"]["loss_last_epoch"]
    assert teacher_file(cfg, "mae").stat().st_mtime_ns == stamp
    # other settings: refused, unless overwrite
    with pytest.raises(SamoraError, match="cpt.mae.mask_ratio"):
        run(config(tmp_path, "cpt.mae.mask_ratio=0.5"))
    redone = run(config(tmp_path, "cpt.mae.mask_ratio=0.5", "cpt.teacher=mae", "overwrite=true"))
    assert set(redone) == {"mae"} and teacher_file(cfg, "mae").stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_default_pool_of_a_dataset_leaves_out_its_test_volumes(tmp_path, tiny_cpt):
    root = write_synapse_tree(tmp_path / "synapse")  # 3 training cases x 4 slices; test case0001, case0002 x 5
    base = [f"runs_dir={tmp_path / 'runs'}", "run=t", "data.name=synapse", f"data.dir={root}", "profile=tiny"]
    run(compose("cpt", [*base, *tiny_cpt, "cpt.teacher=mae"]))
    manifest = json.loads((tmp_path / "runs" / "t" / "cpt" / "mae" / "manifest.json").read_text())
    pool = manifest["inputs"]["pool"]
    assert pool["cases"] == ["case0005", "case0006", "case0007"] and pool["slices"] == 12
    assert pool["excluded_cases"] == ["case0001", "case0002"] and pool["include_test_cases"] is False
    assert pool["included_test_cases"] == []
    opted = [*base, *tiny_cpt, "cpt.teacher=mae", "cpt.include_test_cases=true"]
    with pytest.raises(SamoraError, match="cpt.include_test_cases"):  # another pool: not mixed into the folder
        run(compose("cpt", opted))
    run(compose("cpt", [*opted, "overwrite=true"]))
    pool = json.loads((tmp_path / "runs" / "t" / "cpt" / "mae" / "manifest.json").read_text())["inputs"]["pool"]
    assert pool["cases"] == ["case0001", "case0002", "case0005", "case0006", "case0007"] and pool["slices"] == 22
    assert pool["excluded_cases"] == [] and pool["include_test_cases"] is True
    assert pool["included_test_cases"] == ["case0001", "case0002"]


@pytest.mark.slow
def test_interrupted_run_resumes_and_more_epochs_continue(tmp_path, config):
    first = run(config(tmp_path, "cpt.teacher=mae"))["mae"]
    folder = tmp_path / "runs" / "t" / "cpt" / "mae"
    (folder / "manifest.json").unlink()  # as if the process died after the last checkpoint
    resumed = run(config(tmp_path, "cpt.teacher=mae"))["mae"]
    assert resumed["steps"] == 2 and resumed["epoch_losses"] == first["epoch_losses"]
    longer = run(config(tmp_path, "cpt.teacher=mae", "cpt.mae.max_epochs=2"))["mae"]
    assert longer["steps"] == 4 and len(longer["epoch_losses"]) == 2
    assert longer["epoch_losses"][0] == first["epoch_losses"][0]


def test_bad_pool_stops_before_training(tmp_path, config, npz_pool):
    npz_pool(tmp_path / "pool")
    (tmp_path / "pool" / "zz_broken.npz").write_bytes(b"truncated")
    with pytest.raises(SamoraError, match="zz_broken.npz"):
        run(config(tmp_path))
    assert not (tmp_path / "runs" / "t" / "cpt" / "simclr").exists()
    metrics = run(config(tmp_path, "cpt.skip_bad_files=true", "cpt.teacher=simclr"))
    assert metrics["simclr"]["pool_slices"] == 16


def test_empty_pool(tmp_path, config):
    (tmp_path / "pool").mkdir()
    with pytest.raises(SamoraError, match="empty"):
        run(config(tmp_path))


def test_checkpoint_of_another_architecture(tmp_path, config, tiny_mae):
    wrong = tmp_path / "mae_pretrain.pth"
    torch.save(
        {"model": tiny_mae(**FAST_MAE).state_dict()},
        wrong,
    )
    with pytest.raises(SamoraError, match="none of the layouts the teacher reads"):
        run(config(tmp_path, f"cpt.simclr.checkpoint={wrong}", "cpt.teacher=simclr"))
    folder = tmp_path / "runs" / "t" / "cpt" / "simclr"
    assert not (folder / "teacher.pt").exists() and not (folder / "manifest.json").exists()


def test_public_mae_checkpoint_is_the_starting_point(tmp_path, config, tiny_mae):
    torch.manual_seed(3)
    donor = tiny_mae(**FAST_MAE)
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    torch.save({"model": donor.state_dict()}, path)
    run(config(tmp_path, f"cpt.mae.checkpoint={path}", "cpt.teacher=mae", "cpt.mae.base_lr=0"))
    folder = tmp_path / "runs" / "t" / "cpt" / "mae"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["start_checkpoint"]["decoder"] == "loaded"
    assert "public_checkpoint" in manifest["inputs"]
    trained = load_teacher(folder / "teacher.pt")
    assert torch.equal(trained.blocks[0].attn.qkv.weight, donor.blocks[0].attn.qkv.weight)  # lr 0: unchanged


@pytest.mark.slow
def test_zero_epochs_keep_the_starting_weights_and_more_epochs_train_them(tmp_path, config, tiny_mae):
    torch.manual_seed(3)
    donor = tiny_mae(**FAST_MAE)
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    torch.save({"model": donor.state_dict()}, path)
    start = [f"cpt.mae.checkpoint={path}", "cpt.teacher=mae"]
    metrics = run(config(tmp_path, *start, "cpt.mae.max_epochs=0"))["mae"]  # the cpt ablation's "without"
    assert metrics["epochs"] == 0 and metrics["steps"] == 0 and metrics["loss_last_epoch"] is None
    folder = tmp_path / "runs" / "t" / "cpt" / "mae"
    untrained = load_teacher(folder / "teacher.pt")
    assert all(torch.equal(a, b) for a, b in zip(untrained.state_dict().values(), donor.state_dict().values()))
    trained = run(config(tmp_path, *start))["mae"]  # max_epochs=1 later: trained, not the 0-epoch file reused
    assert trained["epochs"] == 1 and trained["steps"] == 2
    weight = load_teacher(folder / "teacher.pt").blocks[0].attn.qkv.weight
    assert not torch.equal(weight, donor.blocks[0].attn.qkv.weight)


def test_bad_cpt_settings(tmp_path, config):
    with pytest.raises(SamoraError, match="cpt.simclr.depth"):
        run(config(tmp_path, "cpt.simclr.depth=20"))
    with pytest.raises(SamoraError, match=r"cpt.sources\[0\].format"):
        run(compose("cpt", [f"runs_dir={tmp_path}", "cpt.sources=[{path: x, format: jpeg}]"]))
    with pytest.raises(SamoraError, match=r"cpt.sources\[0\].path is not set"):
        run(compose("cpt", [f"runs_dir={tmp_path}", "cpt.sources=[{format: la}]"]))


def test_demo_pool_is_the_default(tmp_path, monkeypatch, npz_pool):
    import data_modules.labelled.demo as demo
    from data_modules.pool.unlabeled import pool_sources

    def fake_demo(root, **_):
        npz_pool(Path(root) / "unlabeled", count=2)
        return Path(root)

    monkeypatch.setattr(demo, "ensure_demo", fake_demo)
    cfg = compose("cpt", ["data.name=demo", f"data.dir={tmp_path / 'demo'}"])
    sources = pool_sources(build_plan(cfg).pool)
    assert sources == [
        {
            "path": str(tmp_path / "demo" / "unlabeled"),
            "format": "npz",
            "intensity": "none",
            "axis": None,
            "key": "image",
        }
    ]


@pytest.mark.slow
def test_both_teachers_train_in_bf16_mixed(tmp_path, config):
    """PRECISION=bf16-mixed on CPU: a few steps of each teacher, finite losses, float32 teacher weights."""
    metrics = run(config(tmp_path, "trainer.precision=bf16-mixed"))
    for kind in ("simclr", "mae"):
        assert metrics[kind]["steps"] == 2 and np.isfinite(metrics[kind]["loss_last_epoch"])
        teacher = load_teacher(teacher_file(config(tmp_path), kind), kind=kind)
        assert all(p.dtype == torch.float32 for p in teacher.parameters())

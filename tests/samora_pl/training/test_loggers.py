"""Config key `logger`: every stage's scalars and pictures reach the chosen tracker (training/loggers.py,
training/images.py), read back here from the CSV files and the MLflow file store, offline."""

import csv
import importlib.util

import pytest
import torch
from PIL import Image

from samora_pl.cli import main
from samora_pl.config import choices
from samora_pl.config.compose import compose
from samora_pl.errors import SamoraError
from samora_pl.training import loggers as trackers
from samora_pl.training.images import log_image, png_name, to_uint8
from tests.stage_runs import planned

# a fine-tune on the demo data, mode=samora with untrained experts (HL-Attn still logs its gates), no test volumes
FINETUNE = ("finetune.zero_experts=true", "finetune.evaluate=false", "finetune.tag=ft")
FUSION_SCALARS = {f"fusion/block{i:02d}/g1" for i in range(4)}  # the tiny SAM's 4 blocks


def test_every_tracker_is_a_choice_with_a_folder():
    assert choices.LOGGERS[0] == "tensorboard" and set(choices.LOGGERS) == set(trackers.FOLDERS)
    assert compose("finetune").logger == "tensorboard"  # the default stays TensorBoard
    assert compose("finetune", ["logger=csv"]).logger == "csv"


def test_an_unknown_tracker_is_refused_naming_the_allowed_ones():
    with pytest.raises(SamoraError) as err:
        compose("finetune", ["logger=neptune"])
    assert all(kind in str(err.value) for kind in choices.LOGGERS)


@pytest.mark.parametrize("kind", ["mlflow", "wandb"])
def test_a_tracker_without_its_package_names_the_pip_package(kind, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    with pytest.raises(SamoraError) as err:
        compose("finetune", [f"logger={kind}"])
    assert f"pip install {kind}" in str(err.value) and "'logger'" in str(err.value)


def test_pictures_become_uint8_and_csv_keeps_them_as_png(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    rgb = torch.rand(3, 5, 7)
    assert to_uint8(rgb).shape == (5, 7, 3) and to_uint8(rgb).dtype.name == "uint8"
    assert to_uint8(torch.ones(1, 5, 7)).shape == (5, 7) and int(to_uint8(torch.ones(1, 5, 7)).max()) == 255
    logger = trackers.build_logger("csv", tmp_path, "stage", "sub")
    assert isinstance(logger, CSVLogger)
    log_image(logger, "val/slice truth", rgb, 12)
    path = tmp_path / "stage" / "sub" / "images" / png_name("val/slice truth", 12)
    assert path.name == "val__slice_truth_step000012.png"
    assert Image.open(path).size == (7, 5)


def _csv_rows(folder) -> list:
    with open(folder / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_csv_tracker_gets_a_finetunes_scalars_and_pictures(tmp_path, quick):
    assert main(["finetune", *quick(*FINETUNE, "logger=csv")]) == 0
    run = tmp_path / "runs" / "t"
    assert not (run / "tb").exists()  # the chosen tracker only
    folder = run / "csv" / "finetune" / "ft"
    rows = _csv_rows(folder)
    columns = set(rows[0])
    assert {"train/loss_step", "val/loss", "val/mean_dice", "val_dice/liver"} <= columns
    assert any(column.startswith("lr-") for column in columns)  # the learning-rate monitor
    assert columns >= FUSION_SCALARS  # the fusion diagnostics callback's scalars too
    assert any(row["val/mean_dice"] not in ("", None) for row in rows)
    pictures = sorted(p.name for p in (folder / "images").glob("*.png"))
    assert pictures and all(name.startswith("val__slice_truth_prediction_step") for name in pictures)
    assert Image.open(folder / "images" / pictures[0]).mode == "RGB"


@pytest.mark.slow
def test_mlflow_tracker_gets_a_finetunes_scalars_and_pictures(tmp_path, quick):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    assert main(["finetune", *quick(*FINETUNE, "logger=mlflow")]) == 0
    store = tmp_path / "runs" / "t" / "mlruns"
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("finetune")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.data.tags["mlflow.runName"] == "ft"
    assert {"train/loss_step", "val/mean_dice", "val_dice/liver"} | FUSION_SCALARS <= set(found.data.metrics)
    assert 0.0 <= found.data.metrics["val/mean_dice"] <= 1.0
    images = [a.path for a in client.list_artifacts(found.info.run_id, "images")]
    assert any(path.split("/")[-1].startswith("val~slice_truth_prediction+step") for path in images), images
    assert any(path.endswith(".png") for path in images)


@pytest.mark.slow
def test_cpt_and_distill_pictures_reach_the_csv_tracker(tmp_path, tiny_cpt, tiny_pixel, npz_pool):
    """The stage-1 modules draw through the same helper: SimCLR's views and the pixel expert's reconstructions
    land as PNG files beside their CSV metrics."""
    pool = npz_pool(tmp_path / "pool", count=8)
    common = [
        f"runs_dir={tmp_path / 'runs'}",
        "run=t",
        f"data.dir={tmp_path / 'demo'}",
        "logger=csv",
        "trainer.image_log_every_n_epochs=1",
        f"cpt.sources=[{{path: '{pool}', format: npz, intensity: none}}]",
    ]
    assert main(["cpt", *common, *tiny_cpt, "cpt.teacher=simclr"]) == 0
    folder = tmp_path / "runs" / "t" / "csv" / "cpt" / "simclr"
    assert "cpt_simclr/loss_step" in _csv_rows(folder)[0]
    assert list((folder / "images").glob("cpt_simclr__views_step*.png"))
    assert main(["distill", *common, *tiny_pixel, "distill.max_epochs=1", "trainer.log_every_n_steps=1"]) == 0
    folder = tmp_path / "runs" / "t" / "csv" / "distill" / "pixel"
    assert list((folder / "images").glob("distill__noisy_clean_reconstruction_step*.png"))


@pytest.mark.slow
def test_wandb_tracker_writes_offline_runs_with_pictures(tmp_path, quick, monkeypatch):
    """wandb is optional (not a dependency): offline under the run, never a server; two stages in one process."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["finetune", *quick(*FINETUNE, "logger=wandb")]) == 0
    assert main(["finetune", *quick(*FINETUNE[:-1], "finetune.tag=second", "logger=wandb")]) == 0
    runs = sorted((tmp_path / "runs" / "t" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    for run in runs:
        assert list(run.glob("*.wandb"))
        assert list((run / "files" / "media" / "images").rglob("*.png"))
    import wandb

    wandb.finish()  # the last stage's run, left open as Lightning leaves it


def test_probe_scores_reach_the_csv_tracker(tmp_path):
    """`samora probe` writes its scores with a SummaryWriter under tb/; another tracker gets them as metrics."""
    from samora_pl.stages.probe import _write_events

    plan = planned("probe", [f"runs_dir={tmp_path / 'runs'}", "run=t", "logger=csv"])
    _write_events(
        plan.logger, plan.folders.root, {"expert_image": {"linear_bacc": 0.75, "knn_auroc": float("nan")}}, "| table |"
    )
    (row,) = _csv_rows(tmp_path / "runs" / "t" / "csv" / "probe" / "results")
    assert float(row["probe/expert_image/linear_bacc"]) == 0.75 and "probe/expert_image/knn_auroc" not in row
    assert not (tmp_path / "runs" / "t" / "tb").exists()

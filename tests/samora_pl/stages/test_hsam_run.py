"""End to end: an H-SAM fine-tune (`mode=samed model.decoder=hsam`) evaluates every organ, and `samora predict`
on that run writes label maps that score exactly as its results.csv."""

import csv

import h5py
import numpy as np
import pytest

from data_modules.io.volume_io import read_image
from data_modules.labelled.demo import ensure_demo
from samora_pl.cli import main
from samora_pl.config.compose import compose
from samora_pl.config.plans import build_plan
from samora_pl.errors import SamoraError
from samora_pl.evaluation.metrics import case_metrics
from samora_pl.stages.finetune.evaluate import load_finetuned
from samora_pl.stages.finetune.run import FINAL
from tests.data_modules.volume_writers import finetune_overrides


@pytest.mark.slow
def test_hsam_finetune_then_predict_scores_as_results_csv(tmp_path):
    data = ensure_demo(tmp_path / "data", n_train=2, n_test=2, size=32, min_slices=8, max_slices=8, n_unlabeled=0)
    assert main(["finetune", *finetune_overrides(tmp_path, "synapse", data), "model.decoder=hsam"]) == 0
    folder = tmp_path / "runs" / "t" / "finetune" / "samed-lora-hsam-f1"
    assert (folder / FINAL).is_file()
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["class_id"]) for r in rows}) == list(range(1, 9))
    out = tmp_path / "pred"
    cases = sorted((data / "test_vol_h5").glob("*.npy.h5"))
    args = ["predict", f"runs_dir={tmp_path / 'runs'}", "run=t", "finetune.tag=samed-lora-hsam-f1"]
    assert main([*args, f"predict.input={data / 'test_vol_h5'}", f"predict.output={out}"]) == 0
    for path in cases:
        case = path.name.split(".")[0]
        pred, _ = read_image(out / f"{case}_pred.nii.gz")
        with h5py.File(path) as f:
            label = np.asarray(f["label"])
        scored = {m["class_id"]: m["dice"] for m in case_metrics(pred, label, 8)}
        for r in (r for r in rows if r["case"] == case):
            assert scored[int(r["class_id"])] == pytest.approx(float(r["dice"]), abs=1e-12), (case, r["class_id"])
    # a model of the other decoder refuses these weights with one message
    sam = compose("finetune", finetune_overrides(tmp_path, "synapse", data))
    with pytest.raises(SamoraError, match="holds a model.decoder=hsam model but the run is configured with"):
        load_finetuned(build_plan(sam), folder / FINAL)

"""`samora predict` with a tiny fine-tuned run: NIfTI / MHD / h5 in, label maps out in the source frame, equal to
the model's protocol prediction computed directly."""

import h5py
import numpy as np
import pytest
from matplotlib.image import imread

from data_modules.io.readers import intensity as scale_intensity
from data_modules.io.volume_io import Geometry, read_image, write_image
from data_modules.labelled.demo import ensure_demo
from samora_pl.cli import main
from samora_pl.config.compose import compose, load_saved
from samora_pl.config.plans import build_plan
from samora_pl.errors import SamoraError
from samora_pl.evaluation import predict_volume
from samora_pl.stages.finetune.evaluate import load_finetuned
from samora_pl.stages.finetune.run import FINAL
from samora_pl.stages.predict import dataset_intensity, read_volume
from tests.data_modules.volume_writers import GEOMETRY, finetune_folder, finetune_overrides, write_promise12

NO_SAM = "model.checkpoint=none"  # the paper profile, composed only: no SAM weights needed

OTHER = Geometry(
    spacing=(2.0, 1.25, 0.9), origin=(5.0, -3.0, 100.0), direction=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)
)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """A finished SAMed fine-tune (tiny, 64 px, 2 steps) on a small Synapse-layout set; returns its runs parent."""
    root = tmp_path_factory.mktemp("predict")
    data = ensure_demo(root / "data", n_train=2, n_test=1, size=32, min_slices=8, max_slices=8, n_unlabeled=0)
    assert main(["finetune", *finetune_overrides(root, "synapse", data), "finetune.evaluate=false"]) == 0
    return root


def predict_args(root, source, out, *extra):
    return ["predict", f"runs_dir={root / 'runs'}", "run=t", f"predict.input={source}", f"predict.output={out}", *extra]


def direct_prediction(root, image: np.ndarray, mode: str) -> np.ndarray:
    folder = finetune_folder(root)
    saved = load_saved(folder / "config.yaml")
    model = load_finetuned(build_plan(saved), folder / FINAL).eval()
    return predict_volume(model, scale_intensity(image, mode), saved.model.img_size, resize=saved.eval.resize)


@pytest.mark.slow
def test_nifti_and_mhd_predictions_keep_the_source_frame(run_root, tmp_path):
    rng = np.random.default_rng(0)
    ct = rng.uniform(-300.0, 400.0, (5, 40, 36)).astype(np.float32)  # raw HU: auto applies the CT window
    mr = rng.uniform(0.0, 900.0, (3, 24, 20)).astype(np.int16)
    source = tmp_path / "in"
    write_image(source / "ct.nii.gz", ct, GEOMETRY)
    write_image(source / "sub" / "mr.mhd", mr, OTHER)
    write_image(source / "sub" / "mr_segmentation.mhd", np.zeros_like(mr, np.uint8), OTHER)  # a label: skipped
    out = tmp_path / "out"
    assert main(predict_args(run_root, source, out)) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["ct_pred.nii.gz", "sub/mr_pred.nii.gz"]
    for name, image, geometry in (("ct_pred.nii.gz", ct, GEOMETRY), ("sub/mr_pred.nii.gz", mr, OTHER)):
        label, got = read_image(out / name)
        assert label.shape == image.shape and label.min() >= 0 and label.max() <= 8
        for field in ("spacing", "origin", "direction"):
            np.testing.assert_allclose(getattr(got, field), getattr(geometry, field), atol=1e-5)
        assert np.array_equal(label, direct_prediction(run_root, image, "ct_window"))


@pytest.mark.slow
def test_h5_volume_with_overlay_and_a_forced_intensity(run_root, tmp_path):
    image = np.random.default_rng(1).uniform(0.0, 1.0, (4, 32, 32)).astype(np.float32)
    with h5py.File(tmp_path / "case0099.npy.h5", "w") as f:
        f["image"] = image
    out = tmp_path / "out"
    args = predict_args(run_root, tmp_path / "case0099.npy.h5", out, "predict.overlay=true", "predict.overlay_slices=2")
    assert main(args) == 0
    label, geometry = read_image(out / "case0099_pred.nii.gz")
    assert geometry == Geometry() and np.array_equal(label, direct_prediction(run_root, image, "none"))
    assert imread(out / "case0099_overlay.png").ndim == 3

    assert main([*args[:-2], "predict.intensity=mr_percentile", f"predict.output={tmp_path / 'mr'}"]) == 0
    label, _ = read_image(tmp_path / "mr" / "case0099_pred.nii.gz")
    assert np.array_equal(label, direct_prediction(run_root, image, "mr_percentile"))


def test_bad_inputs_are_one_clear_error(run_root, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a volume")
    (tmp_path / "empty").mkdir()
    volume = write_image(tmp_path / "vol" / "a.nii.gz", np.zeros((2, 8, 8), np.float32), Geometry())
    out = tmp_path / "out"
    cases = [
        (predict_args(run_root, tmp_path / "notes.txt", out), "unknown volume format"),
        (predict_args(run_root, tmp_path / "empty", out), "no volumes to predict"),
        (predict_args(run_root, tmp_path / "missing", out), "does not exist"),
        (predict_args(run_root, volume, out, "finetune.tag=nope"), "No fine-tuned model at"),
        (predict_args(tmp_path, volume, out), "No finished fine-tuning"),
    ]
    for args, words in cases:
        assert main(args) == 1
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.slow
def test_la_h5_is_transposed_and_auto_intensity_follows_the_dataset(tmp_path):
    stored = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # LA's (W, H, D)
    with h5py.File(tmp_path / "mri_norm2.h5", "w") as f:
        f["image"] = stored
    assert np.array_equal(read_volume(tmp_path / "mri_norm2.h5", "la")[0], stored.transpose(2, 1, 0))
    assert np.array_equal(read_volume(tmp_path / "mri_norm2.h5", "synapse")[0], stored)

    root = write_promise12(tmp_path / "promise", train=(0,), test=(12,))
    plain = compose("finetune", ["data.name=promise12", f"data.dir={root}", NO_SAM])
    assert dataset_intensity(build_plan(plain).source) == "mr_percentile"
    forced = compose("finetune", ["data.name=promise12", f"data.dir={root}", "data.intensity=ct_window", NO_SAM])
    assert dataset_intensity(build_plan(forced).source) == "ct_window"
    assert (
        dataset_intensity(build_plan(compose("finetune", ["data.name=synapse", NO_SAM])).source) is None
    )  # stored windowed
    with pytest.raises(SamoraError, match="set predict.intensity="):
        dataset_intensity(
            build_plan(compose("finetune", ["data.name=la", f"data.dir={tmp_path / 'gone'}", NO_SAM])).source
        )

"""`samora prepare` on tiny raw downloads of Synapse, PROMISE12 and LA: layout, values, idempotence, refusals."""

import json
import os

import h5py
import nibabel
import numpy as np
import pytest

from data_modules import build_datamodule
from data_modules.io.volume_io import read_image, write_image
from data_modules.prepare.raw import MANIFEST, SYNAPSE_LABELS, prepare
from samora_pl.cli import main
from samora_pl.errors import SamoraError
from tests.data_modules.volume_writers import GEOMETRY, LA_IDS, finetune_overrides, write_la, write_promise12

SHAPE_XYZ = (32, 28, 4)  # nibabel order of the raw files; prepared arrays are (4, 28, 32)


def raw_case(seed: int, shape=SHAPE_XYZ) -> tuple[np.ndarray, np.ndarray]:
    """(HU image, label with every raw organ id 0..13), both in nibabel's (x, y, z) order; `shape` has at
    least 4 slices."""
    rng = np.random.default_rng(seed)
    hu = rng.uniform(-1000.0, 1000.0, shape).astype(np.float32)
    hu[0, 0, :4] = [-125.0, 75.0, 275.0, 1000.0]  # window edges and the middle, exactly
    label = ((np.arange(np.prod(shape)) + seed) % 14).reshape(shape).astype(np.uint8)
    return hu, label


def write_raw_synapse(root, numbers=(1, 5, 6), shape=SHAPE_XYZ):
    """The release's layout: RawData/Training/img/img00XX.nii.gz and .../label/label00XX.nii.gz (nibabel),
    each case of `shape` (x, y, z)."""
    folder = root / "RawData" / "Training"
    (folder / "img").mkdir(parents=True)
    (folder / "label").mkdir()
    for number in numbers:
        hu, label = raw_case(number, shape)
        affine = np.diag([-0.7, -0.7, 3.0, 1.0])  # BTCV-like flipped axes: voxel order must still follow nibabel
        nibabel.save(nibabel.Nifti1Image(hu, affine), str(folder / "img" / f"img{number:04d}.nii.gz"))
        nibabel.save(nibabel.Nifti1Image(label, affine), str(folder / "label" / f"label{number:04d}.nii.gz"))
    return root


def snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def synapse_raw(tmp_path):
    return write_raw_synapse(tmp_path / "raw")


# ------------------------------------------------------------------------------------------ synapse


def test_synapse_layout_window_and_label_map(synapse_raw, tmp_path):
    out = tmp_path / "out"
    summary = prepare("synapse", synapse_raw, out, progress=False)
    assert summary["test volumes"] == 1 and summary["training slices"] == 8
    lists = out / "lists" / "lists_Synapse"
    assert (lists / "test_vol.txt").read_text() == "case0001\n"
    assert (lists / "train.txt").read_text().split() == [f"case000{c}_slice00{z}" for c in (5, 6) for z in range(4)]

    # the reference: nibabel array transposed (2, 1, 0), window, 13 -> 8
    for number, case in ((1, "case0001"), (5, "case0005")):
        hu, raw_label = (a.transpose(2, 1, 0) for a in raw_case(number))
        if number == 1:
            with h5py.File(out / "test_vol_h5" / f"{case}.npy.h5", "r") as f:
                image, label = f["image"][()], f["label"][()]
        else:
            slices = [np.load(out / "train_npz" / f"{case}_slice{z:03d}.npz") for z in range(4)]
            assert all(set(s.files) == {"image", "label"} for s in slices)
            image, label = np.stack([s["image"] for s in slices]), np.stack([s["label"] for s in slices])
        assert image.dtype == label.dtype == np.float32 and image.shape == (4, 28, 32)
        np.testing.assert_allclose(image, (np.clip(hu, -125, 275) + 125) / 400, atol=1e-6)
        np.testing.assert_allclose(image[:, 0, 0], [0.0, 0.5, 1.0, 1.0], atol=1e-6)
        for raw_id in range(14):
            assert (label[raw_label == raw_id] == SYNAPSE_LABELS.get(raw_id, 0)).all(), raw_id
    assert SYNAPSE_LABELS == {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dataset"] == "synapse" and manifest["source"] == str(synapse_raw.resolve())
    assert manifest["status"] == "complete" and set(manifest["units"]) == {"case0001", "case0005", "case0006"}
    assert build_datamodule("synapse", root=out, img_size=32).validate()["test_volumes"] == 1


@pytest.mark.slow
def test_prepared_synapse_fine_tunes_through_the_cli(synapse_raw, tmp_path):
    out = tmp_path / "synapse"
    assert main(["prepare", "data.name=synapse", f"prepare.raw={synapse_raw}", f"prepare.out={out}"]) == 0
    assert main(["finetune", *finetune_overrides(tmp_path, "synapse", out)]) == 0
    assert (tmp_path / "runs" / "t" / "finetune" / "samed-lora-f1" / "metrics.json").is_file()


def test_second_run_writes_nothing_and_a_changed_case_is_redone(synapse_raw, tmp_path, caplog):
    out = tmp_path / "out"
    prepare("synapse", synapse_raw, out, progress=False)
    before = snapshot(out)
    with caplog.at_level("INFO"):
        summary = prepare("synapse", synapse_raw, out, progress=False)
    assert summary["files_written"] == 0 and snapshot(out) == before
    assert "nothing written" in caplog.text

    image = synapse_raw / "RawData" / "Training" / "img" / "img0006.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    summary = prepare("synapse", synapse_raw, out, progress=False)
    assert summary["cases_written"] == 1 and summary["files_written"] == 4
    changed = {f for f, t in snapshot(out).items() if before.get(f) != t}
    assert changed == {f"train_npz/case0006_slice00{z}.npz" for z in range(4)} | {MANIFEST}


def test_refuses_an_out_with_another_dataset_or_foreign_files(synapse_raw, tmp_path):
    promise_out = tmp_path / "promise"
    prepare("promise12", write_promise12(tmp_path / "promise_raw", train=(0,), test=(12,)), promise_out, progress=False)
    with pytest.raises(SamoraError, match="promise12 prepared from .*overwrite=true"):
        prepare("synapse", synapse_raw, promise_out, progress=False)

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(SamoraError, match="did not write"):
        prepare("synapse", synapse_raw, user, progress=False)

    prepare("synapse", synapse_raw, promise_out, overwrite=True, progress=False)
    left = {p.name for p in promise_out.iterdir()}
    assert not any(name.startswith("Case") for name in left) and {"train_npz", "test_vol_h5"} <= left
    prepare("synapse", synapse_raw, user, overwrite=True, progress=False)
    assert (user / "notes.txt").read_text() == "mine"  # files prepare did not write are left alone


def test_bad_synapse_inputs_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamoraError, match="no 'img' folder"):
        prepare("synapse", tmp_path / "empty", tmp_path / "o1", progress=False)

    raw = write_raw_synapse(tmp_path / "shape")
    label = raw / "RawData" / "Training" / "label" / "label0005.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((32, 28, 5), np.uint8), np.eye(4)), str(label))
    with pytest.raises(SamoraError, match=f"{label}: label shape"):
        prepare("synapse", raw, tmp_path / "o2", progress=False)

    raw = write_raw_synapse(tmp_path / "broken")
    image = raw / "RawData" / "Training" / "img" / "img0006.nii.gz"
    image.write_bytes(b"not a nifti file")
    with pytest.raises(SamoraError, match=str(image)):
        prepare("synapse", raw, tmp_path / "o3", progress=False)

    raw = write_raw_synapse(tmp_path / "ids")
    label = raw / "RawData" / "Training" / "label" / "label0001.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.full((32, 28, 4), 14, np.uint8), np.eye(4)), str(label))
    with pytest.raises(SamoraError, match=f"{label}: label has values 14 that are not class ids"):
        prepare("synapse", raw, tmp_path / "o4", progress=False)


def test_cli_without_raw_is_one_clear_error(tmp_path, capsys):
    assert main(["prepare", "data.name=synapse", f"prepare.out={tmp_path / 'o'}"]) == 1
    err = capsys.readouterr().err
    assert "prepare.raw (RAW)" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ promise12


def test_promise12_from_several_parts_is_flattened_with_geometry(tmp_path):
    raw = tmp_path / "raw"
    write_promise12(raw / "TrainingData_Part1", train=(0, 1), test=(12,))
    write_promise12(raw / "TrainingData_Part2", train=(2,), test=(13, 16), seed=1)
    out = tmp_path / "out"
    prepare("promise12", raw, out, progress=False)
    cases = ["Case00", "Case01", "Case02", "Case12", "Case13", "Case16"]
    expected = {f"{c}{s}" for c in cases for s in (".mhd", ".raw", "_segmentation.mhd", "_segmentation.raw")}
    assert {p.name for p in out.iterdir() if p.is_file()} == expected | {MANIFEST}
    assert (out / "lists" / "test.txt").read_text().split() == ["Case12", "Case13", "Case16"]
    assert (out / "lists" / "train.txt").read_text().split() == ["Case00", "Case01", "Case02"]
    image, geometry = read_image(out / "Case13.mhd")
    source, source_geometry = read_image(raw / "TrainingData_Part2" / "Case13.mhd")
    assert geometry == source_geometry == GEOMETRY and np.array_equal(image, source) and image.dtype == source.dtype
    data = build_datamodule("promise12", root=out, img_size=32)
    assert data.test_cases() == ["Case12", "Case13", "Case16"]


def test_promise12_refuses_a_case_twice_or_without_segmentation(tmp_path):
    raw = tmp_path / "raw"
    write_promise12(raw / "a", train=(0,), test=(12,))
    write_promise12(raw / "b", train=(0,), test=())
    with pytest.raises(SamoraError, match="Case00 is also at"):
        prepare("promise12", raw, tmp_path / "out", progress=False)
    write_image(tmp_path / "lone" / "Case03.mhd", np.zeros((2, 4, 4), np.int16), GEOMETRY)
    with pytest.raises(SamoraError, match="no Case03_segmentation.mhd beside it"):
        prepare("promise12", tmp_path / "lone", tmp_path / "out2", progress=False)


# ------------------------------------------------------------------------------------------ la


def test_la_is_linked_listed_and_indexed(tmp_path):
    raw = write_la(tmp_path / "raw" / "data")
    out = tmp_path / "out"
    prepare("la", tmp_path / "raw", out, progress=False)
    for case in LA_IDS:
        target = out / "2018LA_Seg_Training Set" / case / "mri_norm2.h5"
        source = raw / "2018LA_Seg_Training Set" / case / "mri_norm2.h5"
        assert target.read_bytes() == source.read_bytes()
        assert target.stat().st_ino == source.stat().st_ino  # same file system: a hard link
    assert (out / "train.list").read_text() == (raw / "train.list").read_text()
    assert json.loads((out / "index.json").read_text()) == {case: [20, 24, 6] for case in LA_IDS}  # stored (W, H, D)
    assert build_datamodule("la", root=out, img_size=32).test_cases() == list(LA_IDS[3:])
    assert prepare("la", tmp_path / "raw", out, progress=False)["files_written"] == 0


def test_la_without_lists_writes_none_and_bad_labels_are_refused(tmp_path):
    raw = write_la(tmp_path / "raw", lists=False)
    prepare("la", raw, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "train.list").exists() and (tmp_path / "out" / "index.json").is_file()

    path = raw / "2018LA_Seg_Training Set" / LA_IDS[1] / "mri_norm2.h5"
    with h5py.File(path, "r+") as f:
        f["label"][0, 0, 0] = 2
    with pytest.raises(SamoraError, match=f"{path}: label has values 2 that are not class ids"):
        prepare("la", raw, tmp_path / "out2", progress=False)
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((4, 4, 2), np.float32)
    with pytest.raises(SamoraError, match=f"{path} has no 'label' dataset"):
        prepare("la", raw, tmp_path / "out3", progress=False)

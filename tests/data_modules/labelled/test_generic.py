"""GenericDataModule on tiny MSD / nnU-Net trees (NIfTI with non-unit spacing and a rotated frame): labels from
dataset.json, splits, intensity defaults, geometry, bad inputs, CLI fine-tune."""

import csv
import json
from functools import partial

import nibabel
import numpy as np
import pytest

from data_modules import build_datamodule
from data_modules.io.volume_io import Geometry, write_image
from data_modules.labelled.generic import GenericDataModule
from samora_pl.cli import main
from samora_pl.errors import SamoraError
from tests.data_modules.volume_writers import (
    GEOMETRY,
    finetune_folder,
    finetune_overrides,
    small_datamodule,
    write_generic,
)

TRAIN = ["liver_0", "liver_1", "liver_2", "liver_3", "liver_4"]


dm_for = partial(small_datamodule, GenericDataModule)


@pytest.fixture
def msd_root(tmp_path):
    return write_generic(tmp_path / "Task03_Liver")


@pytest.mark.parametrize("nnunet", [False, True])
def test_labels_from_dataset_json_both_styles(tmp_path, nnunet):
    root = write_generic(tmp_path / "d", nnunet=nnunet)
    dm = build_datamodule("generic", root=root, img_size=32)
    assert isinstance(dm, GenericDataModule)
    assert dm.num_classes == 2 and dm.class_names == ["liver", "tumour"]
    assert sorted(dm.split().train + dm.test_cases()) == TRAIN  # `_0000` channel suffix dropped
    assert dm.intensity == "ct_window"


def test_seeded_split_is_deterministic_and_written(tmp_path, msd_root):
    (msd_root / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"macOS resource fork")  # skipped
    dm = dm_for(msd_root, split_seed=1, split_dir=tmp_path / "splits")
    assert dm.test_cases() == dm_for(msd_root, split_seed=1, seed=5).test_cases() and len(dm.test_cases()) == 1
    assert len({tuple(dm_for(msd_root, split_seed=s).test_cases()) for s in range(6)}) > 1
    assert len({tuple(dm_for(msd_root, seed=s).test_cases()) for s in range(6)}) == 1  # not the run seed
    assert dm.train_names()[:2] == [f"{dm.split().train[0]}_slice000", f"{dm.split().train[0]}_slice001"]
    dm.setup("fit")
    lines = (tmp_path / "splits" / "test.txt").read_text().splitlines()
    assert lines[0].startswith("# generic split from a seeded split by case (split_seed 1")
    assert lines[1:] == dm.test_cases()
    assert dm_for(msd_root, list_dir=tmp_path / "splits").split().train == dm.split().train


def test_labelled_test_folder_is_the_test_set(tmp_path):
    root = write_generic(tmp_path / "d", train=("a", "b"), test=("c",), nnunet=True)
    dm = dm_for(root)
    assert dm.split().train == ["a", "b"] and dm.test_cases() == ["c"]
    assert dm.load_volume("c").meta["path"] == str(root / "imagesTs" / "c_0000.nii.gz")


def test_volume_keeps_the_nifti_geometry(msd_root):
    case = "liver_2"
    vol = dm_for(msd_root).load_volume(case)
    assert vol.image.shape == vol.label.shape == (5, 16, 20)
    assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8
    assert set(np.unique(vol.label).tolist()) == {0, 1, 2}
    assert vol.spacing == GEOMETRY.spacing
    assert Geometry.from_meta(vol.meta["geometry"]) == GEOMETRY
    nifti = nibabel.load(msd_root / "imagesTr" / f"{case}.nii.gz")  # an independent reader agrees
    assert nifti.shape == (20, 16, 5) and np.allclose(nifti.header.get_zooms(), GEOMETRY.spacing[::-1])
    raw = np.asarray(nifti.dataobj, dtype=np.float32).transpose(2, 1, 0)
    np.testing.assert_allclose(vol.image, np.clip((raw + 125.0) / 400.0, 0, 1), atol=1e-6)  # CT window


def test_intensity_default_follows_the_modality(tmp_path):
    assert dm_for(write_generic(tmp_path / "mr", modality="T2")).intensity == "mr_percentile"
    assert dm_for(write_generic(tmp_path / "ct", modality="CT"), intensity="none").intensity == "none"


@pytest.mark.parametrize(
    "labels, message",
    [
        ({"0": "background", "2": "liver"}, r"label ids \[0, 2\] must run 0..K without gaps"),
        ({"background": 0, "liver": [1, 2]}, r"region labels \(lists of ids\) are not supported"),
        ({"background": 0, "liver": 1, "organ": 1}, "label id 1 is given twice"),
    ],
)
def test_bad_dataset_json(msd_root, labels, message):
    (msd_root / "dataset.json").write_text(json.dumps({"labels": labels}))
    with pytest.raises(SamoraError, match=message):
        dm_for(msd_root)
    (msd_root / "dataset.json").unlink()
    with pytest.raises(SamoraError, match="dataset.json does not exist"):
        dm_for(msd_root)


def test_bad_cases_name_the_file(msd_root):
    write_image(msd_root / "labelsTr" / "liver_0.nii.gz", np.zeros((5, 16, 19), np.uint8), GEOMETRY)
    label = np.zeros((5, 16, 20), np.uint8)
    label[2, 2, 2] = 3  # not an id of dataset.json
    write_image(msd_root / "labelsTr" / "liver_1.nii.gz", label, GEOMETRY)
    (msd_root / "labelsTr" / "liver_2.nii.gz").unlink()
    dm = dm_for(msd_root)
    with pytest.raises(SamoraError, match=r"labelsTr/liver_0\.nii\.gz: label shape \(5, 16, 19\) differs"):
        dm.load_volume("liver_0")
    with pytest.raises(
        SamoraError,
        match=r"labelsTr/liver_1\.nii\.gz: label has values 3 that are not class ids: "
        r"expected 0 \(background\) to 2 \(1 liver, 2 tumour\)",
    ):
        dm.load_volume("liver_1")
    with pytest.raises(SamoraError, match=r"labelsTr/liver_2\.nii\.gz: label file not found"):
        dm.load_volume("liver_2")
    with pytest.raises(SamoraError) as err:
        dm.validate()
    assert str(err.value).startswith("3 problem(s) in the generic dataset")


def test_list_naming_a_missing_case(tmp_path, msd_root):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("liver_0\n")
    (tmp_path / "lists" / "test.txt").write_text("liver_9\n")
    with pytest.raises(SamoraError, match=r"cases with no file: liver_9 \(.*imagesTr/liver_9\.nii\.gz\)"):
        dm_for(msd_root, list_dir=tmp_path / "lists").test_cases()


@pytest.mark.slow
def test_cli_finetune_and_options(tmp_path, msd_root, capsys):
    overrides = finetune_overrides(tmp_path, "generic", msd_root)
    assert main(["finetune", *overrides, "data.intensity=mr_percentile"]) == 0
    rows = list(csv.DictReader(open(finetune_folder(tmp_path) / "results.csv")))
    assert {r["class_name"] for r in rows} == {"liver", "tumour"}
    test = (finetune_folder(tmp_path) / "splits" / "test.txt").read_text().splitlines()[1:]
    assert {r["case"] for r in rows} == set(test)
    assert main(["check", "data.name=synapse", f"data.dir={msd_root}", "data.intensity=none"]) == 1
    assert "dataset 'synapse' has no option intensity (config key data.intensity)" in capsys.readouterr().err

"""Promise12DataModule on tiny mhd/raw pairs written with SimpleITK: split, geometry, bad inputs, CLI fine-tune."""

import csv
from functools import partial

import numpy as np
import pytest
import SimpleITK as sitk

from data_modules import build_datamodule
from data_modules.io.volume_io import Geometry, write_image
from data_modules.labelled.promise12 import Promise12DataModule
from samora_pl.cli import main
from samora_pl.errors import SamoraError
from tests.data_modules.volume_writers import (
    GEOMETRY,
    PROMISE12_TEST,
    finetune_folder,
    finetune_overrides,
    small_datamodule,
    write_promise12,
)

TEST_CASES = [f"Case{n:02d}" for n in PROMISE12_TEST]


dm_for = partial(small_datamodule, Promise12DataModule)


@pytest.fixture
def promise_root(tmp_path):
    return write_promise12(tmp_path / "promise12")


def test_default_split_and_classes(promise_root):
    dm = build_datamodule("promise12", root=promise_root, img_size=32)
    assert isinstance(dm, Promise12DataModule)
    assert dm.num_classes == 1 and dm.class_names == ["prostate"]
    assert dm.test_cases() == TEST_CASES
    assert dm.split().train == ["Case00", "Case01", "Case02"]
    assert dm.train_names() == [f"Case0{c}_slice00{z}" for c in range(3) for z in range(4)]


def test_lists_override_the_default_split(promise_root):
    (promise_root / "lists").mkdir()
    (promise_root / "lists" / "train.txt").write_text("Case12\nCase13\n")
    (promise_root / "lists" / "test.txt").write_text("# held out\nCase00.mhd\nCase01\n")
    dm = dm_for(promise_root)
    assert dm.split().train == ["Case12", "Case13"] and dm.test_cases() == ["Case00", "Case01"]


def test_volume_keeps_the_geometry(promise_root):
    vol = dm_for(promise_root).load_volume("Case12")
    source = sitk.ReadImage(str(promise_root / "Case12.mhd"))
    assert vol.image.shape == vol.label.shape == (4, 16, 12)
    assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8
    assert vol.image.min() >= 0.0 and vol.image.max() <= 1.0
    assert set(np.unique(vol.label).tolist()) == {0, 1}
    assert vol.spacing == GEOMETRY.spacing == tuple(reversed(source.GetSpacing()))
    assert Geometry.from_meta(vol.meta["geometry"]) == GEOMETRY
    assert vol.meta["geometry"]["direction"] == list(source.GetDirection())
    assert vol.meta["path"] == str(promise_root / "Case12.mhd")


def test_training_slices_come_from_the_volumes(promise_root):
    dm = dm_for(promise_root, intensity="none")
    image, label = dm.slice_reader()("Case01_slice002")
    vol = dm.load_volume("Case01")
    np.testing.assert_array_equal(image, vol.image[2])
    np.testing.assert_array_equal(label, vol.label[2])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32) and len(dm.val_set) == 4


def test_missing_test_case_and_listed_case(promise_root):
    (promise_root / "Case49.mhd").unlink()
    with pytest.raises(SamoraError, match=r"default PROMISE12 split .*: cases with no file: Case49 \(.*Case49"):
        dm_for(promise_root).test_cases()
    (promise_root / "lists").mkdir()
    (promise_root / "lists" / "train.txt").write_text("Case00\n")
    with pytest.raises(SamoraError, match=r"lists/test\.txt does not exist"):
        dm_for(promise_root).test_cases()


def test_bad_files_name_the_file(promise_root):
    (promise_root / "Case13.raw").write_bytes(b"\0" * 10)  # truncated data: unreadable mhd
    write_image(promise_root / "Case16_segmentation.mhd", np.zeros((4, 16, 11), np.uint8), GEOMETRY)
    label = np.zeros((4, 16, 12), np.uint8)
    label[1, 3, 3] = 2
    write_image(promise_root / "Case20_segmentation.mhd", label, GEOMETRY)
    dm = dm_for(promise_root)
    with pytest.raises(SamoraError, match=rf"{promise_root / 'Case13.mhd'}: cannot read this image"):
        dm.load_volume("Case13")
    with pytest.raises(SamoraError, match=r"Case16_segmentation\.mhd: label shape \(4, 16, 11\) differs from"):
        dm.load_volume("Case16")
    with pytest.raises(SamoraError, match=r"Case20_segmentation\.mhd: label has values 2 that are not class ids"):
        dm.load_volume("Case20")
    with pytest.raises(SamoraError) as err:
        dm.validate()
    assert str(err.value).startswith("3 problem(s) in the PROMISE12 dataset")
    assert all(f"Case{n}" in str(err.value) for n in (13, 16, 20))


@pytest.mark.slow
def test_cli_finetune(tmp_path, promise_root):
    assert main(["finetune", *finetune_overrides(tmp_path, "promise12", promise_root)]) == 0
    rows = list(csv.DictReader(open(finetune_folder(tmp_path) / "results.csv")))
    assert {r["class_name"] for r in rows} == {"prostate"} and {r["case"] for r in rows} == set(TEST_CASES)
    assert {"dice", "hd95", "hd95_mm"} <= set(rows[0])  # HD95 also in mm, from the files' spacing


def test_check_names_a_label_on_another_grid(promise_root):
    """`samora check` reports a label header whose spacing or origin differs from its image's."""
    dm = dm_for(promise_root)
    dm.validate()  # same headers: fine
    label = dm.load_volume("Case01").label
    other = Geometry(
        spacing=(GEOMETRY.spacing[0] * 2, *GEOMETRY.spacing[1:]), origin=(9.0, 9.0, 9.0), direction=GEOMETRY.direction
    )
    write_image(promise_root / "Case01_segmentation.mhd", label, other)
    with pytest.raises(SamoraError, match=r"Case01_segmentation\.mhd: label spacing and origin differ") as err:
        dm_for(promise_root).validate()
    assert "resample the label" in str(err.value)

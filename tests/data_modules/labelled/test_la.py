"""LADataModule on tiny trees in UA-MT's exact layout (h5 files in '2018LA_Seg_Training Set'): axes, split,
intensity, bad inputs, and a CLI fine-tune."""

import csv
import pickle
from functools import partial

import h5py
import numpy as np
import pytest
import torch

from data_modules import build_datamodule
from data_modules.labelled.la import LADataModule
from samora_pl.cli import main
from samora_pl.errors import SamoraError
from tests.data_modules.volume_writers import LA_IDS, finetune_folder, finetune_overrides, small_datamodule, write_la

dm_for = partial(small_datamodule, LADataModule)


def h5_path(root, case):
    return root / "2018LA_Seg_Training Set" / case / "mri_norm2.h5"


@pytest.fixture
def la_root(tmp_path):
    return write_la(tmp_path / "la")


def test_registry_classes_and_distributed_lists(la_root):
    dm = build_datamodule("la", root=la_root, img_size=32)
    assert isinstance(dm, LADataModule)
    assert dm.num_classes == 1 and dm.class_names == ["left atrium"]
    assert dm.test_cases() == list(LA_IDS[3:])
    names = dm.train_names()
    assert len(names) == 3 * 6 and names[0] == f"{LA_IDS[0]}_slice000" and names[-1] == f"{LA_IDS[2]}_slice005"
    assert {dm.case_of(n) for n in names} == set(LA_IDS[:3])


def test_volume_is_the_h5_array_transposed_to_dhw(la_root):
    case = LA_IDS[3]
    with h5py.File(h5_path(la_root, case), "r") as f:
        image, label = f["image"][()], f["label"][()]  # (W, H, D)
    vol = dm_for(la_root).load_volume(case)
    assert vol.image.shape == vol.label.shape == (6, 24, 20)
    assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8
    np.testing.assert_array_equal(vol.label, label.transpose(2, 1, 0))
    assert vol.image.min() >= 0.0 and vol.image.max() <= 1.0 and vol.image.max() > 0.9
    lo, hi = np.percentile(image, (0.5, 99.5))
    np.testing.assert_allclose(vol.image, ((np.clip(image, lo, hi) - lo) / (hi - lo)).transpose(2, 1, 0), atol=1e-6)
    assert vol.spacing == (1.0, 1.0, 1.0)
    assert vol.meta["geometry"]["direction"] == [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
    assert vol.meta["path"] == str(h5_path(la_root, case))


def test_training_slices_match_the_volume(la_root):
    dm = dm_for(la_root)
    reader = dm.slice_reader()
    case = LA_IDS[0]
    vol = dm.load_volume(case)
    image, label = reader(f"{case}_slice003")
    assert image.shape == label.shape == (24, 20)
    np.testing.assert_allclose(image, vol.image[3], atol=1e-6)
    np.testing.assert_array_equal(label, vol.label[3])
    copy = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker gets
    np.testing.assert_array_equal(copy(f"{case}_slice003")[0], image)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["label"].dtype == torch.uint8
    assert set(torch.unique(batch["label"]).tolist()) <= {0, 1}
    assert len(dm.val_set) == 4


def test_intensity_option(la_root):
    vol = dm_for(la_root, intensity="none").load_volume(LA_IDS[3])
    assert vol.image.min() == 0.0 and 0.0 < vol.image.mean() < 0.5  # z-scores only clipped to [0, 1]
    with pytest.raises(SamoraError, match="intensity='zscore' is not known: use one of none, ct_window, mr_percent"):
        dm_for(la_root, intensity="zscore")


def test_seeded_split_without_lists_is_deterministic_and_written(tmp_path):
    root = write_la(tmp_path / "la", lists=False)
    first = dm_for(root, split_dir=tmp_path / "s1", split_seed=3)
    again = dm_for(root, split_dir=tmp_path / "s2", split_seed=3, seed=7)  # the run seed does not move the split
    assert first.test_cases() == again.test_cases() and len(first.test_cases()) == 1
    assert sorted(first.split().train + first.test_cases()) == sorted(LA_IDS)
    first.setup("fit")
    written = (tmp_path / "s1" / "test.list").read_text()
    assert written.startswith("# LA split from a seeded split by case (split_seed 3")
    assert first.test_cases()[0] in written
    reused = dm_for(root, list_dir=tmp_path / "s1")  # the written lists reproduce the split
    assert reused.test_cases() == first.test_cases() and reused.split().train == first.split().train
    other_seeds = {tuple(dm_for(root, split_seed=s).test_cases()) for s in range(6)}
    assert len(other_seeds) > 1
    assert len({tuple(dm_for(root, seed=s).test_cases()) for s in range(6)}) == 1


def test_missing_list_or_listed_case(la_root):
    (la_root / "test.list").unlink()
    with pytest.raises(SamoraError, match=r"test\.list does not exist: a LA split needs both train\.list and test"):
        dm_for(la_root).test_cases()
    (la_root / "test.list").write_text("NOSUCHID\n")
    missing = r"cases with no file: NOSUCHID \(.*2018LA_Seg_Training Set/NOSUCHID/mri_norm2\.h5\)"
    with pytest.raises(SamoraError, match=missing):
        dm_for(la_root).test_cases()


def test_bad_h5_files_name_the_file(la_root):
    bad_shape, bad_values, truncated = (h5_path(la_root, c) for c in LA_IDS[:3])
    with h5py.File(bad_shape, "r+") as f:
        del f["label"]
        f["label"] = np.zeros((20, 24, 5), np.uint8)
    with h5py.File(bad_values, "r+") as f:
        f["label"][0, 0, 0] = 2
    truncated.write_bytes(truncated.read_bytes()[:100])
    dm = dm_for(la_root)
    with pytest.raises(SamoraError, match=rf"{bad_shape}: image shape \(20, 24, 6\) and label shape \(20, 24, 5\)"):
        dm.load_volume(LA_IDS[0])
    not_ids = r"values 2 that are not class ids: expected 0 \(background\) to 1 \(1 left atrium\)"
    with pytest.raises(SamoraError, match=not_ids):
        dm.load_volume(LA_IDS[1])
    with pytest.raises(SamoraError, match=rf"{truncated} cannot be opened as HDF5"):
        dm.load_volume(LA_IDS[2])
    with pytest.raises(SamoraError) as err:
        dm.validate()
    message = str(err.value)
    assert message.startswith("3 problem(s) in the LA dataset at")
    assert str(bad_shape) in message and str(bad_values) in message and str(truncated) in message


def test_validate_summary(la_root):
    summary = dm_for(la_root).validate()
    assert summary["train_cases"] == 3 and summary["test_cases"] == 2 and summary["train_slices"] == 18
    assert summary["volume_shapes"] == [(6, 24, 20)] and summary["labels_seen"] == [0, 1]


@pytest.mark.slow
def test_cli_check_and_finetune(tmp_path, la_root):
    overrides = finetune_overrides(tmp_path, "la", la_root)
    assert main(["check", *overrides[:2]]) == 0
    assert main(["finetune", *overrides]) == 0
    folder = finetune_folder(tmp_path)
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert {r["class_name"] for r in rows} == {"left atrium"} and {r["case"] for r in rows} == set(LA_IDS[3:])
    assert (folder / "splits" / "train.list").read_text().splitlines()[1:] == list(LA_IDS[:3])

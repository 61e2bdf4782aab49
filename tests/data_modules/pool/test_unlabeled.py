"""The unlabeled CPT pool: every format and dataset layout, intensity modes, the index cache, bad input."""

import os
import time
from pathlib import Path

import h5py
import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

import data_modules.pool.unlabeled as unlabeled
from data_modules.io.readers import intensity
from data_modules.pool.ssl_views import TwoViews, mae_augment, simclr_augment
from data_modules.pool.unlabeled import UnlabeledDataModule, UnlabeledSlices, build_pool
from samora_pl.errors import SamoraError


def ramp(shape, low=0.0, high=1.0) -> np.ndarray:
    return np.linspace(low, high, int(np.prod(shape)), dtype=np.float32).reshape(shape)


def write_dicom_series(folder: Path, values_hu, size=(12, 10), uid="1.2.3.4.5"):
    """One DICOM file per slice, named in reverse order so only the positions give the right order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    for k, hu in enumerate(values_hu):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", uid, "CT"
        ds.Rows, ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.full(size, hu + 1024, np.int16).tobytes()
        ds.save_as(folder / f"IM{len(values_hu) - k:04d}.dcm", enforce_file_format=True)


def write_mhd(path: Path, array_zyx: np.ndarray):
    sitk.WriteImage(sitk.GetImageFromArray(array_zyx), str(path))


def all_slices(pool):
    data = UnlabeledSlices(pool)
    return [data[i] for i in range(len(data))]


def assert_unit_slices(slices):
    for image in slices:
        assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 1
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


# --------------------------------------------------------------------------------------------- formats


def test_every_file_format(tmp_path):
    root = tmp_path / "pool"
    root.mkdir()
    np.savez(root / "slice.npz", image=ramp((16, 20)))
    np.savez(root / "stack.npz", image=ramp((3, 16, 20)))
    with h5py.File(root / "volume.h5", "w") as f:
        f["image"] = ramp((4, 16, 20))
    nibabel.save(nibabel.Nifti1Image(ramp((16, 20, 5), -1000, 1000), np.eye(4)), root / "ct.nii.gz")
    write_mhd(root / "mr.mhd", ramp((6, 16, 20), 0, 900))
    write_dicom_series(root / "series", [-1000, 0, 100, 400])
    Image.fromarray((ramp((16, 20)) * 255).astype(np.uint8)).save(root / "grey8.png")
    Image.fromarray((ramp((16, 20)) * 65535).astype(np.uint16)).save(root / "grey16.png")
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(root / "colour.png")
    (root / "notes.txt").write_text("ignored")

    pool = build_pool([{"path": str(root)}], index_path=tmp_path / "index.json")
    readers = sorted(v.reader for v in pool.volumes)
    assert readers == ["dicom", "h5", "mhd", "nifti", "npz", "npz", "png", "png", "png"]
    # 1 + 3 + 4 + 5 (nifti, last axis) + 6 (mhd, z) + 4 (dicom) + 3 png
    assert len(pool) == 26
    slices = all_slices(pool)
    assert_unit_slices(slices)
    shapes = {tuple(s.shape[1:]) for s in slices}
    assert shapes == {(16, 20), (12, 10)}


def test_png_bit_depths(tmp_path):
    Image.fromarray(np.full((8, 8), 51, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8), 13107, np.uint16)).save(tmp_path / "b.png")
    pool = build_pool([{"path": str(tmp_path), "format": "png"}])
    values = sorted(float(s.mean()) for s in all_slices(pool))
    assert values == pytest.approx([0.2, 0.2], abs=1e-6)


def test_dicom_series_order_and_ct_window(tmp_path):
    write_dicom_series(tmp_path / "ct", [-200, -125, 75, 275, 500])
    pool = build_pool([{"path": str(tmp_path / "ct"), "format": "dicom", "intensity": "ct_window"}])
    assert len(pool.volumes) == 1 and len(pool) == 5
    means = [float(s.mean()) for s in all_slices(pool)]
    assert means == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0], abs=1e-6)


def test_ct_window_and_mr_percentile_formulas():
    hu = np.array([[-1000.0, -125.0, 75.0, 275.0, 3000.0]])
    assert intensity(hu, "ct_window") == pytest.approx(np.array([[0, 0, 0.5, 1, 1]]))
    mr = np.arange(1000, dtype=np.float32).reshape(10, 100)
    low, high = np.percentile(mr, [0.5, 99.5])
    expected = (np.clip(mr, low, high) - low) / (high - low)
    assert np.allclose(intensity(mr, "mr_percentile"), expected)


def test_mr_percentile_is_per_volume_not_per_slice(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["image"] = ramp((5, 8, 8), 0, 1000)
    pool = build_pool([{"path": str(tmp_path), "format": "h5", "intensity": "mr_percentile"}])
    slices = all_slices(pool)
    assert float(slices[0].min()) == 0.0 and float(slices[-1].max()) == 1.0
    assert float(slices[2].min()) > 0.3 and float(slices[2].max()) < 0.7  # not stretched to [0, 1]


def test_axis_choice(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["scan"] = ramp((4, 6, 8))
    pool = build_pool([{"path": str(tmp_path / "v.h5"), "format": "h5", "axis": 1, "key": "scan"}])
    assert len(pool) == 6 and tuple(all_slices(pool)[0].shape) == (1, 4, 8)


# ------------------------------------------------------------------------------------- dataset layouts


def test_synapse_layout_ignores_labels(tmp_path):
    (tmp_path / "train_npz").mkdir()
    (tmp_path / "test_vol_h5").mkdir()
    for k in range(3):
        np.savez(tmp_path / "train_npz" / f"case0005_slice{k:03d}.npz", image=ramp((16, 16)), label=np.ones((16, 16)))
    with h5py.File(tmp_path / "test_vol_h5" / "case0001.npy.h5", "w") as f:
        f["image"] = ramp((7, 16, 16))
        f["label"] = np.ones((7, 16, 16), np.float32)
    (tmp_path / "lists").mkdir()
    pool = build_pool([{"path": str(tmp_path), "format": "synapse"}])
    assert len(pool) == 10
    assert all(v.intensity == "none" for v in pool.volumes)
    assert_unit_slices(all_slices(pool))


def test_la_layout_slices_the_last_axis(tmp_path):
    base = tmp_path / "2018LA_Seg_Training Set"
    rng = np.random.default_rng(0)
    for name, depth in (("0RZDK210BSMWAA6467LU", 6), ("1D7CUD1955YZPGK8XHJX", 4)):
        (base / name).mkdir(parents=True)
        with h5py.File(base / name / "mri_norm2.h5", "w") as f:
            f["image"] = rng.normal(size=(20, 24, depth)).astype(np.float32)  # z-scored, (W, H, D)
            f["label"] = np.zeros((20, 24, depth), np.uint8)
    pool = build_pool([{"path": str(tmp_path), "format": "la"}])
    assert len(pool) == 10
    assert all(v.axis == 2 and v.intensity == "mr_percentile" for v in pool.volumes)
    slices = all_slices(pool)
    assert_unit_slices(slices)
    assert tuple(slices[0].shape) == (1, 20, 24)


def test_promise12_layout_skips_segmentations(tmp_path):
    for case in ("Case00", "Case01"):
        write_mhd(tmp_path / f"{case}.mhd", ramp((3, 12, 12), 0, 500))
        write_mhd(tmp_path / f"{case}_segmentation.mhd", np.ones((3, 12, 12), np.uint8))
    pool = build_pool([{"path": str(tmp_path), "format": "promise12"}])
    assert sorted(Path(v.path).name for v in pool.volumes) == ["Case00.mhd", "Case01.mhd"]
    assert len(pool) == 6
    assert_unit_slices(all_slices(pool))


def test_auto_skips_label_folders(tmp_path):
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    nibabel.save(nibabel.Nifti1Image(ramp((8, 8, 3), 0, 100), np.eye(4)), tmp_path / "imagesTr" / "case_0000.nii.gz")
    nibabel.save(nibabel.Nifti1Image(np.ones((8, 8, 3), np.uint8), np.eye(4)), tmp_path / "labelsTr" / "case.nii.gz")
    pool = build_pool([{"path": str(tmp_path)}])
    assert len(pool.volumes) == 1 and len(pool) == 3


def test_several_sources_mix(tmp_path):
    (tmp_path / "a").mkdir()
    np.savez(tmp_path / "a" / "x.npz", image=ramp((8, 8)))
    write_dicom_series(tmp_path / "b", [0, 10])
    pool = build_pool([{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b"), "intensity": "ct_window"}])
    assert len(pool) == 3


# ------------------------------------------------------------------------------------------ the index


def test_index_is_reused_and_refreshed(tmp_path, monkeypatch):
    (tmp_path / "pool").mkdir()
    for k in range(3):
        np.savez(tmp_path / "pool" / f"{k}.npz", image=ramp((2, 8, 8)))
    index = tmp_path / "cache" / "index.json"
    first = build_pool([{"path": str(tmp_path / "pool")}], index_path=index)
    assert index.exists() and len(first) == 6

    calls = []
    original = unlabeled._probe_entry
    monkeypatch.setattr(unlabeled, "_probe_entry", lambda *a: calls.append(a) or original(*a))
    again = build_pool([{"path": str(tmp_path / "pool")}], index_path=index)
    assert len(again) == 6 and calls == []  # nothing re-read

    changed = tmp_path / "pool" / "1.npz"
    np.savez(changed, image=ramp((5, 8, 8)))
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    refreshed = build_pool([{"path": str(tmp_path / "pool")}], index_path=index)
    assert len(refreshed) == 9 and len(calls) == 1


def test_corrupt_index_is_rebuilt(tmp_path):
    np.savez(tmp_path / "a.npz", image=ramp((8, 8)))
    index = tmp_path / "index.json"
    index.write_text("{not json")
    assert len(build_pool([{"path": str(tmp_path / "a.npz")}], index_path=index)) == 1


# ------------------------------------------------------------------------------------------- bad input


def test_unreadable_files_are_all_reported(tmp_path):
    np.savez(tmp_path / "good.npz", image=ramp((8, 8)))
    (tmp_path / "broken.npz").write_bytes(b"not a zip file")
    (tmp_path / "broken.h5").write_bytes(b"\x00" * 64)
    np.savez(tmp_path / "nokey.npz", data=ramp((8, 8)))
    write_mhd(tmp_path / "lost.mhd", ramp((2, 8, 8)))
    (tmp_path / "lost.raw").unlink()
    with pytest.raises(SamoraError) as err:
        build_pool([{"path": str(tmp_path)}])
    message = str(err.value)
    for name in ("broken.npz", "broken.h5", "nokey.npz", "lost.mhd", "skip_bad_files"):
        assert name in message
    assert "good.npz" not in message
    with pytest.warns(UserWarning, match="Skipping 4 unreadable"):
        pool = build_pool([{"path": str(tmp_path)}], skip_bad_files=True)
    assert len(pool) == 1 and len(pool.bad) == 4


def test_bad_dicom_file_is_reported(tmp_path):
    write_dicom_series(tmp_path / "s", [0, 1])
    (tmp_path / "s" / "IM9999.dcm").write_bytes(b"garbage")
    with pytest.raises(SamoraError, match="IM9999.dcm"):
        build_pool([{"path": str(tmp_path)}])


def test_empty_pool_and_missing_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamoraError, match="empty"):
        build_pool([{"path": str(tmp_path / "empty")}])
    with pytest.raises(SamoraError, match="does not exist"):
        build_pool([{"path": str(tmp_path / "nowhere")}])
    with pytest.raises(SamoraError, match="No CPT sources"):
        build_pool([])
    with pytest.raises(SamoraError, match="format"):
        build_pool([{"path": str(tmp_path), "format": "jpeg"}])
    with pytest.raises(SamoraError, match="not a Synapse folder"):
        build_pool([{"path": str(tmp_path / "empty"), "format": "synapse"}])


def test_file_lost_after_indexing(tmp_path):
    for k in range(2):
        np.savez(tmp_path / f"{k}.npz", image=ramp((8, 8)))
    pool = build_pool([{"path": str(tmp_path)}])
    (tmp_path / "0.npz").unlink()
    with pytest.raises(SamoraError, match="0.npz"):
        UnlabeledSlices(pool)[0]
    with pytest.warns(UserWarning, match="0.npz"):
        assert UnlabeledSlices(pool, skip_bad_files=True)[0].shape == (1, 8, 8)


# --------------------------------------------------------------------------------------- data module


def test_datamodule_batches(tmp_path):
    for k in range(6):
        np.savez(tmp_path / f"{k}.npz", image=ramp((40, 48)))
    module = UnlabeledDataModule(
        sources=[{"path": str(tmp_path)}], transform=TwoViews(simclr_augment(32)), batch_size=4
    )
    module.setup("fit")
    view1, view2 = next(iter(module.train_dataloader()))
    assert view1.shape == view2.shape == (4, 1, 32, 32)
    assert float(view1.min()) >= 0 and float(view1.max()) <= 1
    assert len(module.train_dataloader()) == 1  # drop_last

    mae = UnlabeledDataModule(pool=module.pool, transform=mae_augment(32), batch_size=3)
    mae.setup("fit")
    assert next(iter(mae.train_dataloader())).shape == (3, 1, 32, 32)
    with pytest.raises(SamoraError, match="fewer than one batch"):
        UnlabeledDataModule(pool=module.pool, batch_size=64).setup("fit")

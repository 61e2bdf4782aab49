"""SynapseDataModule on tiny trees in the exact TransUNet layout: batches, volumes, and every bad input."""

import h5py
import numpy as np
import pytest
import torch

from data_modules import build_datamodule, known_datamodules
from data_modules.labelled.synapse import SynapseDataModule
from samora_pl.errors import SamoraError


def dm_for(root, **kw):
    kw.setdefault("img_size", 32)
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    return SynapseDataModule(root=root, **kw)


def test_class_names_and_registry(synapse_root):
    dm = build_datamodule("synapse", root=synapse_root, img_size=32)
    assert isinstance(dm, SynapseDataModule)
    assert dm.num_classes == 8
    assert dm.class_names == [
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "liver",
        "stomach",
        "aorta",
        "pancreas",
    ]
    assert {"demo", "synapse"} <= set(known_datamodules())
    with pytest.raises(SamoraError, match="known datasets are.*demo.*synapse"):
        build_datamodule("nope", root=synapse_root)


def test_train_batches(synapse_root):
    dm = dm_for(synapse_root)
    dm.setup("fit")
    assert len(dm.train_set) == 12
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "low_res_label", "name"}
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4, 32, 32) and batch["label"].dtype == torch.uint8
    assert batch["low_res_label"].shape == (4, 8, 8) and batch["low_res_label"].dtype == torch.uint8
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    assert batch["label"].min() >= 0 and batch["label"].max() <= 8
    assert all(n.startswith("case000") and "_slice" in n for n in batch["name"])


def test_val_batches_come_from_unselected_training_slices_never_test_volumes(synapse_root):
    dm = dm_for(synapse_root, val_slices=6, fraction=0.25)
    dm.setup("fit")
    assert len(dm.val_set) == 6
    names = dm.val_set.names
    assert set(names) <= set(dm.train_names()) - set(dm.selected_train_names())  # held out of the fraction
    assert not {n.split("_slice")[0] for n in names} & set(dm.test_cases())
    seen = set()
    for batch in dm.val_dataloader():
        assert batch["image"].shape[1:] == (1, 32, 32)
        assert (batch["label"].flatten(1) > 0).any(1).all()
        seen.update(batch["name"])
    assert seen == set(names)
    again = dm_for(synapse_root, val_slices=6, fraction=0.25)
    again.setup("validate")
    assert again.val_set.names == names  # seeded
    big = dm_for(synapse_root, val_slices=100, fraction=0.25)
    big.setup("validate")
    assert len(big.val_set) == 9  # every training slice the fraction left out (12 - 3)
    everything = dm_for(synapse_root, val_slices=4, fraction=1.0)  # nothing held out: drawn from the selection
    everything.setup("validate")
    assert len(everything.val_set) == 4 and set(everything.val_set.names) <= set(everything.train_names())
    none = dm_for(synapse_root, val_slices=0)
    none.setup("fit")
    assert none.val_dataloader() == []


def test_test_volumes(synapse_root):
    vols = list(dm_for(synapse_root).test_volumes())
    assert [v.case for v in vols] == ["case0001", "case0002"]
    for v in vols:
        assert v.image.shape == (5, 64, 64) and v.image.dtype == np.float32
        assert v.label.shape == (5, 64, 64) and v.label.dtype in (np.uint8, np.int64)
        assert v.spacing == (1.0, 1.0, 1.0)
        assert v.label.max() <= 8


def test_validate_ok_returns_summary(synapse_root):
    summary = dm_for(synapse_root).validate()
    assert summary["train_slices"] == 12 and summary["test_volumes"] == 2
    assert summary["slice_shapes"] == [(64, 64)]
    assert set(summary["labels_seen"]) <= set(range(9))


def test_training_workers_start_fresh_every_epoch_and_validation_workers_persist(synapse_root):
    """Training workers are seeded every epoch from the main generator, which checkpoints keep (a resumed run
    augments as the uninterrupted one did); validation workers persist, seeded from a generator of their own."""
    dm = dm_for(synapse_root, num_workers=2, val_slices=2)
    loader = dm.train_dataloader()
    assert not loader.persistent_workers and loader.num_workers == 2 and loader.generator is None
    names = [n for batch in loader for n in batch["name"]]
    assert sorted(names) == sorted(dm.train_names())
    val = dm.val_dataloader()
    assert val.persistent_workers and val.generator is not None


# ---------------------------------------------------------------------------- bad inputs
def _first_npz(root):
    return sorted((root / "train_npz").glob("*.npz"))[0]


def _load_all(dm):
    dm.setup("fit")
    for i in range(len(dm.train_set)):
        dm.train_set[i]


def test_missing_root(tmp_path):
    with pytest.raises(SamoraError, match="does not exist") as err:
        dm_for(tmp_path / "nowhere")
    assert "data.dir=" in str(err.value)  # the key that sets the data folder


def test_missing_list(synapse_root):
    (synapse_root / "lists" / "lists_Synapse" / "train.txt").unlink()
    with pytest.raises(SamoraError, match="train.txt does not exist"):
        dm_for(synapse_root).setup("fit")


def test_list_names_missing_file(synapse_root):
    path = _first_npz(synapse_root)
    path.unlink()
    with pytest.raises(SamoraError, match=path.name):
        _load_all(dm_for(synapse_root))


def test_npz_without_label(synapse_root):
    path = _first_npz(synapse_root)
    np.savez(path, image=np.zeros((64, 64), np.float32))
    with pytest.raises(SamoraError, match=rf"{path.name}.*'label'"):
        _load_all(dm_for(synapse_root))


def test_labels_above_k(synapse_root):
    path = _first_npz(synapse_root)
    np.savez(path, image=np.zeros((64, 64), np.float32), label=np.full((64, 64), 12, np.float32))
    with pytest.raises(SamoraError, match=rf"{path.name}.*0\.\.8"):
        _load_all(dm_for(synapse_root))


def test_nan_image(synapse_root):
    path = _first_npz(synapse_root)
    image = np.zeros((64, 64), np.float32)
    image[3, 3] = np.nan
    np.savez(path, image=image, label=np.zeros((64, 64), np.float32))
    with pytest.raises(SamoraError, match=rf"{path.name}.*NaN"):
        _load_all(dm_for(synapse_root))


def test_error_inside_a_worker_is_still_a_samora_error(synapse_root):
    path = _first_npz(synapse_root)
    path.unlink()
    loader = dm_for(synapse_root, num_workers=1, batch_size=64, val_slices=0).train_dataloader()
    message = None
    try:
        next(iter(loader))
    except SamoraError as e:  # keep only the text, so the worker is shut down right away
        message = str(e)
    del loader
    assert message is not None and path.name in message


def test_corrupt_npz(synapse_root):
    path = _first_npz(synapse_root)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SamoraError, match=rf"{path.name}.*corrupt"):
        _load_all(dm_for(synapse_root))


def test_truncated_h5(synapse_root):
    path = synapse_root / "test_vol_h5" / "case0002.npy.h5"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SamoraError, match=rf"{path.name}.*(truncated|corrupt)"):
        list(dm_for(synapse_root).test_volumes())


def test_h5_shape_mismatch_and_missing_key(synapse_root):
    path = synapse_root / "test_vol_h5" / "case0001.npy.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((5, 64, 64), np.float32)
        f["label"] = np.zeros((4, 64, 64), np.float32)
    with pytest.raises(SamoraError, match=rf"{path.name}.*differ"):
        list(dm_for(synapse_root).test_volumes())
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((5, 64, 64), np.float32)
    with pytest.raises(SamoraError, match=rf"{path.name}.*'label'"):
        list(dm_for(synapse_root).test_volumes())


def test_test_list_names_missing_volume(synapse_root):
    (synapse_root / "lists" / "lists_Synapse" / "test_vol.txt").write_text("case0001\ncase0099\n")
    with pytest.raises(SamoraError, match="case0099.npy.h5 does not exist"):
        list(dm_for(synapse_root).test_volumes())


def test_validate_reports_every_problem(synapse_root):
    npz = sorted((synapse_root / "train_npz").glob("*.npz"))
    npz[0].unlink()  # missing
    np.savez(npz[1], image=np.zeros((64, 64), np.float32))  # no label
    np.savez(npz[2], image=np.zeros((64, 64), np.float32), label=np.full((64, 64), 9, np.float32))  # > K
    bad = np.zeros((64, 64), np.float32)
    bad[0, 0] = np.inf
    np.savez(npz[3], image=bad, label=np.zeros((64, 64), np.float32))  # Inf
    np.savez(npz[4], image=np.zeros((64, 64), np.float32), label=np.zeros((32, 64), np.float32))  # shape
    h5 = synapse_root / "test_vol_h5" / "case0002.npy.h5"
    h5.write_bytes(b"not an hdf5 file")
    with pytest.raises(SamoraError) as err:
        dm_for(synapse_root).validate()
    msg = str(err.value)
    assert msg.startswith("6 problem(s)")
    for path in npz[:5] + [h5]:
        assert path.name in msg
    for words in ("does not exist", "'label'", "0..8", "NaN or Inf", "differ", "HDF5"):
        assert words in msg


def test_image_not_windowed(synapse_root):
    path = _first_npz(synapse_root)
    np.savez(path, image=np.full((64, 64), 300.0, np.float32), label=np.zeros((64, 64), np.float32))
    with pytest.raises(SamoraError, match=rf"{path.name}.*\[0, 1\].*windowing"):
        _load_all(dm_for(synapse_root))


def test_validate_missing_folder_is_one_line(synapse_root):
    import shutil

    shutil.rmtree(synapse_root / "train_npz")
    with pytest.raises(SamoraError) as err:
        dm_for(synapse_root).validate()
    msg = str(err.value)
    assert msg.startswith("1 problem(s)") and "train_npz: folder missing (12 listed" in msg

"""Built-in demo: exact Synapse layout, all 8 organs in train and test, seeded, re-used, safe."""

import json

import h5py
import numpy as np
import pytest

from data_modules import build_datamodule
from data_modules.labelled.demo import DemoDataModule, ensure_demo, make_phantom_case
from data_modules.labelled.synapse import SynapseDataModule
from samora_pl.errors import SamoraError

SMALL = dict(n_train=2, n_test=1, size=48, min_slices=12, max_slices=14, n_unlabeled=10)


def test_exact_synapse_layout(demo_dir):
    lists = demo_dir / "lists" / "lists_Synapse"
    train = (lists / "train.txt").read_text().split()
    test = (lists / "test_vol.txt").read_text().split()
    assert len(test) == 12 and all(c.startswith("case") and len(c) == 8 for c in test)  # as Synapse
    assert len({n.split("_slice")[0] for n in train}) == 8
    assert 8 * 16 <= len(train) <= 8 * 24
    assert sorted(p.stem for p in (demo_dir / "train_npz").glob("*.npz")) == sorted(train)
    with np.load(demo_dir / "train_npz" / f"{train[0]}.npz") as d:
        assert set(d.files) == {"image", "label"}
        assert d["image"].shape == (128, 128) and d["image"].dtype == np.float32
        assert d["label"].dtype == np.float32
    for case in test:
        with h5py.File(demo_dir / "test_vol_h5" / f"{case}.npy.h5", "r") as f:
            assert set(f.keys()) == {"image", "label"}
            assert f["image"].shape == f["label"].shape
            assert 16 <= f["image"].shape[0] <= 24 and f["image"].shape[1:] == (128, 128)
    unl = sorted((demo_dir / "unlabeled").glob("*.npz"))
    assert len(unl) == 200
    with np.load(unl[0]) as d:
        assert d.files == ["image"] and d["image"].shape == (128, 128)
    info = json.loads((demo_dir / "demo.json").read_text())
    assert info["counts"]["train_slices"] == len(train)


def test_all_classes_in_train_and_test_and_plausible_intensities(demo_dir):
    dm = SynapseDataModule(demo_dir, img_size=32)
    summary = dm.validate()
    assert summary["labels_seen"] == list(range(9))
    train_labels = set()
    for p in (demo_dir / "train_npz").glob("*.npz"):
        with np.load(p) as d:
            train_labels.update(np.unique(d["label"]).astype(int).tolist())
    assert train_labels == set(range(9))
    for vol in dm.test_volumes():
        assert set(np.unique(vol.label).tolist()) == set(range(9)), vol.case
        img = vol.image
        assert img.min() >= 0.0 and img.max() <= 1.0
        mean = {k: float(img[vol.label == k].mean()) for k in range(1, 9)}
        assert mean[7] > mean[5] > mean[4]  # contrast aorta > liver > gallbladder (bile)
        assert 0.45 < mean[5] < 0.65 and mean[2] > mean[5]


def test_deterministic_and_reused(tmp_path):
    a = ensure_demo(tmp_path / "a", seed=3, **SMALL)
    b = ensure_demo(tmp_path / "b", seed=3, **SMALL)
    c = ensure_demo(tmp_path / "c", seed=4, **SMALL)
    names = (a / "lists" / "lists_Synapse" / "train.txt").read_text()
    assert names == (b / "lists" / "lists_Synapse" / "train.txt").read_text()
    for p in sorted((a / "train_npz").glob("*.npz"))[:5]:
        with np.load(p) as x, np.load(b / "train_npz" / p.name) as y:
            assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    with h5py.File(next((a / "test_vol_h5").glob("*.h5"))) as x, h5py.File(next((c / "test_vol_h5").glob("*.h5"))) as y:
        assert x["image"].shape != y["image"].shape or not np.array_equal(x["image"][()], y["image"][()])
    marker = a / "demo.json"
    stamp = marker.stat().st_mtime_ns
    first = sorted((a / "train_npz").iterdir())[0].stat().st_mtime_ns
    assert ensure_demo(a, seed=3, **SMALL) == a  # re-used: nothing rewritten
    assert marker.stat().st_mtime_ns == stamp
    assert sorted((a / "train_npz").iterdir())[0].stat().st_mtime_ns == first
    # incomplete (a file lost) or other parameters: written again
    sorted((a / "train_npz").iterdir())[0].unlink()
    ensure_demo(a, seed=3, **SMALL)
    assert marker.stat().st_mtime_ns != stamp
    ensure_demo(a, seed=3, **{**SMALL, "n_unlabeled": 4})
    assert len(list((a / "unlabeled").glob("*.npz"))) == 4


def test_refuses_foreign_folder_and_bad_params(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(SamoraError, match="not a demo folder"):
        ensure_demo(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    with pytest.raises(SamoraError, match="unknown demo parameter"):
        ensure_demo(tmp_path / "x", slices=3)
    with pytest.raises(SamoraError, match="n_train"):
        ensure_demo(tmp_path / "x", n_train=0)


def test_demo_datamodule_is_plain_synapse(tmp_path):
    dm = build_datamodule("demo", root=tmp_path / "d", demo_params=SMALL, img_size=32, batch_size=2, val_slices=4)
    assert isinstance(dm, DemoDataModule) and isinstance(dm, SynapseDataModule)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32) and batch["low_res_label"].shape == (2, 8, 8)
    assert len(dm.val_set) == 4


def test_phantom_case_shapes():
    image, label = make_phantom_case(np.random.default_rng(0), 10, 40)
    assert image.shape == label.shape == (10, 40, 40)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert label.max() <= 8

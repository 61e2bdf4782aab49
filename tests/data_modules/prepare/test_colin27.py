"""`samora prepare data.name=generic prepare.source=colin27` on a small synthetic T1 + AAL pair.

The real files (Debian's mricron-data) are 181 x 217 x 181; these tests write a 6 x 5 x 40 pair in the same
file formats so that the slab cut, the class map, the split and the geometry can be checked exactly.
"""

import json

import nibabel
import numpy as np
import pytest

from data_modules import build_datamodule
from data_modules.io.volume_io import read_image
from data_modules.prepare.colin27 import SLAB, TEST_EVERY, TEST_OFFSET, colin27_labels
from data_modules.prepare.raw import prepare
from samora_pl.cli import main
from samora_pl.errors import SamoraError

SHAPE_XYZ = (6, 5, 40)  # nibabel order; slabs cut the last axis (5 slabs of 8)
AFFINE = np.array([[1.0, 0, 0, -90.0], [0, 1.0, 0, -125.0], [0, 0, 1.0, -71.0], [0, 0, 0, 1.0]])


def write_templates(folder, empty_slabs=(0,)):
    """ch2.nii.gz (T1 = z index, so each slice says where it came from) and aal.nii.gz with AAL ids."""
    folder.mkdir(parents=True)
    t1 = np.broadcast_to(np.arange(SHAPE_XYZ[2], dtype=np.uint8), SHAPE_XYZ).copy()
    aal = np.zeros(SHAPE_XYZ, dtype=np.uint8)
    aal[1, 1, :], aal[2, 2, :], aal[3, 3, :], aal[4, 4, :] = 5, 72, 100, 200  # cortex, nuclei, cerebellum, none
    for slab in empty_slabs:
        aal[:, :, slab * SLAB : (slab + 1) * SLAB] = 0
    nibabel.save(nibabel.Nifti1Image(t1, AFFINE), str(folder / "ch2.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(aal, AFFINE), str(folder / "aal.nii.gz"))
    return folder


def test_class_map_groups_aal_regions():
    atlas = np.array([0, 1, 70, 71, 78, 79, 90, 91, 116, 117, 200])
    assert colin27_labels(atlas).tolist() == [0, 1, 1, 2, 2, 1, 1, 3, 3, 0, 0]


def test_slabs_split_geometry_and_generic_reader(tmp_path):
    out = tmp_path / "colin27"
    summary = prepare("colin27", write_templates(tmp_path / "templates"), out, progress=False)
    # slab 0 has no label and is dropped; of the slabs 1..4, index 2 (= slab 3) is the test slab
    assert summary["training slabs"] == 3 and summary["test slabs"] == 1
    assert TEST_EVERY == 5 and TEST_OFFSET == 2
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["colin27_z024.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [
        "colin27_z008.nii.gz",
        "colin27_z016.nii.gz",
        "colin27_z032.nii.gz",
    ]
    image, geometry = read_image(out / "imagesTs" / "colin27_z024.nii.gz")
    assert image.shape == (SLAB, 5, 6)
    assert image[:, 0, 0].tolist() == list(range(24, 32))  # the slab's own slices, in order
    # placed where it was in the brain (SimpleITK gives LPS: x and y of the RAS affine flip sign)
    assert geometry.origin == pytest.approx((90.0, 125.0, -71.0 + 24))
    label, _ = read_image(out / "labelsTs" / "colin27_z024.nii.gz")
    assert label[0, 1, 1] == 1 and label[0, 2, 2] == 2 and label[0, 3, 3] == 3 and label[0, 4, 4] == 0

    info = json.loads((out / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "cerebral cortex": 1, "deep grey nuclei": 2, "cerebellum": 3}
    dm = build_datamodule("generic", root=out)
    assert dm.class_names == ["cerebral cortex", "deep grey nuclei", "cerebellum"]
    assert dm.default_intensity() == "mr_percentile"
    split = dm.default_split()
    assert sorted(split.train) == ["colin27_z008", "colin27_z016", "colin27_z032"]
    assert split.test == ["colin27_z024"]


def test_missing_atlas_names_the_package(tmp_path):
    folder = write_templates(tmp_path / "templates")
    (folder / "aal.nii.gz").unlink()
    with pytest.raises(SamoraError, match="aal.nii.gz.*mricron-data"):
        prepare("colin27", folder, tmp_path / "out", progress=False)


def test_cli_source_needs_the_generic_layout(tmp_path, capsys):
    folder = write_templates(tmp_path / "templates")
    args = ["prepare", f"prepare.raw={folder}", f"prepare.out={tmp_path / 'out'}", "prepare.source=colin27"]
    assert main([*args, "data.name=synapse"]) != 0
    assert "set data.name=generic" in capsys.readouterr().err
    assert main([*args, "data.name=generic"]) == 0
    assert (tmp_path / "out" / "dataset.json").is_file()
    assert main([*args[:-1], "prepare.source=atlas", "data.name=generic"]) != 0
    assert "prepare.source" in capsys.readouterr().err

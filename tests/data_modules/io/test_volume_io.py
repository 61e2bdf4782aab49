"""Volumes keep their voxels and geometry through a write and a read, in every format predictions use."""

import numpy as np
import pytest

from data_modules.io.volume_io import Geometry, read_image, strip_image_suffix, write_image
from samora_pl.errors import SamoraError

GEOMETRY = Geometry((2.5, 0.75, 0.5), (10.0, -5.0, 3.0), (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))


@pytest.mark.parametrize("name", ["case.nii.gz", "case.nii", "case.mhd", "case.mha"])
def test_label_map_round_trip_keeps_voxels_and_geometry(tmp_path, name):
    label = np.random.default_rng(0).integers(0, 3, size=(4, 5, 6)).astype(np.uint8)
    write_image(tmp_path / name, label, GEOMETRY)
    back, geometry = read_image(tmp_path / name)
    assert back.shape == (4, 5, 6) and np.array_equal(back, label)
    np.testing.assert_allclose(geometry.spacing, GEOMETRY.spacing, rtol=1e-6)
    np.testing.assert_allclose(geometry.origin, GEOMETRY.origin, atol=1e-6)
    np.testing.assert_allclose(geometry.direction, GEOMETRY.direction, atol=1e-6)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted([name] + (["case.raw"] if name.endswith(".mhd") else []))


def test_geometry_survives_plain_metadata():
    assert Geometry.from_meta(GEOMETRY.to_meta()) == GEOMETRY
    assert Geometry.from_meta(None) == Geometry()


def test_unreadable_mhd_names_the_file(tmp_path):
    header = tmp_path / "Case00.mhd"
    header.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 5 6\nElementType = MET_UCHAR\nElementDataFile = Case00.raw\n"
    )
    with pytest.raises(SamoraError, match="Case00.mhd: cannot read"):
        read_image(header)
    with pytest.raises(SamoraError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")


def test_suffixes():
    assert strip_image_suffix("img0001.nii.gz") == "img0001"
    assert strip_image_suffix("Case07_segmentation.mhd") == "Case07_segmentation"
    with pytest.raises(SamoraError, match="nii.gz"):
        write_image("/tmp/never.png", np.zeros((1, 2, 2), np.uint8), Geometry())

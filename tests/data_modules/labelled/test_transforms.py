"""SAMed-style augmentation: sizes, dtypes, value range, image/label alignment, seeding."""

import math

import numpy as np
import pytest
import torch

from data_modules.labelled.transforms import SegmentationTransform, _rotation_grid, resize_label, rot90_flip, rotate
from tests.data_modules.volume_writers import phantom_slice


def _agreement(out) -> float:
    """Share of interior pixels (3x3 label neighbourhood constant) whose image level k / 10 equals the label.

    The image is the label divided by 10, so any misalignment between the image and label paths (a flip or
    rotation applied differently, a shifted resize) shows up inside the regions, not only at their edges.
    """
    img = out["image"][0].numpy() * 10.0
    lab = out["label"].numpy()
    pad = np.pad(lab, 1, mode="edge")
    shifts = [
        pad[1 + dy : 1 + dy + lab.shape[0], 1 + dx : 1 + dx + lab.shape[1]] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    ]
    interior = np.all([s == lab for s in shifts], axis=0)
    return float((np.abs(img[interior] - lab[interior]) < 0.5).mean())


@pytest.mark.parametrize("size", [(64, 64), (80, 48)])
@pytest.mark.parametrize("probs", [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, 0.5)])
def test_output_sizes_types_and_alignment(size, probs):
    rng = np.random.default_rng(1)
    image, label = phantom_slice(rng, 64)
    if size != (64, 64):
        image, label = image[: size[0], : size[1]].copy(), label[: size[0], : size[1]].copy()
    t = SegmentationTransform(32, low_res_factor=4, rot_flip_prob=probs[0], rotate_prob=probs[1])
    torch.manual_seed(0)
    for _ in range(8):
        out = t(image, label)
        assert out["image"].shape == (1, 32, 32) and out["image"].dtype == torch.float32
        assert out["label"].shape == (32, 32) and out["label"].dtype == torch.uint8
        assert out["low_res_label"].shape == (8, 8) and out["low_res_label"].dtype == torch.uint8
        assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
        assert set(out["label"].unique().tolist()) <= set(np.unique(label).astype(int).tolist())
        assert _agreement(out) > 0.97


def test_rot90_flip_is_exact_and_aligned():
    rng = np.random.default_rng(2)
    image, label = phantom_slice(rng, 32)
    img = torch.from_numpy(image)[None, None]
    lab = torch.from_numpy(label)[None, None]
    for k in range(4):
        for axis in (0, 1):
            i2, l2 = rot90_flip(img, lab, k, axis)
            expected = np.flip(np.rot90(image, k), axis)
            assert np.array_equal(i2[0, 0].numpy(), expected)
            assert torch.equal(torch.round(i2 * 10), l2)


def test_rotate_by_90_matches_rot90_and_keeps_size():
    rng = np.random.default_rng(3)
    image, label = phantom_slice(rng, 32)
    img = torch.from_numpy(image)[None, None]
    lab = torch.from_numpy(label)[None, None]
    i2, l2 = rotate(img, lab, 90.0)
    assert i2.shape == img.shape
    candidates = [torch.rot90(lab, 1, (2, 3)), torch.rot90(lab, -1, (2, 3))]
    assert any(torch.equal(l2, c) for c in candidates)
    i3, l3 = rotate(img, lab, 13.0)
    # nearest keeps label values; zeros padded in the corners
    assert set(l3.unique().tolist()) <= set(lab.unique().tolist())


def test_no_augment_only_resizes_and_low_res_is_nearest():
    rng = np.random.default_rng(4)
    image, label = phantom_slice(rng, 64)
    out = SegmentationTransform(64, augment=False)(image, label)
    assert np.allclose(out["image"][0].numpy(), image)
    assert np.array_equal(out["label"].numpy(), label)
    low = resize_label(torch.from_numpy(label)[None, None], 16)[0, 0]
    assert torch.equal(out["low_res_label"], low)


def test_seeded_augmentation_repeats():
    rng = np.random.default_rng(5)
    image, label = phantom_slice(rng, 48)
    t = SegmentationTransform(32)
    torch.manual_seed(7)
    a = [t(image, label)["label"] for _ in range(6)]
    torch.manual_seed(7)
    b = [t(image, label)["label"] for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({x.numpy().tobytes() for x in a}) > 1  # it does augment


def test_bad_sizes():
    with pytest.raises(ValueError):
        SegmentationTransform(30, low_res_factor=4)
    with pytest.raises(ValueError):
        SegmentationTransform(32)(np.zeros((8, 8), np.float32), np.zeros((8, 9), np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32, np.int32])
def test_label_dtypes_and_large_ids(dtype):
    label = np.zeros((40, 40), dtype)
    label[5:20, 5:20] = 3
    if dtype in (np.int64, np.float32, np.int32):
        label[25:35, 25:35] = 300  # more than 255 classes stays exact
    t = SegmentationTransform(16, rot_flip_prob=0.0, rotate_prob=1.0)
    torch.manual_seed(0)
    out = t(np.zeros((40, 40), np.float32), label)
    assert out["label"].dtype == (torch.uint8 if dtype == np.uint8 else torch.int64)  # ids above 255 need int64
    assert set(out["label"].unique().tolist()) <= set(np.unique(label).astype(int).tolist())
    assert 3 in out["label"].unique().tolist()


@pytest.mark.parametrize("h,w", [(64, 64), (40, 56), (7, 11)])
@pytest.mark.parametrize("angle", [-20.0, -3.5, 0.0, 13.0])
def test_rotation_grid_matches_affine_grid(h, w, angle):
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    theta = torch.tensor([[[c, -s * h / w, 0.0], [s * w / h, c, 0.0]]], dtype=torch.float32)
    expected = torch.nn.functional.affine_grid(theta, [1, 1, h, w], align_corners=False)
    assert torch.allclose(_rotation_grid(h, w, c, s), expected, rtol=0, atol=1e-6)


def test_train_size_goes_through_224_before_the_model_size_as_samed_trains():
    """SAMed trains on its 224 release zoomed to 512: the image is the 224 slice resized, not a direct resize."""
    from data_modules.labelled.transforms import resize_image

    rng = np.random.default_rng(6)
    image, label = phantom_slice(rng, 512)
    out = SegmentationTransform(512, augment=False, train_size=224)(image, label)
    x = torch.from_numpy(image)[None, None]
    via_224 = resize_image(resize_image(x, 224), 512)[0]
    direct = resize_image(x, 512)[0]
    assert out["image"].shape == (1, 512, 512) and out["label"].shape == (512, 512)
    assert torch.allclose(out["image"], via_224)
    assert not torch.allclose(out["image"], direct, atol=1e-3)  # the native 512 slice, untouched
    lab_224 = resize_label(torch.from_numpy(label)[None, None], 224)
    assert torch.equal(out["label"], resize_label(lab_224, 512)[0, 0])
    assert torch.equal(out["low_res_label"], resize_label(lab_224, 128)[0, 0])


def test_train_size_augments_at_that_size():
    rng = np.random.default_rng(8)
    image, label = phantom_slice(rng, 64)
    out = SegmentationTransform(64, train_size=32, rot_flip_prob=1.0)(image, label)
    assert out["image"].shape == (1, 64, 64) and _agreement(out) > 0.9  # 0.92 without augmentation
    with pytest.raises(ValueError):
        SegmentationTransform(64, train_size=0)

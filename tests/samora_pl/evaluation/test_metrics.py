"""The protocol metrics against medpy (the oracle), bit for bit."""

import os

import numpy as np
import pytest
from medpy.metric.binary import dc, hd95
from scipy import ndimage

from samora_pl.errors import SamoraError
from samora_pl.evaluation import case_metrics, evaluate_cases, summarise
from samora_pl.evaluation.metrics import _erode_cross


def reference_case(pred, label, num_classes, spacing=None):
    """The evaluation protocol (docs/method.md) written with medpy, the way SAMed's calculate_metric_percase does it."""
    rows = []
    for c in range(1, num_classes + 1):
        p, t = pred == c, label == c
        if p.sum() > 0 and t.sum() > 0:
            row = {"class_id": c, "dice": dc(p, t), "hd95": hd95(p, t)}
            if spacing is not None:
                row["hd95_mm"] = hd95(p, t, voxelspacing=spacing)
        elif p.sum() > 0:
            row = {"class_id": c, "dice": 1, "hd95": 0}
            if spacing is not None:
                row["hd95_mm"] = 0
        else:
            row = {"class_id": c, "dice": 0, "hd95": 0}
            if spacing is not None:
                row["hd95_mm"] = 0
        row["label_present"] = bool(t.sum() > 0)
        rows.append(row)
    return rows


def assert_rows_identical(mine, ref):
    assert len(mine) == len(ref)
    for a, b in zip(mine, ref):
        assert a.keys() == b.keys()
        for k in a:
            assert type(a[k]) is bool if k == "label_present" else type(a[k]) in (int, float)
            assert a[k] == b[k], (a["class_id"], k, a[k], b[k])  # bitwise: ==, never allclose


def _ellipsoid(shape, centre, radii):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r = sum(((g - c) / max(rad, 0.5)) ** 2 for g, c, rad in zip(grids, centre, radii))
    return r <= 1.0


def random_case(seed, shape=(24, 40, 36), num_classes=5):
    """Blobs of varied sizes (single voxels to large), some cut by the volume border; a perturbed prediction
    with classes missing from the prediction, classes only in the prediction, and classes in neither."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    kinds = rng.permutation(["normal", "normal", "pred_empty", "label_empty", "both_empty", "single", "border"])
    predictable = [0]
    for c in range(1, num_classes + 1):
        kind = kinds[(c - 1) % len(kinds)]
        if kind not in ("pred_empty", "both_empty"):
            predictable.append(c)
        if kind == "both_empty":
            continue
        for _ in range(int(rng.integers(1, 3))):
            radii = (0, 0, 0) if kind == "single" else tuple(rng.uniform(0.5, 9, 3))
            centre = [rng.uniform(0, n - 1) for n in shape]
            if kind == "border":
                ax = int(rng.integers(3))
                centre[ax] = float(rng.choice([0, shape[ax] - 1]))
            blob = _ellipsoid(shape, centre, radii)
            if kind != "label_empty":
                label[blob] = c
            if kind == "pred_empty":
                continue
            op = int(rng.integers(4))
            if op == 0:
                blob = ndimage.binary_dilation(blob, iterations=int(rng.integers(1, 3)))
            elif op == 1:
                eroded = ndimage.binary_erosion(blob)
                blob = eroded if eroded.any() else blob
            elif op == 2:
                blob = np.roll(blob, int(rng.integers(-3, 4)), axis=int(rng.integers(3)))
            pred[blob] = c
        if kind not in ("pred_empty",) and rng.random() < 0.5:  # a stray false-positive voxel or speck
            z, y, x = (int(rng.integers(0, n)) for n in shape)
            pred[z : z + 2, y : y + 1, x : x + 2] = c
    flips = rng.random(shape) < 0.002  # salt noise (keeping absent classes absent)
    pred[flips] = rng.choice(predictable, int(flips.sum()))
    return pred, label


@pytest.mark.parametrize("seed", range(8))
def test_random_volumes_equal_medpy_bitwise(seed):
    pred, label = random_case(seed)
    assert_rows_identical(case_metrics(pred, label, 5), reference_case(pred, label, 5))


@pytest.mark.parametrize("seed", range(4))
def test_spacing_column_equals_medpy_voxelspacing(seed):
    pred, label = random_case(100 + seed)
    spacing = [(3.0, 0.7, 0.7), (1.5, 0.8125, 0.8125), (2.5, 1.0, 0.6), 1.7][seed]
    mine = case_metrics(pred, label, 5, spacing=spacing)
    assert_rows_identical(mine, reference_case(pred, label, 5, spacing=spacing))
    # the protocol value is untouched by the spacing
    assert [r["hd95"] for r in mine] == [r["hd95"] for r in case_metrics(pred, label, 5)]


def test_edge_cases_of_the_protocol():
    label = np.zeros((10, 12, 14), np.uint8)
    pred = np.zeros_like(label)
    label[2:5, 2:5, 2:5] = 1  # class 1: predicted exactly
    pred[2:5, 2:5, 2:5] = 1
    pred[6, 6, 6] = 2  # class 2: predicted, absent from the label -> (1, 0)
    label[7:9, 7:9, 7:9] = 3  # class 3: in the label, not predicted -> (0, 0)
    # class 4: in neither -> (0, 0)
    pred[0, 0, 0] = 5  # class 5: single voxels in a corner, the same voxel
    label[0, 0, 0] = 5
    rows = case_metrics(pred, label, 5, spacing=(2.0, 1.0, 1.0))
    got = [(r["dice"], r["hd95"], r["hd95_mm"]) for r in rows]
    assert got == [(1.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0)]
    assert_rows_identical(rows, reference_case(pred, label, 5, spacing=(2.0, 1.0, 1.0)))


def test_cubes_shifted_by_three_voxels():
    # Cubes of side 10 shifted by 3 along the first axis: Dice = 2*700/2000 = 0.7. The 100 voxels of the
    # leading face of each cube are 3 away from the other border (20% of the 976 pooled distances) and
    # no border voxel is further than 3, so HD95 = 3 voxels, and 6 mm with spacing 2 on that axis.
    label = np.zeros((30, 24, 24), np.uint8)
    pred = np.zeros_like(label)
    label[5:15, 5:15, 5:15] = 1
    pred[8:18, 5:15, 5:15] = 1
    (row,) = case_metrics(pred, label, 1, spacing=(2.0, 1.0, 1.0))
    assert row == {"class_id": 1, "dice": 0.7, "hd95": 3.0, "hd95_mm": 6.0, "label_present": True}
    assert_rows_identical([row], reference_case(pred, label, 1, spacing=(2.0, 1.0, 1.0)))


def test_known_distances_single_voxels_and_plates():
    label = np.zeros((12, 12, 12), np.uint8)
    pred = np.zeros_like(label)
    label[2, 2, 2] = 1
    pred[2, 5, 6] = 1  # offset (0, 3, 4): distance 5
    label[8, 1:11, 1:11] = 2  # two parallel one-voxel plates 3 apart
    pred[11, 1:11, 1:11] = 2  # ... the second on the volume border
    rows = case_metrics(pred, label, 2)
    assert rows[0] == {"class_id": 1, "dice": 0.0, "hd95": 5.0, "label_present": True}
    assert rows[1] == {"class_id": 2, "dice": 0.0, "hd95": 3.0, "label_present": True}


@pytest.mark.parametrize(
    "offset", [(1, 0, 0), (1, 1, 0), (1, 1, 1), (0, 2, 0), (1, 2, 0), (1, 1, 2), (2, 2, 0), (0, 0, 3), (4, 5, 6)]
)
def test_distances_across_the_local_search_and_the_kd_tree(offset):
    # Squared distances up to 6 come from the local offset search, beyond from the k-d tree (7 is not a sum
    # of three squares, 8 is the first beyond); both must give the exact EDT value.
    label = np.zeros((14, 14, 14), np.uint8)
    pred = np.zeros_like(label)
    label[3, 3, 3] = 1
    pred[3 + offset[0], 3 + offset[1], 3 + offset[2]] = 1
    label[10, 2:12, 2:12] = 2  # a plate and a plate tilted relative to it: a spread of distances
    for i in range(10):
        pred[10 - offset[0] + (i * offset[2]) // 10, 2 + i, 2:12] = 2
    rows = case_metrics(pred, label, 2)
    assert rows[0]["hd95"] == np.sqrt(float(sum(o * o for o in offset)))
    assert_rows_identical(rows, reference_case(pred, label, 2))
    for spacing in [(2.5, 1.0, 0.6), (3.0, 0.75, 0.75)]:
        assert_rows_identical(
            case_metrics(pred, label, 2, spacing=spacing), reference_case(pred, label, 2, spacing=spacing)
        )


def test_objects_filling_the_volume_and_touching_every_border():
    rng = np.random.default_rng(3)
    label = np.ones((6, 7, 8), np.uint8)  # the whole volume: every voxel touches the outside or not
    pred = np.ones_like(label)
    pred[rng.random(pred.shape) < 0.3] = 2
    label[0] = 2
    assert_rows_identical(case_metrics(pred, label, 2), reference_case(pred, label, 2))


def test_thin_volumes_and_2d():
    rng = np.random.default_rng(5)
    for shape in [(1, 20, 20), (2, 15, 17), (20, 20)]:
        label = (ndimage.gaussian_filter(rng.random(shape), 2) > 0.5).astype(np.uint8)
        pred = (ndimage.gaussian_filter(rng.random(shape), 2) > 0.5).astype(np.uint8)
        label.flat[0] = 1
        pred.flat[-1] = 1
        assert_rows_identical(case_metrics(pred, label, 1), reference_case(pred, label, 1))


def test_cross_erosion_equals_scipy():
    rng = np.random.default_rng(0)
    for shape in [(5, 6, 7), (1, 4, 4), (3, 1, 5), (9, 9), (2, 2, 2), (7,)]:
        mask = rng.random(shape) < 0.7
        ref = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1), iterations=1)
        assert np.array_equal(_erode_cross(mask), ref)


def test_input_types_float_labels_bool_and_out_of_range_values():
    pred, label = random_case(42)
    ref = case_metrics(pred, label, 5)
    assert case_metrics(pred.astype(np.int64), label.astype(np.float32), 5) == ref  # Synapse labels are float32
    noisy = pred.astype(np.int16)
    noisy[0, 0, :3] = [-1, 9, 200]  # outside 1..K: background for the protocol
    ref_noisy = reference_case(noisy, label, 5)
    assert_rows_identical(case_metrics(noisy, label, 5), ref_noisy)
    assert case_metrics(pred == 1, label == 1, 1)[0] == ref[0]


def test_user_errors():
    a = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(SamoraError, match="shape"):
        case_metrics(a, np.zeros((4, 5, 7), np.uint8), 2)
    with pytest.raises(SamoraError, match="non-integer"):
        case_metrics(a, np.full((4, 5, 6), 0.5, np.float32), 2)
    with pytest.raises(SamoraError, match="spacing"):
        case_metrics(a, a, 2, spacing=(1.0, 1.0))
    with pytest.raises(SamoraError, match="num_classes"):
        case_metrics(a, a, 0)


@pytest.mark.slow
def test_workers_give_identical_rows_in_any_order():
    cases = [(f"case{i:04d}", *random_case(200 + i, shape=(16, 28, 28)), (2.0, 0.75, 0.75)) for i in range(5)]
    serial = evaluate_cases(cases, 5, workers=1)
    parallel = evaluate_cases(reversed(cases), 5, workers=2)
    assert serial == parallel
    assert [(r["case"], r["class_id"]) for r in serial] == [(c[0], k) for c in cases for k in range(1, 6)]
    for case, pred, label, spacing in cases:
        mine = [{k: v for k, v in r.items() if k != "case"} for r in serial if r["case"] == case]
        assert_rows_identical(mine, reference_case(pred, label, 5, spacing=spacing))


@pytest.mark.slow
def test_workers_with_shared_memory_transport(monkeypatch):
    from samora_pl.evaluation import pool as pool_mod

    monkeypatch.setattr(pool_mod, "_SHM_MIN_BYTES", 0)  # the parent decides: every array goes through /dev/shm
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    cases = [(f"case{i}", *random_case(300 + i, shape=(12, 20, 24))) for i in range(4)]
    cases[1] = (cases[1][0], cases[1][1], cases[1][2].astype(np.float32))  # Synapse-style float label
    cases[2] = (cases[2][0], cases[2][1].astype(np.int64), cases[2][2].astype(np.int16))  # wide integer maps
    cases[2][1][0, 0, :2] = [-3, 300]  # values outside 1..K are background
    assert evaluate_cases(cases, 5, workers=2) == evaluate_cases(cases, 5, workers=1)
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert after <= before  # every block freed


def test_worker_errors_surface():
    bad = np.full((4, 5, 6), 0.5, np.float32)
    with pytest.raises(SamoraError, match="non-integer"):
        evaluate_cases([("a", bad, bad), ("b", bad, bad)], 2, workers=2)
    with pytest.raises(SamoraError, match="twice"):
        evaluate_cases([("a", bad.round(), bad.round()), ("a", bad.round(), bad.round())], 2)


def test_summarise_means_over_cases_then_classes():
    rows = [
        {"case": "b", "class_id": 1, "dice": 0.5, "hd95": 4.0, "hd95_mm": 8.0},
        {"case": "a", "class_id": 1, "dice": 1.0, "hd95": 0.0, "hd95_mm": 0.0},
        {"case": "a", "class_id": 2, "dice": 0.25, "hd95": 10.0, "hd95_mm": 5.0},
        {"case": "b", "class_id": 2, "dice": 0.75, "hd95": 2.0, "hd95_mm": 1.0},
    ]
    s = summarise(rows, ["liver", "spleen"])
    assert s["per_class"]["liver"] == {"class_id": 1, "dice": 0.75, "hd95": 2.0, "hd95_mm": 4.0}
    assert s["per_class"]["spleen"] == {"class_id": 2, "dice": 0.5, "hd95": 6.0, "hd95_mm": 3.0}
    assert (s["mean_dice"], s["mean_hd95"], s["mean_hd95_mm"], s["num_cases"]) == (0.625, 4.0, 3.5, 2)
    assert summarise(rows[::-1], {1: "liver", 2: "spleen"}) == s
    without_mm = [{k: v for k, v in r.items() if k != "hd95_mm"} for r in rows]
    assert "mean_hd95_mm" not in summarise(without_mm, ["liver", "spleen"])
    with pytest.raises(SamoraError, match="class name"):
        summarise(rows, ["liver"])
    with pytest.raises(SamoraError, match="no evaluation rows"):
        summarise([], ["liver"])


def test_dice_where_present_beside_the_protocol_value():
    """Two cases; class 2 is absent from case b. The protocol scores b's false positive of class 2 as 1
    (and a correctly empty prediction as 0); the extra column leaves such cases out."""
    from samora_pl.evaluation.report import format_table

    label_a = np.zeros((4, 8, 8), np.uint8)
    label_a[:, :4, :4], label_a[:, 4:, 4:] = 1, 2
    label_b = np.zeros_like(label_a)
    label_b[:, :4, :4] = 1
    pred_a = label_a.copy()
    pred_a[:, 4:, 4:6] = 0  # class 2 half found: Dice 2/3
    pred_b = label_b.copy()
    pred_b[0, 7, 7] = 2  # one stray voxel of class 2 where there is none
    rows = [dict(r, case="a") for r in case_metrics(pred_a, label_a, 2)]
    rows += [dict(r, case="b") for r in case_metrics(pred_b, label_b, 2)]
    assert [r["label_present"] for r in rows] == [True, True, True, False]
    s = summarise(rows, ["one", "two"])
    assert s["per_class"]["two"]["dice"] == pytest.approx((2 / 3 + 1) / 2)  # the protocol's reward
    assert (
        s["per_class"]["two"]["dice_present"] == pytest.approx(2 / 3) and s["per_class"]["two"]["absent_predicted"] == 1
    )
    assert s["mean_dice_present"] == pytest.approx((1 + 2 / 3) / 2)
    assert s["mean_dice"] == pytest.approx((1 + 5 / 6) / 2)
    note = format_table(s)
    assert "Dice over the cases that hold each class (not the protocol's): 83.33 %" in note
    assert "two in 1 case(s)" in note

"""Per-case Dice and HD95 under the SAMed / TransUNet / H-SAM protocol, exactly and fast.

The protocol (docs/method.md, section Evaluation protocol), per test volume and class c in 1..K, on the
whole 3-D label maps:

* prediction and label both contain c -> Dice and HD95 exactly as ``medpy.metric.binary.dc`` and
  ``medpy.metric.binary.hd95`` compute them with unit spacing (HD95 is in voxels);
* prediction contains c, label does not -> (1, 0);
* prediction does not contain c -> (0, 0).

medpy's HD95: the border of a mask is ``mask XOR binary_erosion(mask, 1-connectivity, iterations=1)``
(voxels outside the array count as background), the distance of every border voxel of one mask to the
nearest border voxel of the other is read from a Euclidean distance transform, both directions are
pooled and the 95th percentile (``numpy.percentile``, linear) is taken.

This module returns the same numbers bit for bit (tests compare with ``==``) while doing far less work:

1. One ``find_objects`` pass per label map gives the bounding box of every class; each class is then
   handled inside the bounding box of (prediction OR label) grown by one voxel and clipped to the volume.
   Why that crop is exact:

   * Erosion. A mask voxel inside the crop keeps all six face neighbours inside the crop: either the
     neighbour is inside the grown box, or the box was clipped there, in which case the neighbour lies
     outside the volume too, and scipy treats the outside as background both for the crop and for the
     full volume (``border_value=0``). So erosion, and hence the border, is identical on every mask voxel
     of the crop. Voxels of the one-voxel margin and everything outside the crop are background, so they
     are never border voxels in either computation.
   * Distances. HD95 only reads the distance from a border voxel of one mask to the *nearest border voxel
     of the other mask*. All border voxels of both masks lie inside the crop, so the set of candidate
     nearest voxels is the same as in the full volume and every distance is unchanged.
   * Dice only counts mask voxels, and all of them lie inside the crop.

2. Instead of a distance transform of the whole crop (distances for every voxel, almost all of which
   are never read), distances are computed only where they are needed: at border voxels, one direction
   at a time, for the border voxels not shared by both masks (shared ones have distance 0).

   * Near partners: the lattice offsets inside a small ball (about 80 of them; at unit spacing all
     squared lengths 1..6) are looked up around each border voxel in the other border mask, grouped by
     length and shortest group first, so the first group with a hit gives the exact nearest distance
     (the border mask is padded so lookups never leave it; the searched box is wide enough that no
     offset outside it is shorter than the ball's radius).
   * Far partners: a k-d tree over the other border's (spacing-scaled) voxel coordinates finds the
     nearest voxel (exact nearest neighbour, ``eps=0``).

   Either way the value is computed from the integer offset with the EDT's own formula,
   ``sqrt(((d0*s0)**2 + (d1*s1)**2) + (d2*s2)**2)`` in float64 (``distance_transform_edt`` takes the
   offset to the nearest feature, multiplies by the sampling, squares, sums over axes in order and takes
   the square root). At unit spacing every squared distance is an exact integer, so it does not matter
   which of several equally near voxels is used: the protocol value is bit for bit the EDT's.
   ``numpy.percentile`` depends only on the multiset of pooled distances, not on their order, so the
   order in which border voxels are visited does not matter either.

With ``spacing`` a second, spacing-aware HD95 (``hd95_mm``, the same computation with the voxel spacing
as sampling, like ``medpy.metric.binary.hd95(..., voxelspacing=spacing)``) is added as an extra column;
it never replaces the protocol value. With anisotropic spacing two different offsets can have lengths
that agree to within rounding, and then this code and scipy's EDT may pick different ones: in such a
near tie the value could differ from medpy's in the last bit (about 1e-16 relative). In the tests and a
150-case random stress run with anisotropic spacings it matched medpy exactly.

Erosion with the six-neighbour cross is done with shifted logical ANDs (same result as
``scipy.ndimage.binary_erosion`` with ``generate_binary_structure(ndim, 1)``, border value 0, one
iteration, about ten times faster).

Cases are independent; :mod:`samora_pl.evaluation.pool` evaluates many of them in a process pool.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from samora_pl.errors import SamoraError

__all__ = ["case_metrics", "summarise", "sort_rows"]


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------
def _as_label_map(array: Any, what: str, num_classes: int, compact: bool = False) -> np.ndarray:
    """An integer label map with the same class membership as ``array == c`` for c in 1..K.

    Float maps must hold whole numbers and become the smallest integer type; ``compact`` does the same
    for wide integer types (values outside 0..K become 0), which the process pool uses to move fewer bytes.
    """
    arr = np.asarray(array)
    dtype = np.uint8 if num_classes < 256 else np.int32
    if arr.dtype == np.bool_:
        return arr.view(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        if compact and arr.dtype.itemsize > np.dtype(dtype).itemsize:
            return np.where((arr >= 0) & (arr <= num_classes), arr, 0).astype(dtype)
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        # Synapse's test labels are stored as float32; they must still be whole class ids.
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise SamoraError(
                f"the {what} volume holds non-integer values (or NaN); class ids must be whole numbers. "
                "Check that labels were resized with nearest neighbour, not interpolated."
            )
        keep = (rounded >= 0) & (rounded <= num_classes)
        return np.where(keep, rounded, 0).astype(dtype)
    raise SamoraError(f"the {what} volume has dtype {arr.dtype}; expected integer, bool or float class ids")


def _normalise_spacing(spacing: Any, ndim: int) -> np.ndarray:
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.ndim == 0:
        sp = np.full(ndim, float(sp))
    if sp.shape != (ndim,):
        raise SamoraError(f"spacing {tuple(np.atleast_1d(sp))} must have one value per volume axis ({ndim})")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise SamoraError(f"spacing {tuple(sp)} must be positive and finite")
    return sp


# --------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------
def _erode_cross(mask: np.ndarray) -> np.ndarray:
    """Binary erosion with the 1-connectivity cross, one iteration, outside = background.

    Equal to ``scipy.ndimage.binary_erosion(mask, generate_binary_structure(mask.ndim, 1))``.
    """
    out = mask.copy()
    for axis in range(mask.ndim):
        n = mask.shape[axis]
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        if n == 1:
            out[...] = False  # both neighbours along this axis are outside
            return out
        lo[axis] = slice(0, n - 1)
        hi[axis] = slice(1, n)
        out[tuple(hi)] &= mask[tuple(lo)]  # neighbour before
        out[tuple(lo)] &= mask[tuple(hi)]  # neighbour after
        first = [slice(None)] * mask.ndim
        last = [slice(None)] * mask.ndim
        first[axis] = 0
        last[axis] = n - 1
        out[tuple(first)] = False
        out[tuple(last)] = False
    return out


def _border(mask: np.ndarray) -> np.ndarray:
    return mask ^ _erode_cross(mask)


def _edt_sq(offsets: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Squared lengths of integer offsets exactly as ``distance_transform_edt`` computes them before its
    square root: float64, times the spacing, squared, summed over axes in order."""
    d = offsets.astype(np.float64) * spacing
    d *= d
    total = d[:, 0].copy()
    for axis in range(1, d.shape[1]):
        total += d[:, axis]
    return total


# Border voxels whose nearest partner is this close are resolved by looking up the lattice offsets
# around them; the rest go to a k-d tree. About this many offsets are looked up (80 at unit spacing:
# every squared length up to 6).
_LOCAL_OFFSETS = 80


@functools.lru_cache(maxsize=16)
def _shells(spacing: tuple[float, ...]) -> tuple[np.ndarray, tuple[tuple[float, np.ndarray], ...]]:
    """Per-axis search radius and the offsets within the search ball, grouped by equal squared length
    (as the EDT computes it), shortest first.

    The ball has radius ``limit`` chosen to hold about ``_LOCAL_OFFSETS`` offsets. The box searched has
    half-width ``floor(limit / s_i)`` along axis i, so every offset outside the box is longer than
    ``limit``; only offsets clearly shorter than ``limit`` are kept, so the first group holding a partner
    voxel gives the true nearest one.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    ndim = len(sp)
    unit_ball = math.pi ** (ndim / 2) / math.gamma(ndim / 2 + 1)
    limit = (_LOCAL_OFFSETS * float(np.prod(sp)) / unit_ball) ** (1.0 / ndim)
    radius = np.minimum(np.floor(limit / sp), 16).astype(np.int64)
    limit = min(limit, float(np.min((radius + 1) * sp)))  # the box must cover the ball
    axes = np.meshgrid(*[np.arange(-r, r + 1) for r in radius], indexing="ij")
    offsets = np.stack(axes, axis=-1).reshape(-1, ndim)
    sq = _edt_sq(offsets, sp)
    keep = (sq > 0) & (sq < (limit * (1 - 1e-9)) ** 2)
    offsets, sq = offsets[keep], sq[keep]
    order = np.argsort(sq, kind="stable")
    offsets, sq = offsets[order], sq[order]
    cuts = np.flatnonzero(np.diff(sq)) + 1
    groups = tuple((float(g[0]), o) for g, o in zip(np.split(sq, cuts), np.split(offsets, cuts)))
    return radius, groups


def _local_distances(src: np.ndarray, dst_mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance from each point of ``src`` to the nearest True voxel of ``dst_mask`` if it lies within the
    search ball of :func:`_shells`, else NaN. Groups of offsets are tried shortest first, so the first
    group with a hit gives the exact nearest distance, computed as the EDT computes it."""
    radius, groups = _shells(tuple(float(x) for x in spacing))
    padded = np.pad(dst_mask, [(int(r), int(r)) for r in radius])  # lookups never leave the array
    flat = padded.reshape(-1)
    strides = np.array(padded.strides, dtype=np.int64) // padded.itemsize
    index = (src + radius) @ strides
    out = np.full(len(src), np.nan)
    todo = np.arange(len(src))
    for sq, offsets in groups:
        if len(todo) == 0:
            break
        cur = index[todo]
        hit = np.zeros(len(todo), dtype=bool)
        for off in offsets @ strides:
            hit |= flat[cur + off]
        out[todo[hit]] = np.sqrt(sq)
        todo = todo[~hit]
    return out


def _tree_distances(src: np.ndarray, dst: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance from each point of ``src`` to the nearest point of ``dst``: a k-d tree over the
    spacing-scaled coordinates finds it, the EDT's formula computes the value from the integer offset."""
    tree = cKDTree(dst * spacing, balanced_tree=False)
    _, idx = tree.query(src * spacing, k=1)
    return np.sqrt(_edt_sq(dst[idx] - src, spacing))


class _Borders:
    """Border voxels of two masks (as masks and coordinates) and which lie on both borders."""

    def __init__(self, mask_a: np.ndarray, mask_b: np.ndarray):
        self.mask_a, self.mask_b = _border(mask_a), _border(mask_b)
        self.a = np.argwhere(self.mask_a)
        self.b = np.argwhere(self.mask_b)
        self.a_on_b = self.mask_b[tuple(self.a.T)]  # shared border voxels: distance 0 both ways
        self.b_on_a = self.mask_a[tuple(self.b.T)]
        self.n_shared = int(np.count_nonzero(self.a_on_b))

    def hd95(self, spacing: np.ndarray | None) -> float:
        """medpy's hd95 (both masks non-empty), with ``spacing`` as sampling (None: unit spacing)."""
        sp = np.ones(self.a.shape[1]) if spacing is None else spacing
        parts = [np.zeros(2 * self.n_shared, dtype=np.float64)]
        directions = ((self.a, self.b, self.a_on_b, self.mask_b), (self.b, self.a, self.b_on_a, self.mask_a))
        for src, dst, shared, dst_mask in directions:
            if self.n_shared == len(src):
                continue
            src = src[~shared]
            dist = _local_distances(src, dst_mask, sp)
            far = np.isnan(dist)
            if np.any(far):
                dist[far] = _tree_distances(src[far], dst, sp)
            parts.append(dist)
        return float(np.percentile(np.concatenate(parts), 95))


def _crop(box_p: tuple, box_l: tuple, shape: tuple) -> tuple:
    """Union of two bounding boxes grown by one voxel and clipped to the volume."""
    return tuple(
        slice(max(min(a.start, b.start) - 1, 0), min(max(a.stop, b.stop) + 1, n))
        for a, b, n in zip(box_p, box_l, shape)
    )


# --------------------------------------------------------------------------------------------------
# Public: one case
# --------------------------------------------------------------------------------------------------
def case_metrics(
    pred: Any,
    label: Any,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
) -> list[dict]:
    """Protocol metrics of one volume for classes 1..num_classes.

    Args:
        pred: predicted label map, any shape (the protocol uses (D, H, W)), integer/bool/float class ids.
        label: ground-truth label map, same shape (float class ids such as Synapse's are accepted).
        num_classes: K, the number of foreground classes; values outside 1..K count as background.
        spacing: voxel spacing per array axis (or one number for all); when given, each row also gets
            ``hd95_mm`` (HD95 with that spacing). ``hd95`` always stays in voxels (the protocol value).

    Returns:
        K dicts ``{"class_id", "dice", "hd95"[, "hd95_mm"], "label_present"}`` with Python floats, class 1
        first; ``label_present`` says whether the label holds the class (the protocol scores a prediction of
        an absent class 1 and a correct empty prediction 0, see :func:`summarise`).
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise SamoraError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    pred_arr = _as_label_map(pred, "prediction", num_classes)
    label_arr = _as_label_map(label, "label", num_classes)
    if pred_arr.shape != label_arr.shape:
        raise SamoraError(
            f"prediction shape {pred_arr.shape} differs from label shape {label_arr.shape}; "
            "predictions must be resized back to the label's geometry before evaluation"
        )
    if pred_arr.ndim == 0:
        raise SamoraError("prediction and label must be arrays with at least one axis")
    sp = None if spacing is None else _normalise_spacing(spacing, pred_arr.ndim)

    boxes_p = ndimage.find_objects(pred_arr, max_label=num_classes)
    boxes_l = ndimage.find_objects(label_arr, max_label=num_classes)
    rows = []
    for c in range(1, num_classes + 1):
        box_p = boxes_p[c - 1] if c - 1 < len(boxes_p) else None
        box_l = boxes_l[c - 1] if c - 1 < len(boxes_l) else None
        if box_p is None:  # prediction absent (label present or not)
            dice, hd, hd_mm = 0.0, 0.0, 0.0
        elif box_l is None:  # prediction present, label absent
            dice, hd, hd_mm = 1.0, 0.0, 0.0
        else:
            window = _crop(box_p, box_l, pred_arr.shape)
            p = pred_arr[window] == c
            t = label_arr[window] == c
            inter = int(np.count_nonzero(p & t))
            dice = 2.0 * inter / float(int(np.count_nonzero(p)) + int(np.count_nonzero(t)))
            borders = _Borders(p, t)
            hd = borders.hd95(None)
            hd_mm = borders.hd95(sp) if sp is not None else None
        row = {"class_id": c, "dice": float(dice), "hd95": float(hd), "label_present": box_l is not None}
        if sp is not None:
            row["hd95_mm"] = float(hd_mm)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Public: aggregation
# --------------------------------------------------------------------------------------------------
def sort_rows(rows: Iterable[dict]) -> list[dict]:
    """Rows ordered by case then class id (the order every output uses)."""
    return sorted(rows, key=lambda r: (r["case"], r["class_id"]))


def _names_by_id(class_names: Sequence[str] | dict, class_ids: Iterable[int]) -> dict[int, str]:
    if isinstance(class_names, dict):
        names = {int(k): str(v) for k, v in class_names.items()}
    else:
        names = {i: str(n) for i, n in enumerate(class_names, start=1)}
    missing = sorted(set(class_ids) - set(names))
    if missing:
        raise SamoraError(f"no class name for class ids {missing}; give one name per foreground class (1..K)")
    return names


def summarise(rows: Iterable[dict], class_names: Sequence[str] | dict) -> dict:
    """Protocol aggregation: per class the mean over cases, then means over classes.

    Args:
        rows: per-(case, class) dicts as returned by :func:`evaluate_cases` (``case`` key optional).
        class_names: names of classes 1..K in order, or a ``{class_id: name}`` mapping.

    Returns:
        ``{"mean_dice", "mean_hd95", ["mean_hd95_mm"], "num_cases", "per_class": {name: {"class_id",
        "dice", "hd95"[, "hd95_mm"]}}}``; Dice as a fraction in [0, 1], HD95 in voxels. With rows that say
        ``label_present`` (those of :func:`case_metrics`), also the extra column ``mean_dice_present`` and
        per class ``dice_present`` (mean over the cases whose label holds the class; None when none does)
        and ``absent_predicted`` (cases without the class where the prediction has it anyway). The
        protocol's own value scores such a case 1 and a correctly empty one 0, so on data where classes
        are often absent from a test case (slabs, crops) its Mean Dice rewards false positives;
        ``mean_dice_present`` is the mean over classes of ``dice_present``, never in place of the protocol.
    """
    rows = list(rows)
    if not rows:
        raise SamoraError("there are no evaluation rows to summarise (no test cases were evaluated)")
    if all("case" in r for r in rows):
        rows = sort_rows(rows)  # fixed summation order, whatever order the rows arrived in
    with_mm = all("hd95_mm" in r for r in rows)
    by_class: dict[int, list[dict]] = {}
    for r in rows:
        by_class.setdefault(int(r["class_id"]), []).append(r)
    class_ids = sorted(by_class)
    names = _names_by_id(class_names, class_ids)
    keys = ["dice", "hd95"] + (["hd95_mm"] if with_mm else [])
    per_class = {}
    for c in class_ids:
        entry: dict[str, Any] = {"class_id": c}
        for k in keys:
            entry[k] = float(np.mean([float(r[k]) for r in by_class[c]]))
        if all("label_present" in r for r in by_class[c]):
            present = [float(r["dice"]) for r in by_class[c] if r["label_present"]]
            entry["dice_present"] = float(np.mean(present)) if present else None
            entry["absent_predicted"] = sum(1 for r in by_class[c] if not r["label_present"] and r["dice"] > 0)
        per_class[names[c]] = entry
    out: dict[str, Any] = {
        "mean_dice": float(np.mean([v["dice"] for v in per_class.values()])),
        "mean_hd95": float(np.mean([v["hd95"] for v in per_class.values()])),
    }
    if with_mm:
        out["mean_hd95_mm"] = float(np.mean([v["hd95_mm"] for v in per_class.values()]))
    present = [v["dice_present"] for v in per_class.values() if v.get("dice_present") is not None]
    if present:
        out["mean_dice_present"] = float(np.mean(present))
    cases = {r["case"] for r in rows if "case" in r}
    out["num_cases"] = len(cases) if cases else max(len(v) for v in by_class.values())
    out["per_class"] = per_class
    return out

"""Benchmark: protocol Dice/HD95 of samora_pl.evaluation against the medpy loop it replaces.

On one synthetic abdominal CT label volume (default 100 x 512 x 512, Synapse's in-plane size) with 8
organs of realistic sizes (liver ~1M voxels, gallbladder ~10k, a thin long aorta, ...) and a prediction
made by perturbing it (boundary dilation / erosion, one-voxel shifts, stray false-positive specks far
from the organ, as real models produce), it times

* the baseline: SAMed's per-class loop (``pred == c``, ``label == c``, medpy ``dc`` and ``hd95`` when
  both are present, (1, 0) / (0, 0) otherwise) on the full volume;
* ``case_metrics`` on the same volume,

asserts that the numbers are identical (``==``), then runs several cases through ``evaluate_cases``
with 1 and 2 worker processes (identical rows asserted too). Prints ``name: value`` lines and, last,
``ratio: X`` (medpy wall time / samora_pl wall time on the single case; goal >= 40). ``ratio_cpu``
is the same with process CPU time, which other load on a shared machine distorts less.

    python benchmarks/evaluation.py                 # the default: 1-3 minutes on 2 cores (medpy dominates)
    python benchmarks/evaluation.py --depth 40      # smaller volumes, faster
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

try:
    from samora_pl.evaluation import CaseMetricsPool, case_metrics, evaluate_cases
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from samora_pl.evaluation import CaseMetricsPool, case_metrics, evaluate_cases

# name, centre as a fraction of (D, H, W), semi-axes in voxels at 100 x 512 x 512 (~3 x 0.75 x 0.75 mm)
ORGANS = [
    ("spleen", (0.45, 0.55, 0.78), (16, 50, 34)),
    ("kidney_r", (0.60, 0.62, 0.30), (16, 38, 26)),
    ("kidney_l", (0.58, 0.62, 0.70), (16, 38, 26)),
    ("gallbladder", (0.55, 0.45, 0.36), (8, 22, 16)),
    ("liver", (0.45, 0.45, 0.30), (28, 110, 85)),
    ("stomach", (0.40, 0.40, 0.62), (16, 60, 45)),
    ("aorta", (0.50, 0.58, 0.50), (48, 14, 14)),
    ("pancreas", (0.58, 0.52, 0.52), (8, 20, 70)),
]


def make_label(shape, seed):
    """Lumpy ellipsoids placed like abdominal organs (earlier organs keep overlapping voxels)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    scale = np.array([shape[0] / 100, shape[1] / 512, shape[2] / 512])
    for k, (_, centre, axes) in enumerate(ORGANS, start=1):
        c = np.array(centre) * np.array(shape) + rng.normal(0, 3, 3) * scale
        ax = np.maximum(np.array(axes, float) * scale * rng.uniform(0.9, 1.1, 3), 1.0)
        lo = np.maximum(np.floor(c - ax).astype(int), 0)
        hi = np.minimum(np.ceil(c + ax).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        r = ((zz - c[0]) / ax[0]) ** 2 + ((yy - c[1]) / ax[1]) ** 2 + ((xx - c[2]) / ax[2]) ** 2
        r = r + 0.15 * np.sin(yy / 7.0 + k) * np.cos(xx / 9.0 - k)
        sub = label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        sub[(r <= 1.0) & (sub == 0)] = k
    return label


def perturb(label, seed):
    """A plausible prediction: per organ a dilation, erosion or small shift, and sometimes a stray speck."""
    rng = np.random.default_rng(seed)
    pred = np.zeros_like(label)
    for k, box in enumerate(ndimage.find_objects(label), start=1):
        if box is None:
            continue
        box = tuple(slice(max(s.start - 4, 0), min(s.stop + 4, n)) for s, n in zip(box, label.shape))
        mask = label[box] == k
        op = rng.integers(3)
        if op == 0:
            mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
        elif op == 1:
            mask = ndimage.binary_erosion(mask)
        else:
            mask = np.roll(mask, int(rng.integers(-2, 3)), axis=int(rng.integers(3)))
        sub = pred[box]
        sub[mask & (sub == 0)] = k
        if rng.random() < 0.5:  # a false-positive speck anywhere in the volume
            z, y, x = (int(rng.integers(0, max(n - 6, 1))) for n in label.shape)
            pred[z : z + 3, y : y + 5, x : x + 5] = k
    return pred


def medpy_case(pred, label, num_classes):
    """The baseline: SAMed's calculate_metric_percase loop around medpy."""
    from medpy.metric.binary import dc, hd95

    rows = []
    for c in range(1, num_classes + 1):
        p, t = pred == c, label == c
        if p.sum() > 0 and t.sum() > 0:
            rows.append({"class_id": c, "dice": dc(p, t), "hd95": hd95(p, t)})
        elif p.sum() > 0:
            rows.append({"class_id": c, "dice": 1, "hd95": 0})
        else:
            rows.append({"class_id": c, "dice": 0, "hd95": 0})
    return rows


def best_of(fn, repeats):
    """Best wall time over ``repeats`` runs, the CPU time of this process in that run, and the result."""
    best, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - t0
        if wall < best:
            best, cpu = wall, time.process_time() - c0
    return best, cpu, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=100, help="slices per volume (default 100)")
    parser.add_argument("--size", type=int, default=512, help="in-plane size (default 512)")
    parser.add_argument("--cases", type=int, default=4, help="cases for the workers run (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats for samora_pl (best of)")
    args = parser.parse_args(argv)
    shape = (args.depth, args.size, args.size)
    k = len(ORGANS)

    label = make_label(shape, seed=0)
    pred = perturb(label, seed=1)
    counts = np.bincount(label.ravel(), minlength=k + 1)
    print(f"volume: {shape[0]}x{shape[1]}x{shape[2]}")
    print(f"cpu_count: {os.cpu_count()}")
    print(f"load_average_1min_at_start: {os.getloadavg()[0]:.2f}")
    print("organ_voxels: " + ", ".join(f"{n}={counts[i]}" for i, (n, _, _) in enumerate(ORGANS, start=1)))

    t_medpy, c_medpy, ref = best_of(lambda: medpy_case(pred, label, k), 1)
    t_ours, c_ours, mine = best_of(lambda: case_metrics(pred, label, k), args.repeats)
    for a, b in zip(mine, ref):
        assert a["dice"] == b["dice"] and a["hd95"] == b["hd95"], (a, b)
    t_mm, _, _ = best_of(lambda: case_metrics(pred, label, k, spacing=(3.0, 0.75, 0.75)), args.repeats)
    print("identical_to_medpy: True")
    print(f"mean_dice: {np.mean([r['dice'] for r in mine]):.6f}")
    print(f"mean_hd95: {np.mean([r['hd95'] for r in mine]):.6f}")
    print(f"medpy_loop_s: {t_medpy:.3f}")
    print(f"samora_pl_case_metrics_s: {t_ours:.3f}")
    print(f"medpy_loop_cpu_s: {c_medpy:.3f}")
    print(f"samora_pl_case_metrics_cpu_s: {c_ours:.3f}")
    print(f"ratio_cpu: {c_medpy / c_ours:.1f}")
    print(f"samora_pl_case_metrics_with_hd95_mm_s: {t_mm:.3f}")

    cases = []
    for i in range(args.cases):
        lab = make_label(shape, seed=10 + i)
        cases.append((f"case{i:04d}", perturb(lab, seed=100 + i), lab))
    t_w1, _, rows1 = best_of(lambda: evaluate_cases(cases, k, workers=1), 1)
    t0 = time.perf_counter()
    with CaseMetricsPool(k, workers=2) as pool:
        for worker in range(2):  # the pool starts one process per submitted case until it has them all
            pool.submit(f"warm-up-{worker}", np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.uint8))
        pool.rows()  # both worker processes are up
        t_start = time.perf_counter() - t0
        t1 = time.perf_counter()
        for case in cases:
            pool.submit(*case)
        rows2 = [r for r in pool.rows() if not r["case"].startswith("warm-up")]
        t_w2 = time.perf_counter() - t1
    assert rows1 == rows2
    print(f"cases: {args.cases}")
    print(f"workers1_s: {t_w1:.3f}")
    print(f"workers2_pool_start_s: {t_start:.3f}  (once per evaluation)")
    print(f"workers2_s: {t_w2:.3f}  (warm pool, includes moving the volumes to the workers)")
    print("workers_identical: True")
    print(f"workers_speedup: {t_w1 / t_w2:.2f}")
    print(f"load_average_1min_at_end: {os.getloadavg()[0]:.2f}  (other processes on the machine skew wall times)")
    print(f"ratio: {t_medpy / t_ours:.1f}")


if __name__ == "__main__":
    main()

"""A PNG montage of a label map over its image: a first look at a prediction without a medical viewer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samora_pl.records.atomic import atomic_save

ALPHA = 0.45  # label colour over the grey image


def montage_slices(label: np.ndarray, count: int) -> list[int]:
    """Up to `count` slice indices spread evenly over the slices with a label (over all when none has one)."""
    labelled = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
    candidates = labelled if labelled.size else np.arange(label.shape[0])
    picks = np.linspace(0, candidates.size - 1, min(count, candidates.size)).round().astype(int)
    return sorted({int(candidates[i]) for i in picks})


def write_overlay(path: Path, image: np.ndarray, label: np.ndarray, num_classes: int, count: int = 6) -> Path:
    """Write `path` (PNG): `count` slices of `image` (D, H, W) in [0, 1] with `label` (D, H, W) in colour.

    Colours are matplotlib's tab10 (tab20 beyond 10 classes), class k always the same colour, so montages
    of one model compare at a glance; the legend lists the classes present."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colours = colormaps["tab10" if num_classes <= 10 else "tab20"].colors
    slices = montage_slices(label, count)
    figure = Figure(figsize=(2.6 * len(slices), 3.0), layout="constrained")
    FigureCanvasAgg(figure)
    for ax, z in zip(np.atleast_1d(figure.subplots(1, len(slices))), slices):
        grey = np.clip(image[z], 0.0, 1.0)[..., None].repeat(3, axis=-1)
        for k in np.unique(label[z]):
            if k:
                mask = label[z] == k
                grey[mask] = (1 - ALPHA) * grey[mask] + ALPHA * np.asarray(colours[(k - 1) % len(colours)])
        ax.imshow(grey, interpolation="nearest")
        ax.set_title(f"slice {z}", fontsize=9)
        ax.axis("off")
    present = [int(k) for k in np.unique(label) if k]
    if present:
        figure.legend(
            handles=[Patch(color=colours[(k - 1) % len(colours)], label=str(k)) for k in present],
            loc="outside right center",
            fontsize=8,
            title="class",
            title_fontsize=8,
        )
    atomic_save(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return Path(path)

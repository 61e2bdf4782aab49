"""The labelled TRAINING slices a probe reads, and their seeded split into a fitting and a held-out part.

Only the dataset's training list is read (`train_names`, through the same data module as fine-tuning);
never a test volume. At most `max_slices` slices are drawn (seeded); the held-out part is a `holdout`
share of the drawn slices' cases (at least one case each side), or of the slices when they come from a
single case, so the probe scores generalisation to unseen patients where the data allows it.

Targets: per slice, which organs it contains (multi-label, [n, K]); per position of a grid (the encoder's
16-px stride), which class covers most of the patch (`patch_classes`).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data_modules.labelled.transforms import SegmentationTransform
from samora_pl.errors import SamoraError


@dataclass
class ProbeSlices:
    names: list
    cases: list
    images: torch.Tensor  # [n, 1, S, S] float32 in [0, 1]
    labels: torch.Tensor  # [n, S, S] int64, 0..K
    train: torch.Tensor  # indices of the fitting part
    test: torch.Tensor  # indices of the held-out part
    split_by: str  # "case" or "slice"
    num_classes: int

    def presence(self) -> torch.Tensor:
        """[n, K] float: whether each slice contains class c (1..K)."""
        flat = self.labels.reshape(self.labels.shape[0], -1)
        return torch.stack([(flat == c).any(1) for c in range(1, self.num_classes + 1)], 1).float()

    def summary(self) -> dict:
        return {
            "slices": len(self.names),
            "train_slices": int(self.train.numel()),
            "heldout_slices": int(self.test.numel()),
            "split_by": self.split_by,
            "train_cases": sorted({self.cases[i] for i in self.train.tolist()}),
            "heldout_cases": sorted({self.cases[i] for i in self.test.tolist()}),
        }


def split_indices(cases: list, holdout: float, seed: int):
    """(train, held-out, "case" | "slice"): whole cases held out when there are two or more."""
    rng = np.random.default_rng(seed)
    n = len(cases)
    distinct = sorted(set(cases))
    if len(distinct) >= 2:
        count = min(max(1, int(round(holdout * len(distinct)))), len(distinct) - 1)
        held = {distinct[i] for i in rng.permutation(len(distinct))[:count].tolist()}
        test = [i for i in range(n) if cases[i] in held]
        by = "case"
    else:
        count = min(max(1, int(round(holdout * n))), n - 1)
        test = sorted(rng.permutation(n)[:count].tolist())
        by = "slice"
    train = [i for i in range(n) if i not in set(test)]
    return torch.tensor(train), torch.tensor(test), by


def load_slices(data, img_size: int, max_slices: int, holdout: float, seed: int) -> ProbeSlices:
    """Read up to `max_slices` training slices of the data module `data` at `img_size`, not augmented."""
    names = data.train_names()
    if len(names) < 4:
        raise SamoraError(
            f"The training list of {data.root} has {len(names)} slices; a probe needs at least 4 to fit and score."
        )
    rng = np.random.default_rng(seed)
    if len(names) > max_slices:
        names = [names[i] for i in sorted(rng.choice(len(names), size=max_slices, replace=False).tolist())]
    reader, transform = data.slice_reader(), SegmentationTransform(img_size, 4, augment=False)
    images, labels = [], []
    for name in names:
        out = transform(*reader(name))
        images.append(out["image"])
        labels.append(out["label"].long())
    cases = [data.case_of(name) for name in names]
    train, test, by = split_indices(cases, holdout, seed)
    return ProbeSlices(names, cases, torch.stack(images), torch.stack(labels), train, test, by, data.num_classes)


def patch_classes(labels: torch.Tensor, grid, num_classes: int, chunk: int = 16) -> torch.Tensor:
    """[n, h, w] long: the majority class of each grid cell (the label pooled as one-hot shares), 0 background."""
    out = []
    for start in range(0, labels.shape[0], chunk):
        onehot = F.one_hot(labels[start : start + chunk], num_classes + 1).permute(0, 3, 1, 2).float()
        out.append(F.adaptive_avg_pool2d(onehot, tuple(grid)).argmax(1))
    return torch.cat(out)

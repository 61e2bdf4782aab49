"""H-SAM's two-stage loss (losses/hsam.py)."""

import pytest
import torch

from samora_pl.losses.hsam import HSAMLoss, stage2_weight
from samora_pl.losses.segmentation import SegmentationLoss


@pytest.mark.parametrize("epoch,w", [(0, 0.6), (10, 0.6300), (50, 0.734), (100, 0.8295), (200, 0.934), (299, 0.9750)])
def test_stage_weight_schedule(epoch, w):
    assert stage2_weight(epoch) == pytest.approx(w, abs=6e-4)
    assert stage2_weight(0) == 0.6


def test_each_stage_against_its_own_target_size():
    torch.manual_seed(0)
    m1, m2 = torch.randn(2, 9, 56, 56), torch.randn(2, 9, 224, 224)
    label = torch.randint(0, 9, (2, 224, 224))
    low = label[:, ::4, ::4]  # nearest resize by 4 of the full label
    parts = HSAMLoss(0.1, 0.9)(m1, m2, low, label, epoch=100)
    per_stage = SegmentationLoss(0.1, 0.9)
    assert torch.allclose(parts.stage1, per_stage(m1, low))
    assert torch.allclose(parts.stage2, per_stage(m2, label))
    w = 0.6 ** (0.99**100)
    assert parts.weight == pytest.approx(w)
    assert torch.allclose(parts.total, (1 - w) * parts.stage1 + w * parts.stage2)

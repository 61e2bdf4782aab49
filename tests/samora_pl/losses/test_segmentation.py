import torch

from samora_pl.losses.segmentation import SegmentationLoss


def reference_loss(logits, target, ce_weight=0.2, dice_weight=0.8):
    """The stage-2 loss of docs/method.md (section Stage 2: fine-tuning) written out by hand."""
    classes = logits.shape[1]
    ce = torch.nn.functional.cross_entropy(logits, target)
    probs = logits.softmax(dim=1)
    onehot = torch.nn.functional.one_hot(target, classes).permute(0, 3, 1, 2).float()
    dice_terms = []
    for c in range(classes):
        p, t = probs[:, c], onehot[:, c]
        dice_terms.append(1 - (2 * (p * t).sum() + 1e-5) / ((p * p).sum() + (t * t).sum() + 1e-5))
    return ce_weight * ce + dice_weight * torch.stack(dice_terms).mean()


def test_matches_reference_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 16, 16)
    target = torch.randint(0, 9, (3, 16, 16))
    target[0] = 0  # a class absent from some images
    assert torch.allclose(SegmentationLoss()(logits, target), reference_loss(logits, target), atol=1e-6)


def test_weights_are_applied():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    only_ce = SegmentationLoss(ce_weight=1.0, dice_weight=0.0)(logits, target)
    assert torch.allclose(only_ce, torch.nn.functional.cross_entropy(logits, target), atol=1e-6)


def test_perfect_prediction_has_low_loss():
    target = torch.randint(0, 4, (2, 8, 8))
    logits = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 50
    assert SegmentationLoss()(logits, target) < 1e-3

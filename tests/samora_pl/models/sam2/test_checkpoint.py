"""Official SAM 2 checkpoints: files written from the package's own builder (random weights, SAM 2.1 and
2.0 layouts) load into the segmenter at several sides; memory keys are dropped, anything else refused."""

import pytest
import torch

from samora_pl.errors import SamoraError
from samora_pl.models.sam.build import load_sam_checkpoint
from samora_pl.models.sam2.checkpoint import MEMORY_KEYS, MEMORY_PREFIXES
from samora_pl.models.sam2.segmenter import SAM2Segmenter

pytest.importorskip("sam2")


def _package_checkpoint(tmp_path_factory, config):
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2(config, ckpt_path=None, device="cpu", mode="eval")
    with torch.no_grad():  # zero-initialised parts made non-trivial, so a wrong mapping shows
        model.image_encoder.trunk.pos_embed.normal_()
        model.no_mem_embed.normal_()
    path = tmp_path_factory.mktemp("sam2") / "checkpoint.pt"
    torch.save({"model": model.state_dict()}, path)
    return path, model


@pytest.fixture(scope="module")
def sam21_t(tmp_path_factory):
    return _package_checkpoint(tmp_path_factory, "configs/sam2.1/sam2.1_hiera_t.yaml")


@pytest.mark.parametrize("side", [224, 512])
def test_sam21_file_loads_with_memory_keys_dropped_and_nothing_else_unexpected(sam21_t, side):
    path, package = sam21_t
    model = SAM2Segmenter(variant="t", img_size=side, num_classes=3, checkpoint=path, fusion="sum")
    report = model.load_report
    assert report.unexpected == [] and report.missing == []
    assert report.ignored and all(k.startswith(MEMORY_PREFIXES) or k in MEMORY_KEYS for k in report.ignored)
    assert any(k.startswith("memory_attention.") for k in report.ignored)
    # K = 3 gives SAM 2's own 3 + 1 mask tokens: every non-memory tensor of the file is loaded
    expected = {k for k in package.state_dict() if not (k.startswith(MEMORY_PREFIXES) or k in MEMORY_KEYS)}
    assert len(report.loaded) == len(expected) and report.reinitialised == []
    assert torch.equal(model.encoder.no_mem_embed, package.no_mem_embed)
    assert torch.equal(model.mask_decoder.conv_s0.weight, package.sam_mask_decoder.conv_s0.weight)
    # the encoder computes what the package's encoder computes at this side (its pos-embed resize included)
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        ours = model.encoder.image_encoder(x)["vision_features"]
        theirs = package.image_encoder(x)["vision_features"]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_state_dict_of_the_package_builder_has_no_key_outside_our_model_but_memory(sam21_t):
    _, package = sam21_t
    model = SAM2Segmenter(variant="t", img_size=224, num_classes=3, fusion="sum")
    ours = {f"image_encoder.{k}" for k in model.encoder.image_encoder.state_dict()}
    ours |= {f"sam_prompt_encoder.{k}" for k in model.prompt_encoder.state_dict()}
    ours |= {f"sam_mask_decoder.{k}" for k in model.mask_decoder.state_dict()} | {"no_mem_embed"}
    theirs = set(package.state_dict())
    leftover = {k for k in theirs - ours if not (k.startswith(MEMORY_PREFIXES) or k in MEMORY_KEYS)}
    assert leftover == set()
    assert not [n for n, _ in model.named_parameters() if n.startswith(MEMORY_PREFIXES) or "memory" in n]


def test_sam20_file_loads_too(tmp_path_factory):
    path, _ = _package_checkpoint(tmp_path_factory, "configs/sam2/sam2_hiera_t.yaml")
    model = SAM2Segmenter(variant="t", img_size=224, num_classes=3, checkpoint=path, fusion="sum")
    assert model.load_report.missing == []


def test_unexpected_key_and_wrong_variant_are_errors(sam21_t, tmp_path):
    path, package = sam21_t
    sd = dict(package.state_dict(), **{"sam_mask_decoder.extra.weight": torch.zeros(1)})
    bad = tmp_path / "extra.pt"
    torch.save({"model": sd}, bad)
    with pytest.raises(SamoraError, match="sam_mask_decoder|mask_decoder.extra"):
        SAM2Segmenter(variant="t", img_size=224, num_classes=3, checkpoint=bad, fusion="sum")
    with pytest.raises(SamoraError, match="model.variant"):
        SAM2Segmenter(variant="tiny", img_size=224, num_classes=3, checkpoint=path, fusion="sum")


def test_sam1_checkpoint_to_sam2_and_the_reverse_say_which_family(sam21_t, tiny_ckpt):
    path, _ = sam21_t
    with pytest.raises(SamoraError, match=r"SAM \(v1\) checkpoint.*model.family=sam"):
        SAM2Segmenter(variant="tiny", img_size=128, num_classes=3, checkpoint=tiny_ckpt[0])
    from samora_pl.models.sam.build import build_image_encoder

    with pytest.raises(SamoraError, match="SAM 2 checkpoint.*model.family=sam2"):
        load_sam_checkpoint(path, build_image_encoder("tiny", 128))

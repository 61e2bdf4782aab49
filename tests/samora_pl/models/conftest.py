"""Shared fixtures for the model tests: tiny SAM pieces with non-trivial weights, a tiny SAM checkpoint."""

import pytest
import torch

from samora_pl.models.sam import build_image_encoder, build_mask_decoder, build_prompt_encoder


def _randomize_encoder(image_encoder, seed=0):
    """Make SAM's zero-initialised tensors (pos_embed, rel-pos tables) non-trivial, for meaningful checks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        image_encoder.pos_embed.copy_(torch.randn(image_encoder.pos_embed.shape, generator=g) * 0.1)
        for blk in image_encoder.blocks:
            for t in (blk.attn.rel_pos_h, blk.attn.rel_pos_w):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return image_encoder


def _randomize_lora(lora, seed=1, std=0.2):
    """Non-zero B and non-unit scales, so every expert changes its attention."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lora_scale" in n:
                p.fill_(0.5 + torch.rand((), generator=g).item())
    return lora


def tiny_sam_state_dict(img_size=1024, num_multimask_outputs=3, seed=0):
    """A state dict in the official SAM key layout (image_encoder./prompt_encoder./mask_decoder.)."""
    torch.manual_seed(seed)
    parts = {
        "image_encoder": _randomize_encoder(build_image_encoder("tiny", img_size), seed),
        "prompt_encoder": build_prompt_encoder("tiny", img_size),
        "mask_decoder": build_mask_decoder("tiny", num_multimask_outputs),
    }
    return {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; one thread keeps these tests fast and stable when
    the CPU is shared (OpenMP spinning on an oversubscribed 2-core machine costs 10x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Path of a tiny SAM checkpoint trained 'at 1024' with SAM's 3+1 mask tokens, and its state dict."""
    sd = tiny_sam_state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny_1024.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture
def randomize_encoder():
    """``randomize_encoder(image_encoder, seed=0)``: non-zero pos_embed and rel-pos tables (in place)."""
    return _randomize_encoder


@pytest.fixture
def randomize_lora():
    """``randomize_lora(lora, seed=1, std=0.2)``: non-zero B, non-unit scales (in place)."""
    return _randomize_lora

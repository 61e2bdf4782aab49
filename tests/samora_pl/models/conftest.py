"""Fixtures for the model tests: one intra-op thread, a tiny SAM checkpoint file, non-trivial LoRA weights
(the tiny SAM state dict and randomize_encoder come from tests/conftest.py)."""

import pytest
import torch


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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; one thread keeps these tests fast and stable when
    the CPU is shared (OpenMP spinning on an oversubscribed 2-core machine costs 10x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_sam_state_dict):
    """Path of a tiny SAM checkpoint trained 'at 1024' with SAM's 3+1 mask tokens, and its state dict."""
    sd = tiny_sam_state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny_1024.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture
def randomize_lora():
    """``randomize_lora(lora, seed=1, std=0.2)``: non-zero B, non-unit scales (in place)."""
    return _randomize_lora

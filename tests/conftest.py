"""Fixtures shared across the test tree: the session's demo dataset, a pool of unlabeled slices, the
environment of a child `python -m ...` that imports this checkout, and a tiny SAM state dict."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def subprocess_env() -> dict:
    """Environment for a child Python (CLI, DDP launcher) that imports this checkout, with one thread each:
    the test machines are small and shared."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]), OMP_NUM_THREADS="1")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """One demo dataset for the whole session (written in ~2 s on first use)."""
    from data_modules.demo import ensure_demo

    return ensure_demo(tmp_path_factory.mktemp("samora-demo") / "demo")


def _write_npz_pool(folder: Path, count: int = 16, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(count):
        np.savez(folder / f"s{k:03d}.npz", image=rng.random((size, size), dtype=np.float32))
    return folder


@pytest.fixture
def npz_pool():
    """``npz_pool(folder, count=16, size=40)``: a folder of random unlabeled slices (`cpt.sources` format npz)."""
    return _write_npz_pool


def _randomize_encoder(image_encoder, seed=0):
    """Make SAM's zero-initialised tensors (pos_embed, rel-pos tables) non-trivial, for meaningful checks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        image_encoder.pos_embed.copy_(torch.randn(image_encoder.pos_embed.shape, generator=g) * 0.1)
        for blk in image_encoder.blocks:
            for t in (blk.attn.rel_pos_h, blk.attn.rel_pos_w):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return image_encoder


def _tiny_sam_state_dict(img_size=1024, num_multimask_outputs=3, seed=0):
    """A state dict in the official SAM key layout (image_encoder./prompt_encoder./mask_decoder.)."""
    from samora_pl.models.sam import build_image_encoder, build_mask_decoder, build_prompt_encoder

    torch.manual_seed(seed)
    parts = {
        "image_encoder": _randomize_encoder(build_image_encoder("tiny", img_size), seed),
        "prompt_encoder": build_prompt_encoder("tiny", img_size),
        "mask_decoder": build_mask_decoder("tiny", num_multimask_outputs),
    }
    return {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}


@pytest.fixture
def randomize_encoder():
    """``randomize_encoder(image_encoder, seed=0)``: non-zero pos_embed and rel-pos tables (in place)."""
    return _randomize_encoder


@pytest.fixture(scope="session")
def tiny_sam_state_dict():
    """``tiny_sam_state_dict(img_size=1024, num_multimask_outputs=3, seed=0)``: a tiny SAM checkpoint's
    state dict with non-trivial position tables."""
    return _tiny_sam_state_dict

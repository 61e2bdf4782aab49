"""Fixtures shared across the test tree: the session's demo dataset and quick fine-tune overrides on it,
tiny expert files, a pool of unlabeled slices, the environment of a child `python -m ...` that imports this
checkout, and a tiny SAM state dict."""

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
    from data_modules.labelled.demo import ensure_demo

    return ensure_demo(tmp_path_factory.mktemp("samora-demo") / "demo")


@pytest.fixture
def quick(tmp_path, demo_dir):
    """``quick(*extra)``: overrides for a seconds-long fine-tune on the session's demo data."""

    def overrides(*extra):
        return [
            f"runs_dir={tmp_path / 'runs'}",
            f"data.dir={demo_dir}",
            "run=t",
            "data.fraction=0.1",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.check_val_every_n_epoch=1",
            "trainer.image_log_every_n_epochs=1",
            "data.val_slices=4",
            "trainer.log_every_n_steps=1",
            *extra,
        ]

    return overrides


@pytest.fixture
def write_experts(quick):
    """``write_experts(folder, rank, random_b=False)``: three tiny LoRA expert files made with `quick`'s
    settings (B != 0 with random_b, as if distilled), as `finetune.experts.<level>=...` overrides."""
    from samora_pl.config.choices import LEVELS
    from samora_pl.config.compose import compose
    from samora_pl.config.plans import build_plan
    from samora_pl.config.specs import ExpertLayout
    from samora_pl.models.factory import build_segmenter

    def write(folder: Path, rank: int, random_b: bool = False) -> list:
        model = build_segmenter(
            build_plan(compose("finetune", quick(f"model.lora_rank={rank}"))).segmenter,
            ExpertLayout(LEVELS, "hl_attn"),
            8,
        )
        if random_b:
            with torch.no_grad():
                for name, param in model.lora.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.05)
        paths = []
        for level in LEVELS:
            path = folder / f"{level}-r{rank}.safetensors"
            model.save_expert(level, path)
            paths.append(f"finetune.experts.{level}={path}")
        return paths

    return write


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
    from samora_pl.models.sam.build import build_image_encoder, build_mask_decoder, build_prompt_encoder

    torch.manual_seed(seed)
    parts = {
        "image_encoder": _randomize_encoder(build_image_encoder("tiny", img_size), seed),
        "prompt_encoder": build_prompt_encoder("tiny", img_size),
        "mask_decoder": build_mask_decoder("tiny", num_multimask_outputs),
    }
    return {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}


# the smallest teachers of each kind; tests change one size with keyword arguments
TINY_MAE = dict(
    variant="vit_base_patch16_224",
    img_size=64,
    patch_size=16,
    embed_dim=32,
    depth=2,
    num_heads=4,
    decoder_dim=32,
    decoder_depth=1,
    decoder_heads=4,
)
TINY_SIMCLR = dict(depth=18, width=0.25, proj_dim=16)


@pytest.fixture(scope="session")
def tiny_mae():
    """``tiny_mae(**sizes)``: a one-to-two-block MAE teacher (TINY_MAE, overridden by `sizes`)."""
    from samora_pl.models.teachers.mae import MaeTeacher

    return lambda **kw: MaeTeacher(**{**TINY_MAE, **kw})


@pytest.fixture(scope="session")
def tiny_simclr():
    """``tiny_simclr(**sizes)``: a ResNet-18 SimCLR teacher at 1/4 width (TINY_SIMCLR, overridden by `sizes`)."""
    from samora_pl.models.teachers.simclr import SimclrTeacher

    return lambda **kw: SimclrTeacher(**{**TINY_SIMCLR, **kw})


@pytest.fixture(scope="session")
def tiny_cpt() -> list:
    """CPT overrides at minimal sizes: one epoch of 2 steps per teacher, on the CPU."""
    return [
        "cpt.simclr.depth=18",
        "cpt.simclr.width=0.125",
        "cpt.simclr.img_size=32",
        "cpt.simclr.batch_size=8",
        "cpt.simclr.max_epochs=1",
        "cpt.simclr.proj_dim=16",
        "cpt.mae.embed_dim=32",
        "cpt.mae.depth=1",
        "cpt.mae.num_heads=2",
        "cpt.mae.patch_size=16",
        "cpt.mae.img_size=32",
        "cpt.mae.decoder_dim=32",
        "cpt.mae.decoder_depth=1",
        "cpt.mae.decoder_heads=2",
        "cpt.mae.batch_size=8",
        "cpt.mae.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        "data.num_workers=0",
    ]


@pytest.fixture(scope="session")
def tiny_pixel() -> list:
    """Distill overrides of a tiny pixel-level run on the CPU (the epochs are the test's to add)."""
    return [
        "data.name=demo",
        "distill.level=pixel",
        "model.img_size=64",
        "distill.batch_size=4",
        "distill.pixel_width=16",
        "trainer.accelerator=cpu",
    ]


@pytest.fixture
def config(npz_pool, tiny_cpt):
    """``config(tmp_path, *extra)``: the cpt config of a tiny run on a 16-slice pool (written on first use)."""
    from samora_pl.config.compose import compose

    def compose_cpt(tmp_path: Path, *extra):
        pool = tmp_path / "pool"
        if not pool.exists():
            npz_pool(pool)
        return compose(
            "cpt",
            [
                f"runs_dir={tmp_path / 'runs'}",
                "run=t",
                f"data.dir={tmp_path / 'demo'}",
                f"cpt.sources=[{{path: '{pool}', format: npz}}]",
                *tiny_cpt,
                *extra,
            ],
        )

    return compose_cpt


@pytest.fixture
def randomize_encoder():
    """``randomize_encoder(image_encoder, seed=0)``: non-zero pos_embed and rel-pos tables (in place)."""
    return _randomize_encoder


@pytest.fixture(scope="session")
def tiny_sam_state_dict():
    """``tiny_sam_state_dict(img_size=1024, num_multimask_outputs=3, seed=0)``: a tiny SAM checkpoint's
    state dict with non-trivial position tables."""
    return _tiny_sam_state_dict

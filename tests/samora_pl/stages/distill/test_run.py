"""Stage-1 distillation: what trains, what stays fixed, patch positions, expert files, the stage runner.

Everything is tiny (SAM `tiny` at 64 px, a ResNet-18 at 1/8 width and a one-block ViT as teachers, saved in
the real `teacher.pt` format and read back with the real `load_teacher`), so the file runs in well under a
minute on 2 CPU cores.
"""

import json

import lightning as L
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from samora_pl.config.compose import compose
from samora_pl.config.plans import build_plan
from samora_pl.errors import SamoraError
from samora_pl.models.teachers.files import load_teacher, save_teacher
from samora_pl.records.manifest import sha256
from samora_pl.stages.distill import module as distill_module
from samora_pl.stages.distill.module import DistillModule, build_head
from samora_pl.stages.distill.run import EXPERT, LevelViews, build_student
from tests.stage_runs import run_stage


def run(cfg):
    """`samora distill` on a composed config."""
    return run_stage(cfg)


def student_of(cfg, level: str):
    """The distillation student of the planned run."""
    return build_student(build_plan(cfg).segmenter, level)


IMG = 64
# the frozen teacher is in eval mode on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*")


# distillation's teachers: the shared tiny ones, smaller still and without input normalisation
SIMCLR = dict(width=0.125, proj_hidden_dim=16, normalize="none", img_size=32)
MAE = dict(img_size=IMG, depth=1, num_heads=2, decoder_heads=2, normalize="none")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_simclr, tiny_mae):
    """A pool of unlabeled slices (one npz volume) and the two teachers in the real teacher.pt format."""
    root = tmp_path_factory.mktemp("distill")
    pool = root / "pool"
    pool.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:IMG, :IMG] / IMG
    slices = [
        np.clip(0.5 + 0.3 * np.sin(6 * xx + k) * np.cos(4 * yy) + 0.05 * rng.standard_normal((IMG, IMG)), 0, 1)
        for k in range(12)
    ]
    np.savez(pool / "vol.npz", image=np.stack(slices).astype(np.float32))
    teachers = root / "teachers"
    torch.manual_seed(1)
    simclr = save_teacher(tiny_simclr(**SIMCLR), teachers / "simclr" / "teacher.pt")
    torch.manual_seed(2)
    mae = save_teacher(tiny_mae(**MAE), teachers / "mae" / "teacher.pt")
    return {"root": root, "pool": pool, "simclr": simclr, "mae": mae}


def make_cfg(workspace, *extra, run_name="t"):
    root = workspace["root"]
    return compose(
        "distill",
        [
            f"runs_dir={root / 'runs'}",
            f"run={run_name}",
            "data.name=demo",
            f"data.dir={root / 'demo'}",
            "model.img_size=64",
            "distill.batch_size=4",
            "distill.max_epochs=1",
            "trainer.limit_train_batches=2",
            "distill.image_hidden=32",
            "distill.pixel_width=16",
            "trainer.accelerator=cpu",
            "trainer.log_every_n_steps=1",
            f"cpt.sources=[{{path: {workspace['pool']}, format: npz, intensity: none}}]",
            *extra,
        ],
    )


def build(workspace, level, cfg=None):
    cfg = cfg or make_cfg(workspace)
    teacher = None
    if level == "image":
        teacher = load_teacher(workspace["simclr"], kind="simclr")
    elif level == "patch":
        teacher = load_teacher(workspace["mae"], kind="mae")
    torch.manual_seed(0)
    student = student_of(cfg, level)
    head = build_head(level, student, teacher, image_hidden=32, pixel_width=16)
    return DistillModule(student, level, head, teacher, image_log_every_n_epochs=1)


def loader(level, n=8, batch=4):
    torch.manual_seed(0)
    views = LevelViews(level, IMG, crop_scale=(0.5, 1.0))
    samples = [views(torch.rand(1, 80, 80)) for _ in range(n)]
    return DataLoader(samples, batch_size=batch)


def fit_three_steps(module, level):
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(level, n=12))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("level", ["image", "patch", "pixel"])
def test_only_the_expert_and_head_change(workspace, level):
    module = build(workspace, level)
    before = snapshot(module)
    fit_three_steps(module, level)
    after = snapshot(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expert = f"student.encoder.lora.experts.{level}."
    allowed = {k for k in before if k.startswith(expert) or k.startswith("head.")}
    assert changed <= allowed, sorted(changed - allowed)[:5]
    expert_keys = {k for k in before if k.startswith(expert)}
    assert {k for k in expert_keys if "lora_B" in k} <= changed  # every block's B moved off zero
    assert any("lora_A" in k for k in changed) and any("lora_scale" in k for k in changed)
    assert any(k.startswith("head.") for k in changed)
    # the teacher (weights and BatchNorm statistics) and SAM are bit-identical
    for k in before:
        if k.startswith(("teacher.", "student.encoder.image_encoder.", "student.mask_decoder.")):
            assert torch.equal(before[k], after[k]), k
    assert len(module.history) == 1 and np.isfinite(module.history[0]["loss"])


def test_teacher_stays_in_eval_mode(workspace):
    module = build(workspace, "image")
    module.train()
    assert module.training and module.student.training and module.head.training
    assert not module.teacher.training
    assert not any(m.training for m in module.teacher.modules())
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_image_level_view_pairing(workspace):
    """same: student(v) vs teacher(v); cross: student(v1) vs teacher(v2) and student(v2) vs teacher(v1)."""
    from samora_pl.losses.distillation import normalized_mse
    from samora_pl.stages.distill.module import resize_to

    module = build(workspace, "image").eval()
    v1, v2 = torch.rand(2, 1, IMG, IMG), torch.rand(2, 1, IMG, IMG)
    with torch.no_grad():
        student = module.head(module.student.encoder(torch.cat([v1, v2])))
        teacher = module.teacher.embed(resize_to(torch.cat([v1, v2]), 32))
        same = module.image_step({"image": v1, "view2": v2})["loss"]
        module.image_pairing = "cross"
        cross = module.image_step({"image": v1, "view2": v2})["loss"]
    torch.testing.assert_close(same, normalized_mse(student, teacher)[0])
    torch.testing.assert_close(cross, normalized_mse(student, torch.cat([teacher[2:], teacher[:2]]))[0])


def test_patch_positions_are_the_teachers_visible_ones(workspace, monkeypatch):
    module = build(workspace, "patch")
    seen = {}
    encode = module.teacher.encode_visible

    def spy_teacher(images, mask_ratio=None, noise=None):
        tokens, ids_keep, grid = encode(images, mask_ratio, noise)
        seen["teacher_ids"], seen["grid"], seen["ratio"] = ids_keep.clone(), grid, mask_ratio
        return tokens, ids_keep, grid

    real_select = distill_module.visible_student_tokens

    def spy_select(tokens, ids_keep, grid):
        seen["student_ids"], seen["tokens"] = ids_keep.clone(), tokens.detach().clone()
        out = real_select(tokens, ids_keep, grid)
        seen["selected"] = out.detach().clone()
        return out

    monkeypatch.setattr(module.teacher, "encode_visible", spy_teacher)
    monkeypatch.setattr(distill_module, "visible_student_tokens", spy_select)
    images = torch.rand(3, 1, IMG, IMG)
    module.patch_step({"image": images})
    assert seen["ratio"] == 0.75
    assert torch.equal(seen["student_ids"], seen["teacher_ids"])
    ids, tokens = seen["teacher_ids"], seen["tokens"]
    assert ids.shape == (3, 4)  # 16 patches, 75 % masked
    assert tuple(seen["grid"]) == tuple(tokens.shape[1:3]) == (4, 4)  # same grid: exact selection
    for b in range(3):
        for j, i in enumerate(ids[b].tolist()):
            assert torch.equal(seen["selected"][b, j], tokens[b, i // 4, i % 4])
    # and the student's tokens are its own last-block tokens for the full image
    with torch.no_grad():
        torch.testing.assert_close(tokens, module.student.encoder.forward_tokens(images))


def test_patch_level_maps_a_coarser_teacher_grid(workspace, tiny_mae):
    """Teacher at 32 px (2x2 patches) vs student at 64 px (4x4 tokens): area mean of 2x2 student tokens."""
    cfg = make_cfg(workspace)
    torch.manual_seed(2)
    teacher = tiny_mae(**{**MAE, "img_size": 32}).eval()
    student = student_of(cfg, "patch")
    module = DistillModule(student, "patch", build_head("patch", student, teacher), teacher)
    images = torch.rand(2, 1, IMG, IMG)
    torch.manual_seed(5)
    target, ids, grid = module.patch_targets(images)
    assert grid == (2, 2) and ids.shape == (2, 1)
    out = module.patch_step({"image": images})
    assert torch.isfinite(out["loss"])


def test_expert_file_round_trip_gives_identical_encoder_outputs(workspace, tmp_path):
    module = build(workspace, "patch")
    fit_three_steps(module, "patch")
    student = module.student.eval()
    path = tmp_path / "expert.safetensors"
    student.save_expert("patch", path, base_fingerprint="abc")
    fresh = student_of(make_cfg(workspace), "patch").eval()
    images = torch.rand(2, 1, IMG, IMG)
    with torch.no_grad():
        assert not torch.equal(fresh.encoder(images), student.encoder(images))
        meta = fresh.load_expert("patch", path)
        assert torch.equal(fresh.encoder(images), student.encoder(images))
    assert meta["level"] == "patch" and meta["rank"] == "4" and meta["img_size"] == str(IMG)
    assert meta["base_fingerprint"] == "abc"


def test_missing_teacher_is_a_clear_error(workspace):
    cfg = make_cfg(workspace, "distill.level=image", run_name="no_teacher")
    with pytest.raises(SamoraError) as err:
        run(cfg)
    message = str(err.value)
    assert "runs/no_teacher/cpt/simclr/teacher.pt" in message.replace("\\", "/")
    assert "make cpt TEACHER=simclr RUN=no_teacher" in message
    cfg = make_cfg(workspace, "distill.level=patch", run_name="no_teacher")
    with pytest.raises(SamoraError, match="make cpt TEACHER=mae RUN=no_teacher"):
        run(cfg)


def test_wrong_teacher_kind_is_a_clear_error(workspace):
    cfg = make_cfg(workspace, "distill.level=image", f"distill.teacher={workspace['mae']}")
    with pytest.raises(SamoraError, match="mae teacher"):
        run(cfg)


PICTURES = {
    "image": "distill/image_views",
    "patch": "distill/slice_teacher_visible",
    "pixel": "distill/noisy_clean_reconstruction",
}


@pytest.mark.slow
def test_run_all_levels_writes_experts_and_manifests(workspace):
    cfg = make_cfg(workspace, "distill.level=all", run_name="full")
    cpt = workspace["root"] / "runs" / "full" / "cpt"
    for kind in ("simclr", "mae"):
        (cpt / kind).mkdir(parents=True, exist_ok=True)
        (cpt / kind / "teacher.pt").write_bytes(workspace[kind].read_bytes())
    results = run(cfg)
    assert set(results) == {"image", "patch", "pixel"}
    for level in ("image", "patch", "pixel"):
        folder = workspace["root"] / "runs" / "full" / "distill" / level
        expert = folder / EXPERT
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["stage"] == "distill"
        assert manifest["outputs"][EXPERT]["sha256"] == sha256(expert) == manifest["metrics"]["expert_sha256"]
        assert np.isfinite(manifest["metrics"]["final_loss"]) and manifest["metrics"]["epochs"] == 1
        pool = manifest["inputs"]["pool"]
        assert pool["cases"] == ["vol"] and pool["slices"] == 12
        assert pool["excluded_cases"] == [] and not pool["include_test_cases"]
        assert (folder / "config.yaml").exists() and (folder / "checkpoints" / "last.ckpt").exists()
        with safe_open(str(expert), framework="pt") as f:
            meta = f.metadata()
            names = list(f.keys())
        assert meta["level"] == level and meta["rank"] == "4" and meta["depth"] == "4" and meta["width"] == "64"
        assert meta["img_size"] == "64"
        assert len(names) == 4 * 5  # 4 blocks x (A_q, B_q, A_v, B_v, scale)
        ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert all(k.startswith(("student.encoder.lora.", "head.")) for k in ckpt["state_dict"])
        if level != "pixel":
            kind = "simclr" if level == "image" else "mae"
            assert manifest["inputs"][f"teacher_{kind}"]["sha256"] == sha256(cpt / kind / "teacher.pt")
            assert -1 <= manifest["metrics"]["cosine_similarity"] <= 1
            assert meta["teacher_kind"] == kind
        else:
            assert "final_overlap" in manifest["metrics"]
        events = EventAccumulator(str(workspace["root"] / "runs" / "full" / "tb" / "distill" / level))
        events.Reload()
        assert PICTURES[level] in events.Tags()["images"]  # every level shows what it learns from
        assert "train/loss_epoch" in events.Tags()["scalars"]
    # finished levels are reused with the same settings, refused with other ones
    again = run(make_cfg(workspace, "distill.level=pixel", run_name="full"))
    assert again["pixel"]["reused"] is True
    # an interrupted level (no manifest, no expert) resumes from last.ckpt and keeps its history
    pixel = workspace["root"] / "runs" / "full" / "distill" / "pixel"
    (pixel / "manifest.json").unlink()
    (pixel / EXPERT).unlink()
    resumed = run(make_cfg(workspace, "distill.level=pixel", run_name="full"))["pixel"]
    assert "reused" not in resumed and resumed["epochs"] == 1 and (pixel / EXPERT).exists()
    assert resumed["final_loss"] == pytest.approx(results["pixel"]["final_loss"])
    with pytest.raises(SamoraError, match="overwrite=true"):
        run(make_cfg(workspace, "distill.level=pixel", "distill.noise_sigma=0.2", run_name="full"))
    # CPT's SimCLR views are the image level's views: changing them refuses the image expert, not the others
    with pytest.raises(SamoraError, match="cpt.simclr.jitter"):
        run(make_cfg(workspace, "distill.level=image", "cpt.simclr.jitter=0.1", run_name="full"))
    assert run(make_cfg(workspace, "distill.level=patch", "cpt.simclr.jitter=0.1", run_name="full"))["patch"]["reused"]
    # the experts load into the stage-2 model
    model = student_of(cfg, "image")
    model.load_expert("image", workspace["root"] / "runs" / "full" / "distill" / "image" / EXPERT)


def test_changed_teacher_file_is_refused(workspace):
    cfg = make_cfg(workspace, "distill.level=image", run_name="tampered")
    folder = workspace["root"] / "runs" / "tampered" / "cpt" / "simclr"
    folder.mkdir(parents=True)
    (folder / "teacher.pt").write_bytes(workspace["simclr"].read_bytes())
    (folder / "manifest.json").write_text(json.dumps({"outputs": {"teacher.pt": {"sha256": "0" * 64}}}))
    with pytest.raises(SamoraError, match="checksum"):
        run(cfg)


def test_bad_settings_are_refused(workspace):
    with pytest.raises(SamoraError, match="image_pairing"):
        run(make_cfg(workspace, "distill.image_pairing=diagonal"))
    with pytest.raises(SamoraError, match="distill.level=all"):
        run(make_cfg(workspace, f"distill.teacher={workspace['simclr']}"))


@pytest.mark.slow
def test_ddp_two_cpu_processes_through_the_cli(workspace, subprocess_env):
    """`samora distill` with 2 CPU processes (gloo): every rank issues the same collectives; rank zero writes."""
    import subprocess
    import sys

    root = workspace["root"]
    args = [
        sys.executable,
        "-m",
        "samora_pl",
        "distill",
        "distill.level=pixel",
        f"runs_dir={root / 'runs'}",
        "run=ddp",
        "data.name=demo",
        f"data.dir={root / 'demo'}",
        "model.img_size=64",
        "distill.batch_size=2",
        "distill.max_epochs=2",
        "trainer.limit_train_batches=2",
        "distill.pixel_width=16",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"cpt.sources=[{{path: {workspace['pool']}, format: npz, intensity: none}}]",
    ]
    done = subprocess.run(args, cwd=root, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((root / "runs" / "ddp" / "distill" / "pixel" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["epochs"] == 2
    assert manifest["outputs"][EXPERT]["sha256"] == sha256(root / "runs" / "ddp" / "distill" / "pixel" / EXPERT)


@pytest.mark.slow
def test_every_level_distils_in_bf16_mixed(workspace):
    """PRECISION=bf16-mixed on CPU: each level trains a few steps with a finite loss and writes its expert."""
    cpt = workspace["root"] / "runs" / "bf16" / "cpt"
    for kind in ("simclr", "mae"):
        (cpt / kind).mkdir(parents=True, exist_ok=True)
        (cpt / kind / "teacher.pt").write_bytes(workspace[kind].read_bytes())
    results = run(make_cfg(workspace, "distill.level=all", "trainer.precision=bf16-mixed", run_name="bf16"))
    for level in ("image", "patch", "pixel"):
        assert np.isfinite(results[level]["final_loss"])
        assert (workspace["root"] / "runs" / "bf16" / "distill" / level / EXPERT).exists()

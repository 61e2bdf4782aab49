"""`samora probe` end to end on a tiny demo run (teachers, the three experts, a SAMed fine-tune), through the
CLI users call: its files, manifest and TensorBoard scalars, that only training slices are read, that a
pre-trained teacher probes better than its starting weights, and the refusal of a run with nothing to probe."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_modules import build_datamodule
from samora_pl.cli import main
from samora_pl.config.compose import compose, load_saved
from samora_pl.config.plans import build_plan
from samora_pl.errors import SamoraError
from samora_pl.models.teachers.files import load_teacher
from samora_pl.stages.cpt.run import initial_teacher

# the frozen teacher is in eval mode on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*")

# three epochs of batch 16 on the demo pool (about 40 steps a teacher): enough for SimCLR to leave its start
CPT = ["cpt.simclr.batch_size=16", "cpt.simclr.max_epochs=3", "cpt.mae.batch_size=16", "cpt.mae.max_epochs=3"]
SMALL = ["model.img_size=64", "trainer.limit_train_batches=3", "data.val_slices=0"]
DISTILL = ["distill.batch_size=8", "distill.max_epochs=1", "distill.image_hidden=32", "distill.pixel_width=16"]
SAMED = [
    "mode=samed",
    "data.fraction=0.1",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "finetune.evaluate=false",
]
SUBJECTS = {"encoder_bare", "expert_image", "expert_patch", "expert_pixel", "samed_samed-lora-f0.1"} | {
    f"teacher_{kind}_{name}" for kind in ("simclr", "mae") for name in ("cpt", "start", "random")
}


@pytest.fixture(scope="module")
def probed(tmp_path_factory, demo_dir, tiny_cpt):
    """A tiny run with every stage-1 product and a SAMed fine-tune, probed once; its folder."""
    runs = tmp_path_factory.mktemp("probe") / "runs"
    common = [f"runs_dir={runs}", "run=p", f"data.dir={demo_dir}"]
    assert main(["cpt", *common, *tiny_cpt, *CPT]) == 0
    assert main(["distill", *common, *tiny_cpt, *SMALL, *DISTILL]) == 0
    assert main(["finetune", *common, "trainer.accelerator=cpu", *SMALL, *SAMED]) == 0
    probe = ["probe.max_slices=96", "probe.max_patches=2000", "model.img_size=64", "trainer.accelerator=cpu"]
    assert main(["probe", *common, *probe]) == 0
    return runs / "p"


@pytest.mark.slow
def test_probe_writes_metrics_manifest_and_scalars(probed, demo_dir):
    metrics = json.loads((probed / "probe" / "metrics.json").read_text())
    scores = metrics["scores"]
    assert set(scores) == SUBJECTS
    for row in scores.values():
        assert 0.0 <= row["linear_bacc"] <= 1.0 and 0.0 <= row["knn_auroc"] <= 1.0 and row["classes"] >= 1
    assert 0.0 <= scores["expert_image"]["cka_vs_teacher"] <= 1.0
    assert 0.0 <= scores["expert_patch"]["cka_vs_teacher"] <= 1.0
    assert {"cka_vs_simclr", "cka_vs_mae", "patch_linear_auroc"} <= set(scores["encoder_bare"])
    assert "patch_linear_auroc" in scores["teacher_mae_cpt"]  # MAE has patch tokens, SimCLR a pooled vector
    assert "patch_linear_auroc" not in scores["teacher_simclr_cpt"]
    # training slices only, held out by case: no test case, no case on both sides
    info = metrics["slices"]
    assert info["split_by"] == "case" and not set(info["train_cases"]) & set(info["heldout_cases"])
    test_cases = set(build_datamodule("demo", root=str(demo_dir), img_size=64).test_cases())
    assert not (set(info["train_cases"]) | set(info["heldout_cases"])) & test_cases
    manifest = json.loads((probed / "probe" / "manifest.json").read_text())
    assert manifest["stage"] == "probe" and manifest["status"] == "complete"
    assert {"metrics.json", "results.md"} <= set(manifest["outputs"])
    assert {"teacher_simclr", "teacher_mae", "expert_image", "expert_patch", "expert_pixel"} <= set(manifest["inputs"])
    assert "samed_samed-lora-f0.1" in manifest["inputs"]
    assert "| expert_patch |" in (probed / "probe" / "results.md").read_text()
    events = EventAccumulator(str(probed / "tb" / "probe"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"probe/teacher_simclr_cpt/linear_bacc", "probe/expert_patch/cka_vs_teacher"} <= tags
    assert events.Scalars("probe/expert_image/cka_vs_teacher")[0].value == pytest.approx(
        scores["expert_image"]["cka_vs_teacher"], abs=1e-6
    )


@pytest.mark.slow
def test_a_pretrained_simclr_teacher_probes_better_than_its_start(probed):
    """Holds on the demo because a freshly initialised ResNet (BatchNorm statistics never updated, last BN of
    each block zero) varies little between demo slices (at this test's width not at all): the probe is at chance."""
    scores = json.loads((probed / "probe" / "metrics.json").read_text())["scores"]
    trained = scores["teacher_simclr_cpt"]["linear_auroc"]
    assert trained > scores["teacher_simclr_start"]["linear_auroc"] + 0.05
    assert trained > scores["teacher_simclr_random"]["linear_auroc"] + 0.05


@pytest.mark.slow
def test_the_start_teacher_is_what_cpt_starts_from(tmp_path, demo_dir, tiny_cpt):
    """cpt.<kind>.max_epochs=0 writes the starting weights untrained: `initial_teacher` rebuilds them exactly."""
    common = [f"runs_dir={tmp_path / 'runs'}", "run=z", f"data.dir={demo_dir}", "cpt.teacher=simclr"]
    assert main(["cpt", *common, *tiny_cpt, "cpt.simclr.max_epochs=0", "seed=3"]) == 0
    folder = tmp_path / "runs" / "z" / "cpt" / "simclr"
    start = build_plan(load_saved(folder / "config.yaml"))
    rebuilt, _ = initial_teacher(start.cpt, start.seed, "simclr")
    written = load_teacher(folder / "teacher.pt")
    for name, tensor in written.state_dict().items():
        assert torch.equal(tensor, rebuilt.state_dict()[name]), name


def test_probe_refuses_a_run_without_teachers_or_experts(tmp_path, demo_dir, capsys):
    assert main(["probe", f"runs_dir={tmp_path / 'runs'}", "run=empty", f"data.dir={demo_dir}"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "nothing to probe" in err and "make cpt RUN=empty" in err
    assert not (tmp_path / "runs" / "empty" / "probe").exists()


@pytest.mark.parametrize(
    "override, key",
    [("probe.holdout=1.0", "probe.holdout"), ("probe.knn_k=0", "probe.knn_k"), ("probe.l2=-1", "probe.l2")],
)
def test_probe_settings_are_checked_before_any_work(override, key):
    with pytest.raises(SamoraError, match=key.replace(".", r"\.")):
        compose("probe", [override])

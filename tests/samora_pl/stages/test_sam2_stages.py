"""The stages on SAM 2 (`model.family=sam2`, tiny Hiera): distillation of each level trains only its expert
(every block's, q-pool blocks included) and head; fine-tuning (SAMora and SAMed) and prediction through the
CLI; a SAM (v1) checkpoint given to family=sam2 stops with one message."""

import csv
import json

import lightning as L
import pytest
import torch

from samora_pl.cli import main
from tests.samora_pl.stages.distill.test_run import build, loader, make_cfg, snapshot, workspace  # noqa: F401

pytest.importorskip("sam2")
pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*")
SAM2 = ("model.family=sam2", "model.variant=tiny")


@pytest.mark.parametrize("level", ["image", "patch", "pixel"])
def test_each_level_distils_only_its_expert_on_hiera(workspace, level):  # noqa: F811
    module = build(workspace, level, make_cfg(workspace, *SAM2))
    before = snapshot(module)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(level, n=8))
    after = snapshot(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expert = f"student.encoder.lora.experts.{level}."
    assert changed <= {k for k in before if k.startswith((expert, "head."))}
    moved_b = {k for k in changed if "lora_B" in k}
    assert moved_b == {k for k in before if k.startswith(expert) and "lora_B" in k}  # all 5 blocks, q and v
    assert len(moved_b) == 2 * 5


@pytest.mark.slow
def test_finetune_and_predict_on_sam2_through_the_cli(tmp_path, quick, demo_dir):
    for mode in ("mode=samora", "mode=samed"):
        extra = ("finetune.zero_experts=true",) if mode == "mode=samora" else ()
        assert main(["finetune", *quick(*SAM2, mode, *extra)]) == 0
    folder = tmp_path / "runs" / "t" / "finetune" / "samed-lora-f0.1"
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert len({r["class_name"] for r in rows}) == 8
    assert json.loads((folder / "manifest.json").read_text())["status"] == "complete"
    volume = sorted((demo_dir / "test_vol_h5").glob("*.h5"))[0]
    out = tmp_path / "pred"
    args = ["predict", f"runs_dir={tmp_path / 'runs'}", "run=t", f"predict.input={volume}", f"predict.output={out}"]
    assert main([*args, "finetune.tag=samed-lora-f0.1"]) == 0
    assert list(out.rglob("*_pred.nii.gz"))


def test_sam1_checkpoint_to_sam2_is_one_clear_message(tmp_path, capsys, quick, tiny_sam_state_dict):
    path = tmp_path / "sam_tiny.pth"
    torch.save(tiny_sam_state_dict(128), path)
    code = main(["finetune", *quick(*SAM2, "mode=samed", f"model.checkpoint={path}")])
    err = capsys.readouterr().err
    assert code != 0 and "SAM (v1) checkpoint" in err and "model.family=sam" in err

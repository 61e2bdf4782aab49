"""End-to-end stage 2 on the demo data (tiny profile), through the same entry points users call."""

import csv
import json
import math

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from samora_pl.cli import main
from samora_pl.config.choices import LEVELS
from samora_pl.config.compose import compose
from samora_pl.config.plans import build_plan
from samora_pl.config.specs import ExpertLayout
from samora_pl.errors import SamoraError
from samora_pl.models.factory import build_segmenter
from samora_pl.stages.finetune import run as finetune
from samora_pl.stages.finetune.evaluate import TRANSDUCTIVE_NOTE, load_finetuned, pretraining_saw_test_cases
from tests.data_modules.volume_writers import LA_IDS, finetune_folder, finetune_overrides, write_la
from tests.stage_runs import planned


@pytest.mark.slow
def test_samed_finetune_writes_results_and_dashboards(tmp_path, quick):
    assert main(["finetune", *quick("mode=samed")]) == 0
    folder = tmp_path / "runs" / "t" / "finetune" / "samed-lora-f0.1"
    rows = list(csv.DictReader(open(folder / "results.csv")))
    organs = {"spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas"}
    assert {r["class_name"] for r in rows} == organs and len(rows) == 8 * 12
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0.0 <= metrics["mean_dice"] <= 1.0 and set(metrics["per_class"]) == organs
    assert "liver" in (folder / "results.md").read_text() and metrics["test_cases_in_pretraining"] is False
    assert "fusion: none (mode=samed, one LoRA)" in (folder / "results.md").read_text()
    assert metrics["labelled_subset"] == "redrawn by slice for each run seed"  # data.subset_seed unset
    assert "Labelled subset: redrawn by slice for each run seed." in (folder / "results.md").read_text()
    assert (folder / "splits" / "train_selected.txt").exists() and (folder / "final.safetensors").exists()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "final.safetensors" in manifest["outputs"]
    events = EventAccumulator(str(tmp_path / "runs" / "t" / "tb" / "finetune" / "samed-lora-f0.1"))
    events.Reload()
    assert {"train/loss_step", "val/loss", "val/mean_dice", "val_dice/liver"} <= set(events.Tags()["scalars"])
    assert "val/slice_truth_prediction" in events.Tags()["images"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["samed", "samora"])
def test_validation_every_few_epochs_still_draws_pictures(tmp_path, mode, quick):
    """The tiny profile validates and draws every 20 epochs; validation then runs at epochs 19, 39, ..., so a
    picture rule of `epoch % 20 == 0` never drew one. Here: 2 epochs, validation and pictures every 2."""
    every = ["trainer.max_epochs=2", "trainer.check_val_every_n_epoch=2", "trainer.image_log_every_n_epochs=2"]
    args = quick(f"mode={mode}", "finetune.zero_experts=true", "finetune.evaluate=false", *every)
    assert main(["finetune", *args]) == 0
    (tb,) = (tmp_path / "runs" / "t" / "tb" / "finetune").iterdir()
    events = EventAccumulator(str(tb))
    events.Reload()
    assert "val/mean_dice" in events.Tags()["scalars"]
    assert "val/slice_truth_prediction" in events.Tags()["images"]


@pytest.mark.slow
def test_evaluate_reproduces_the_metrics(tmp_path, quick):
    overrides = quick("mode=samed")
    assert main(["finetune", *overrides]) == 0
    folder = tmp_path / "runs" / "t" / "finetune" / "samed-lora-f0.1"
    first = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").unlink()
    assert main(["evaluate", *overrides]) == 0
    assert json.loads((folder / "metrics.json").read_text())["mean_dice"] == first["mean_dice"]
    results = (folder / "results.csv").read_text()
    assert main(["evaluate", *overrides, "eval.workers=2"]) == 0  # metrics in worker processes: same files
    assert (folder / "results.csv").read_text() == results


@pytest.mark.slow
def test_evaluate_reads_the_runs_only_finetune_as_it_was_made(tmp_path, capsys, quick):
    """`make finetune ARGS=mode=samed` then `make evaluate RUN=t`: no tag, no mode, same metrics."""
    assert main(["finetune", *quick("mode=samed")]) == 0
    folder = tmp_path / "runs" / "t" / "finetune" / "samed-lora-f0.1"
    first = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").unlink()
    where = [f"runs_dir={tmp_path / 'runs'}", "run=t"]
    assert main(["evaluate", *where]) == 0, capsys.readouterr().err
    assert json.loads((folder / "metrics.json").read_text())["mean_dice"] == first["mean_dice"]
    # a command line that changes what the model is gets one message instead of a failed load
    assert main(["evaluate", *where, "model.lora_rank=8"]) == 1
    assert "model.lora_rank" in capsys.readouterr().err
    # a second fine-tune: without finetune.tag the choice is the user's, and the message lists both
    assert main(["finetune", *quick("mode=samed", "finetune.tag=second", "finetune.evaluate=false")]) == 0
    assert main(["evaluate", *where]) == 1
    err = capsys.readouterr().err
    assert "samed-lora-f0.1" in err and "second" in err and "finetune.tag=" in err
    assert main(["evaluate", *where, "finetune.tag=second"]) == 0
    assert (tmp_path / "runs" / "t" / "finetune" / "second" / "metrics.json").exists()
    assert main(["evaluate", *where, "mode=samed", "data.fraction=0.1"]) == 0  # the settings name the first


@pytest.mark.slow
def test_finished_run_is_not_redone_without_overwrite(tmp_path, capsys, quick):
    overrides = quick("mode=samed")
    assert main(["finetune", *overrides]) == 0
    assert main(["finetune", *overrides]) == 1
    assert "overwrite=true" in capsys.readouterr().err


def test_missing_experts_name_the_files_and_the_command(tmp_path, capsys, quick):
    assert main(["finetune", *quick()]) == 1
    err = capsys.readouterr().err
    assert "distill/image/expert.safetensors" in err and "make distill LEVEL=all" in err
    assert "Traceback" not in err


def test_bad_fraction_is_one_clear_error(tmp_path, capsys, quick):
    assert main(["finetune", *quick("data.fraction=1.5")]) == 1
    assert "(0, 1]" in capsys.readouterr().err


def test_experts_of_another_rank_are_refused(tmp_path, capsys, quick, write_experts):
    paths = write_experts(tmp_path, rank=2)
    assert main(["finetune", *quick(*paths)]) == 1
    err = capsys.readouterr().err
    assert "rank" in err.lower() and "Traceback" not in err


@pytest.mark.slow
def test_given_experts_are_loaded_and_recorded(tmp_path, quick, write_experts):
    paths = write_experts(tmp_path, rank=4)
    assert main(["finetune", *quick(*paths, "finetune.tag=given")]) == 0
    manifest = json.loads((tmp_path / "runs" / "t" / "finetune" / "given" / "manifest.json").read_text())
    assert {"expert_image", "expert_patch", "expert_pixel"} <= set(manifest["inputs"])


@pytest.mark.slow
def test_hl_attn_finetune_states_its_init_and_logs_fusion_diagnostics(tmp_path, quick, write_experts):
    """results.md names the fusion and its hl_init; each validation logs every block's gates and attention
    entropies to TensorBoard, and the last set goes into manifest.json and metrics.json."""
    paths = write_experts(tmp_path, rank=4, random_b=True)
    assert main(["finetune", *quick(*paths, "finetune.tag=hl")]) == 0  # tiny profile: hl_init=residual_mean
    folder = tmp_path / "runs" / "t" / "finetune" / "hl"
    assert "fusion: hl_attn (hl_init=residual_mean)" in (folder / "results.md").read_text()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["fusion"] == "hl_attn (hl_init=residual_mean)"
    diagnostics = json.loads((folder / "manifest.json").read_text())["metrics"]["fusion_diagnostics"]
    assert metrics["fusion_diagnostics"] == diagnostics and diagnostics["epoch"] == 0
    blocks = diagnostics["blocks"]
    names = {"g1", "g2", "gamma", "entropy_step1", "entropy_step2", "entropy_uniform"}
    assert len(blocks) == 4 and all(set(values) == names for values in blocks.values())  # the tiny SAM's 4 blocks
    for values in blocks.values():
        assert values["entropy_uniform"] == pytest.approx(math.log(64))  # 8 x 8 tokens at 128 px
        assert 0.0 < values["entropy_step1"] <= values["entropy_uniform"] + 1e-6
        assert values["gamma"] != 0.0  # two steps of training moved it
    events = EventAccumulator(str(tmp_path / "runs" / "t" / "tb" / "finetune" / "hl"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"fusion/block{i:02d}/{name}" for i in range(4) for name in names} <= tags
    (logged,) = events.Scalars("fusion/block03/entropy_step2")
    assert logged.value == pytest.approx(blocks["block03"]["entropy_step2"], rel=1e-6)
    (folder / "metrics.json").unlink()  # `samora evaluate` rewrites it from the manifest's record
    assert main(["evaluate", *quick(*paths, "finetune.tag=hl")]) == 0
    assert json.loads((folder / "metrics.json").read_text())["fusion_diagnostics"] == diagnostics


def trainable_after_each_validation(cfg, monkeypatch) -> list:
    """Run the fine-tune of `cfg`; the trainable weights as they are at the end of each validation."""
    snapshots = []

    class Keep(L.Callback):
        def on_validation_end(self, trainer, module):
            snapshots.append({n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad})

    original = finetune.build_trainer

    def with_snapshot(*args, **kwargs):
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [Keep()]
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune, "build_trainer", with_snapshot)
    finetune.run(build_plan(cfg))
    return snapshots


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["hl_attn", "mole"])
def test_fusion_and_decoder_keep_training_after_validation(tmp_path, fusion, quick, write_experts, monkeypatch):
    """Validation switches to eval and back: training must go on changing the trainable weights."""
    experts = write_experts(tmp_path, rank=4, random_b=True)
    cfg = compose(
        "finetune",
        quick(*experts, f"model.fusion={fusion}", "trainer.max_epochs=2", "finetune.evaluate=false"),
    )
    first, second = trainable_after_each_validation(cfg, monkeypatch)
    assert any(n.startswith("encoder.fusion") for n in first)
    assert all(not n.startswith(("encoder.lora", "encoder.image_encoder")) for n in first)
    changed = [n for n in first if not torch.equal(first[n], second[n])]
    assert any(n.startswith("encoder.fusion") for n in changed) and any(n.startswith("mask_decoder") for n in changed)


@pytest.mark.slow
def test_samed_lora_keeps_training_after_validation(tmp_path, quick, monkeypatch):
    """The SAMed baseline's LoRA (no merge-on-eval) must go on changing after a validation epoch."""
    cfg = compose("finetune", quick("mode=samed", "trainer.max_epochs=2", "finetune.evaluate=false"))
    first, second = trainable_after_each_validation(cfg, monkeypatch)
    lora = [n for n in first if n.startswith("encoder.lora") and "lora_B" in n]
    assert lora and all(not torch.equal(first[n], second[n]) for n in lora)


@pytest.mark.slow
def test_bf16_mixed_precision_runs(tmp_path, quick):
    assert main(["finetune", *quick("mode=samed", "trainer.precision=bf16-mixed")]) == 0
    metrics = json.loads((tmp_path / "runs/t/finetune/samed-lora-f0.1/metrics.json").read_text())
    assert 0.0 <= metrics["mean_dice"] <= 1.0


@pytest.mark.slow
def test_ddp_two_cpu_processes_evaluate_every_case_once(tmp_path, quick, subprocess_env):
    """Lightning's DDP (gloo) re-launches the CLI for rank 1; each test case is evaluated exactly once."""
    import subprocess
    import sys

    env = subprocess_env
    cmd = [sys.executable, "-m", "samora_pl", "finetune", "mode=samed", "trainer.devices=2", "trainer.accelerator=cpu"]
    done = subprocess.run(cmd + quick(), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "runs/t/finetune/samed-lora-f0.1/results.csv")))
    pairs = [(r["case"], r["class_id"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 12 * 8
    assert len((tmp_path / "runs/t/finetune/samed-lora-f0.1/splits/train_selected.txt").read_text().split()) > 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_equal_two_devices_on_one_node(tmp_path, quick, subprocess_env):
    """Multi-node as a cluster launches it: torchrun on each of 2 "nodes" (one process each, on 127.0.0.1).

    The fine-tune equals `trainer.devices=2` on one node (same global ranks, same shards), and node 1, given
    a runs folder of its own, writes nothing: the run files come from rank zero only."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    run = ["mode=samed", "deterministic=true", "trainer.max_epochs=2", "trainer.accelerator=cpu"]
    cli = ["-m", "samora_pl", "finetune"]
    single = subprocess.run(
        [sys.executable, *cli, *quick(*run, "trainer.devices=2", "run=one")],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert single.stderr.count("evaluate (rank 0's share of 12)") == 1  # Lightning's rank 1 is silent too
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
            + [f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", *cli]
            + quick(
                *run, "trainer.devices=1", "trainer.num_nodes=2", "run=two", f"runs_dir={tmp_path / f'node{rank}'}"
            ),
            env=subprocess_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "MEMBER: 2/2" in logs[0] + logs[1]  # one process group across the two nodes
    one = tmp_path / "runs/one/finetune/samed-lora-f0.1"
    two = tmp_path / "node0/two/finetune/samed-lora-f0.1"
    assert json.loads((two / "metrics.json").read_text()) == json.loads((one / "metrics.json").read_text())
    assert (two / "results.csv").read_text() == (one / "results.csv").read_text()
    weights, reference = load_file(str(two / "final.safetensors")), load_file(str(one / "final.safetensors"))
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    written = sorted(p.name for p in (tmp_path / "node1").rglob("*") if p.is_file())
    assert written == [], f"node 1 wrote {written}"
    # one speaker: rank zero's progress line and table; node 1 has neither (nor the CLI's info lines)
    assert "evaluate (rank 0's share of 12): 6/6 volumes" in logs[0]
    assert "evaluate" not in logs[1] and "\nMean " not in logs[1] and "samora finetune finished" not in logs[1]
    assert logs[0].count("\nMean ") == 1 and "samora finetune finished" in logs[0]


def test_experts_distilled_on_another_encoder_are_refused(tmp_path, capsys, quick):
    from samora_pl.models.factory import base_fingerprint

    cfg = compose("finetune", quick("model.init_seed=1"))
    model = build_segmenter(build_plan(cfg).segmenter, ExpertLayout(LEVELS, "hl_attn"), 8)
    paths = []
    for level in LEVELS:
        path = tmp_path / f"{level}.safetensors"
        model.save_expert(level, path, base_fingerprint=base_fingerprint(model))
        paths.append(f"finetune.experts.{level}={path}")
    assert main(["finetune", *quick(*paths)]) == 1
    assert "another SAM encoder" in capsys.readouterr().err


@pytest.mark.slow
def test_interrupted_finetune_resumes_from_last_checkpoint(tmp_path, quick):
    """A run killed after its first epoch (manifest never written) continues from last.ckpt."""
    assert main(["finetune", *quick("mode=samed", "finetune.evaluate=false")]) == 0
    folder = tmp_path / "runs/t/finetune/samed-lora-f0.1"
    (folder / "manifest.json").unlink()  # as if the process died before the stage finished
    epochs = []
    original = finetune.build_trainer

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            epochs.append(trainer.current_epoch)

    def recording(*args, **kwargs):
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [Record()]
        return original(*args, **kwargs)

    finetune.build_trainer = recording
    try:
        assert main(["finetune", *quick("mode=samed", "trainer.max_epochs=2")]) == 0
    finally:
        finetune.build_trainer = original
    assert epochs == [1]  # epoch 0 came from the checkpoint
    assert json.loads((folder / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_interrupted_finetune_with_other_settings_is_refused(tmp_path, capsys, quick):
    assert main(["finetune", *quick("mode=samed", "finetune.evaluate=false")]) == 0
    (tmp_path / "runs/t/finetune/samed-lora-f0.1/manifest.json").unlink()
    assert main(["finetune", *quick("mode=samed", "optim.lr=0.1")]) == 1
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_with_two_processes_equals_one(tmp_path, quick, subprocess_env):
    """`make evaluate DEVICES=2` rewrites results identical to DEVICES=1 (cases sharded, gathered once)."""
    import subprocess
    import sys

    overrides = quick("mode=samed")
    assert main(["finetune", *overrides]) == 0
    folder = tmp_path / "runs/t/finetune/samed-lora-f0.1"
    single = (folder / "results.csv").read_text()
    (folder / "results.csv").unlink()
    env = subprocess_env
    cmd = [sys.executable, "-m", "samora_pl", "evaluate", "trainer.devices=2", "trainer.accelerator=cpu", *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MEMBER: 2/2" in done.stdout + done.stderr  # really two ranks
    assert (folder / "results.csv").read_text() == single


@pytest.mark.slow
def test_evaluate_tests_the_cases_of_the_runs_split(tmp_path):
    """Re-evaluation reads the case split the fine-tune wrote, not the dataset's lists as they are now."""
    root = write_la(tmp_path / "la")
    overrides = finetune_overrides(tmp_path, "la", root)
    assert main(["finetune", *overrides, "finetune.evaluate=false"]) == 0
    (root / "train.list").write_text("".join(f"{c}\n" for c in LA_IDS[:4]))  # the lists changed after the run
    (root / "test.list").write_text(f"{LA_IDS[4]}\n")
    assert main(["evaluate", *overrides]) == 0
    rows = list(csv.DictReader(open(finetune_folder(tmp_path) / "results.csv")))
    assert {r["case"] for r in rows} == set(LA_IDS[3:])
    assert main(["evaluate", *overrides, f"data.list_dir={root}"]) == 0  # a list_dir the user names wins
    rows = list(csv.DictReader(open(finetune_folder(tmp_path) / "results.csv")))
    assert {r["case"] for r in rows} == {LA_IDS[4]}


def test_a_finished_finetune_loads_without_its_sam_checkpoint(tmp_path, quick, tiny_sam_state_dict):
    """evaluate / predict rebuild the model from the saved weights alone: the SAM .pth may have moved."""
    ckpt = tmp_path / "sam_tiny_1024.pth"
    torch.save(tiny_sam_state_dict(), ckpt)
    cfg = compose("finetune", quick(f"model.checkpoint={ckpt}"))
    trained = build_segmenter(build_plan(cfg).segmenter, ExpertLayout(LEVELS, "hl_attn"), 8)
    state = {k: v.detach().contiguous() for k, v in trained.state_dict().items()}
    save_file(state, str(tmp_path / finetune.FINAL))
    ckpt.unlink()
    with pytest.raises(SamoraError):  # building from the config alone needs the .pth
        build_segmenter(build_plan(cfg).segmenter, ExpertLayout(LEVELS, "hl_attn"), 8)
    loaded = load_finetuned(build_plan(cfg), tmp_path / finetune.FINAL).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_the_sam_checkpoint_is_an_input_of_the_manifest(tmp_path, quick, tiny_sam_state_dict):
    """The public SAM .pth a fine-tune starts from is recorded with its sha256, as CPT records its teachers'."""
    from samora_pl.records.manifest import StageRecord, sha256

    ckpt = tmp_path / "sam_tiny_1024.pth"
    torch.save(tiny_sam_state_dict(), ckpt)
    cfg = compose("finetune", quick(f"model.checkpoint={ckpt}", "mode=samed"))
    record = StageRecord("finetune", {}, tmp_path)
    finetune.build_model(build_plan(cfg), 8, record)
    assert record.inputs["sam_checkpoint"] == {"path": str(ckpt), "sha256": sha256(ckpt), "bytes": ckpt.stat().st_size}
    random_sam = StageRecord("finetune", {}, tmp_path)
    finetune.build_model(planned("finetune", quick("mode=samed")), 8, random_sam)
    assert "sam_checkpoint" not in random_sam.inputs


def test_transductive_pretraining_is_said_in_the_results(tmp_path):
    from samora_pl.evaluation import write_results

    base = [f"runs_dir={tmp_path / 'runs'}", "run=t"]
    assert not pretraining_saw_test_cases(planned("finetune", base))
    folder = tmp_path / "runs" / "t" / "distill" / "patch"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"inputs": {"pool": {"include_test_cases": True}}}))
    assert pretraining_saw_test_cases(planned("finetune", base))  # an expert it fuses saw them
    assert not pretraining_saw_test_cases(planned("finetune", [*base, "finetune.levels=[image,pixel]"]))
    opted = compose("finetune", [*base, "mode=samed", "cpt.include_test_cases=true"])
    assert pretraining_saw_test_cases(build_plan(opted))
    rows = [{"case": "c1", "class_id": 1, "dice": 0.5, "hd95": 3.0}]
    write_results(rows, ["organ"], tmp_path / "out", notes=[TRANSDUCTIVE_NOTE])
    assert TRANSDUCTIVE_NOTE in (tmp_path / "out" / "results.md").read_text()


def test_train_experts_adds_only_the_experts_ab_to_the_trainable_set(quick):
    """The `finetune.train_experts` ablation: mode=samora's set plus every expert's A/B, never the scales."""
    cfg = compose("finetune", quick("finetune.zero_experts=true"))
    frozen = set(finetune.build_model(build_plan(cfg), 8).trainable_parameter_names())
    cfg = compose("finetune", quick("finetune.zero_experts=true", "finetune.train_experts=true"))
    added = set(finetune.build_model(build_plan(cfg), 8).trainable_parameter_names()) - frozen
    assert added and all(".lora_A_" in n or ".lora_B_" in n for n in added)
    assert {n.split(".experts.")[1].split(".")[0] for n in added} == set(LEVELS)
    assert build_plan(cfg).tag.endswith("-zero-trainexp-f0.1")
    with pytest.raises(SamoraError, match="finetune.train_experts"):
        compose("finetune", quick("mode=samed", "finetune.train_experts=true"))


@pytest.mark.slow
def test_samed_recipe_keys_on_the_tiny_profile(tmp_path, quick, monkeypatch):
    """Global batch 4 from micro-batches of 2 (two per optimiser step), a 4-epoch schedule stopped after 2,
    slices through 64 px: the run counts optimiser steps and ends on the LR of the schedule's step there."""
    made = []
    build = finetune.build_trainer
    monkeypatch.setattr(finetune, "build_trainer", lambda *a, **k: made.append(build(*a, **k)) or made[-1])
    cfg = compose(
        "finetune",
        quick(
            "mode=samed",
            "finetune.evaluate=false",
            "data.val_slices=0",
            "data.batch_size=2",
            "data.effective_batch_size=4",
            "data.train_size=64",
            "trainer.limit_train_batches=4",
            "trainer.max_epochs=4",
            "trainer.stop_epoch=2",
            "optim.warmup_steps=1",
            "optim.poly_horizon=total",
        ),
    )
    finetune.run(build_plan(cfg))
    trainer = made[0]
    iters = 2  # 4 micro-batches of 2 per epoch, two per step
    assert trainer.accumulate_grad_batches == 2 and trainer.max_epochs == 2
    assert trainer.global_step == 2 * iters  # optimiser steps, not micro-batches
    expected = cfg.optim.lr * (1 - (2 * iters - 1) / (4 * iters)) ** 0.9
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)
    assert trainer.datamodule.train_set.transform.train_size == 64

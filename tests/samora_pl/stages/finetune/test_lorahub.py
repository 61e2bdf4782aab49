"""model.fusion=lorahub: the gradient-free weight search and a tiny end-to-end fine-tune."""

import json

import pytest
import torch
from safetensors.torch import load_file

from data_modules import build_datamodule
from samora_pl.cli import main
from samora_pl.config.choices import LEVELS
from samora_pl.config.compose import compose
from samora_pl.errors import SamoraError
from samora_pl.stages.finetune import lorahub
from samora_pl.stages.finetune import run as finetune
from tests.stage_runs import planned


def _quadratic(target):
    return lambda w: sum((w[n] - t) ** 2 for n, t in zip(LEVELS, target))


def test_search_is_ngopt_with_lorahubs_budget_bounds_start_and_l1():
    score = _quadratic([0.8, -0.2, 0.4])
    weights, history = lorahub.search_weights(score, LEVELS, seed=3)
    assert len(history) == 40 and history[0]["weights"] == {n: 0.0 for n in LEVELS}  # budget 40, start 0
    assert all(-1.5 <= v <= 1.5 for h in history for v in h["weights"].values())
    for h in history:  # objective = loss + 0.05 * mean |w|
        w = h["weights"]
        assert h["score"] == pytest.approx(score(w) + 0.05 * sum(abs(v) for v in w.values()) / 3)
    assert weights == pytest.approx({"image": 0.8, "patch": -0.2, "pixel": 0.4}, abs=0.05)
    assert lorahub.search_weights(score, LEVELS, seed=3) == (weights, history)  # seeded, repeatable
    again, trace = lorahub.search_weights(score, LEVELS, budget=5, bound=0.5, start=[0.1, 0.1, 0.1], l1=0.0)
    assert len(trace) == 5 and trace[0]["weights"] == pytest.approx({n: 0.1 for n in LEVELS})
    assert all(abs(v) <= 0.5 for v in again.values())


def test_l1_term_pulls_weights_toward_zero_at_equal_loss():
    flat = lambda w: 1.0  # noqa: E731 - every candidate has the same loss
    weights, history = lorahub.search_weights(flat, LEVELS, start=[1.0, 1.0, 1.0], l1=0.5)
    assert sum(abs(v) for v in weights.values()) < 3.0 * 0.5


def test_holdout_is_a_seeded_bounded_share():
    names = [f"s{i}" for i in range(50)]
    held = lorahub.holdout_names(names, 0.2, 16, seed=1)
    assert len(held) == 10 and held == lorahub.holdout_names(names, 0.2, 16, seed=1) and set(held) <= set(names)
    assert len(lorahub.holdout_names(names, 0.9, 16, seed=1)) == 16
    assert len(lorahub.holdout_names(names[:2], 0.2, 16, seed=1)) == 1
    with pytest.raises(SamoraError, match="holdout"):
        lorahub.holdout_names(names, 0.0, 16, seed=1)


@pytest.mark.parametrize("cache", [True, False])
def test_decoder_trains_on_the_same_slices_and_steps_as_every_other_fusion(tmp_path, cache, quick):
    """The few-shot slices that score the search stay in the decoder's training set: LoRAHub's decoder sees
    every selected slice, in as many steps as HL-Attn's or the sum's (issue: it once trained on ~7 % fewer)."""
    extra = ["finetune.zero_experts=true", f"data.cache={str(cache).lower()}", "data.augment=false"]
    extra += ["data.fraction=0.3", "finetune.lorahub.max_slices=5", "trainer.limit_train_batches=null"]

    def train_set(fusion):
        plan = planned("finetune", quick(f"model.fusion={fusion}", f"runs_dir={tmp_path / fusion}", *extra))
        data = build_datamodule(plan.data)
        search = None
        if fusion == "lorahub":
            search = lorahub.prepare(plan, finetune.build_model(plan, data.num_classes), data, {})
        data.setup("fit")
        return data, [data.train_set[i]["name"] for i in range(len(data.train_set))], search

    data, hub_names, search = train_set("lorahub")
    held = search.settings["holdout_names"]
    assert len(held) == 5 and set(held) <= set(hub_names) == set(data.selected_train_names())
    assert search.settings["decoder_train_slices"] == len(hub_names)
    for fusion in ("hl_attn", "sum"):
        other, names, _ = train_set(fusion)
        assert names == hub_names and len(other.train_dataloader()) == len(data.train_dataloader())


@pytest.mark.slow
def test_lorahub_finetune_warms_up_searches_and_freezes(tmp_path, monkeypatch, write_experts, quick):
    experts = write_experts(tmp_path, rank=4, random_b=True)
    seen = {}
    search = lorahub.search_weights

    def watched(score, names, **kwargs):  # the search runs without autograd, on a frozen model
        def probe(weights):
            seen["grad"] = seen.get("grad", False) or torch.is_grad_enabled()
            return score(weights)

        seen["start"] = kwargs["start"]
        return search(probe, names, **kwargs)

    monkeypatch.setattr(lorahub, "search_weights", watched)
    args = quick(*experts, "model.fusion=lorahub", "finetune.lorahub.budget=6", "trainer.max_epochs=2")
    assert main(["finetune", *args]) == 0
    assert seen == {"grad": False, "start": [pytest.approx(1 / 3)] * 3}
    folder = tmp_path / "runs" / "t" / "finetune" / "samora-lorahub-f0.1"
    summary = json.loads((folder / "lorahub.json").read_text())
    assert len(summary["history"]) == 6 and set(summary["weights"]) == set(LEVELS) and summary["search_slices"]
    assert summary["optimizer"] == "nevergrad.optimizers.NGOpt" and summary["l1"] == 0.05
    # the decoder warmed up for half of its steps (2 epochs x 2 batches), the search ran, the decoder trained on
    assert summary["total_steps"] == 4 and summary["search_step"] == 2
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0.0 <= metrics["mean_dice"] <= 1.0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["lorahub_weights"] == summary["weights"]
    assert {"expert_image", "expert_patch", "expert_pixel"} <= set(manifest["inputs"])
    # the composed LoRA stayed frozen: the final model's hub slot is exactly the composition of the experts
    state = load_file(str(folder / "final.safetensors"))
    assert not any(".experts.image." in k or ".experts.patch." in k for k in state)
    plan = planned("finetune", args)
    model = finetune.build_model(plan, 8)
    src = lorahub.MultiExpertLoRA(LEVELS + (lorahub.HUB,), depth=model.lora.depth, dim=model.lora.dim, rank=4)
    for level, path in finetune.expert_paths(plan).items():
        lorahub.load_expert(src, level, path)
    lorahub.compose_experts(src, summary["weights"], into=lorahub.HUB)
    for key, value in src[lorahub.HUB].state_dict().items():
        assert torch.allclose(state[f"encoder.lora.experts.hub.{key}"], value, atol=1e-6), key
    trainable = model.trainable_parameter_names()
    assert trainable and all(n.startswith("mask_decoder.") for n in trainable)  # only the decoder trains
    assert main(["evaluate", *args]) == 0  # a lorahub run re-evaluates from its final weights


def test_bad_lorahub_settings_are_one_clear_error(tmp_path, quick):
    with pytest.raises(SamoraError, match="finetune.lorahub.warmup"):
        compose("finetune", quick("finetune.lorahub.warmup=1.0"))
    with pytest.raises(SamoraError, match="finetune.lorahub.start.*uniform, zero"):
        compose("finetune", quick("finetune.lorahub.start=best"))

"""model.fusion=lorahub: the gradient-free weight search and a tiny end-to-end fine-tune."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import _write_experts, quick

from samora_pl.cli import main
from samora_pl.config import compose
from samora_pl.errors import SamoraError
from samora_pl.models.factory import LEVELS
from samora_pl.stages import finetune, lorahub


def _quadratic(target):
    return lambda w: sum((w[n] - t) ** 2 for n, t in zip(LEVELS, target))


def test_search_is_seeded_and_deterministic():
    score = _quadratic([0.8, -0.2, 0.4])
    a = lorahub.search_weights(score, LEVELS, candidates=20, seed=3)
    b = lorahub.search_weights(score, LEVELS, candidates=20, seed=3)
    c = lorahub.search_weights(score, LEVELS, candidates=20, seed=4)
    assert a == b and a[1] != c[1]
    weights, history = a
    assert len(history) == 20 and history[0]["weights"] == {n: pytest.approx(1 / 3) for n in LEVELS}
    assert min(h["score"] for h in history) == pytest.approx(
        _quadratic([0.8, -0.2, 0.4])(weights) + 0.05 * sum(abs(v) for v in weights.values())
    )
    assert score(weights) < score({n: 1 / 3 for n in LEVELS})  # the search improves on the uniform mixture


def test_l1_penalty_pulls_weights_toward_zero_at_equal_loss():
    flat = lambda w: 1.0  # noqa: E731 - every candidate has the same loss
    weights, history = lorahub.search_weights(flat, LEVELS, candidates=40, l1=0.1, seed=0)
    l1 = sum(abs(v) for v in weights.values())
    assert l1 < 1.0 and l1 == pytest.approx(min(sum(abs(v) for v in h["weights"].values()) for h in history))
    same, _ = lorahub.search_weights(flat, LEVELS, candidates=40, l1=0.0, seed=0)
    assert same == {n: pytest.approx(1 / 3) for n in LEVELS}  # no penalty, no strictly better candidate


def test_holdout_is_a_seeded_bounded_share():
    names = [f"s{i}" for i in range(50)]
    held = lorahub.holdout_names(names, 0.2, 16, seed=1)
    assert len(held) == 10 and held == lorahub.holdout_names(names, 0.2, 16, seed=1) and set(held) <= set(names)
    assert len(lorahub.holdout_names(names, 0.9, 16, seed=1)) == 16
    assert len(lorahub.holdout_names(names[:2], 0.2, 16, seed=1)) == 1
    with pytest.raises(SamoraError, match="holdout"):
        lorahub.holdout_names(names, 0.0, 16, seed=1)


def test_lorahub_finetune_composes_freezes_and_writes_metrics(tmp_path, monkeypatch):
    experts = _write_experts(tmp_path, rank=4, random_b=True)
    seen = {}
    search = lorahub.search_weights

    def watched(score, names, **kwargs):  # the search runs without autograd, on a frozen model
        def probe(weights):
            seen["grad"] = seen.get("grad", False) or torch.is_grad_enabled()
            return score(weights)

        return search(probe, names, **kwargs)

    monkeypatch.setattr(lorahub, "search_weights", watched)
    args = quick(tmp_path, *experts, "model.fusion=lorahub", "finetune.lorahub.candidates=6")
    assert main(["finetune", *args]) == 0
    assert seen == {"grad": False}
    folder = tmp_path / "runs" / "t" / "finetune" / "samora-lorahub-f0.1"
    summary = json.loads((folder / "lorahub.json").read_text())
    assert len(summary["history"]) == 6 and set(summary["weights"]) == set(LEVELS) and summary["holdout"]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0.0 <= metrics["mean_dice"] <= 1.0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["lorahub_weights"] == summary["weights"]
    assert {"expert_image", "expert_patch", "expert_pixel"} <= set(manifest["inputs"])
    # the composed LoRA stayed frozen: the final model's hub slot is exactly the composition of the experts
    state = load_file(str(folder / "final.safetensors"))
    assert not any(".experts.image." in k or ".experts.patch." in k for k in state)
    cfg = compose("finetune", args)
    model = finetune.build_model(cfg, 8)
    src = lorahub.MultiExpertLoRA(LEVELS + (lorahub.HUB,), depth=model.lora.depth, dim=model.lora.dim, rank=4)
    for level, path in finetune.expert_paths(cfg).items():
        lorahub.load_expert(src, level, path)
    lorahub.compose_experts(src, summary["weights"], into=lorahub.HUB)
    for key, value in src[lorahub.HUB].state_dict().items():
        assert torch.allclose(state[f"encoder.lora.experts.hub.{key}"], value, atol=1e-6), key
    trainable = model.trainable_parameter_names()
    assert trainable and all(n.startswith("mask_decoder.") for n in trainable)  # only the decoder trains
    assert main(["evaluate", *args]) == 0  # a lorahub run re-evaluates from its final weights

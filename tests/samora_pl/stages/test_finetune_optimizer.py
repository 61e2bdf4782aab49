"""Fine-tuning's AdamW: weight decay on matrices only, so gates, temperatures, biases and norms keep their
values on steps where they get no gradient (HL-Attn's g1 / g2 while gamma is 0, MoLE's tau)."""

from types import SimpleNamespace

import pytest
import torch

from samora_pl.config.choices import LEVELS
from samora_pl.config.compose import compose
from samora_pl.config.plans import build_plan
from samora_pl.config.specs import ExpertLayout
from samora_pl.models.factory import build_segmenter
from samora_pl.stages.finetune.module import FinetuneModule


def _optimizer(quick, fusion: str):
    cfg = compose("finetune", quick(f"model.fusion={fusion}", "model.hl_init=residual_mean"))  # a gate at 0
    model = build_segmenter(build_plan(cfg).segmenter, ExpertLayout(LEVELS, fusion), 8)
    model.set_trainable("samora")
    module = FinetuneModule(model, [f"c{i}" for i in range(8)], lr=0.005, weight_decay=0.1)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)  # what the schedule reads
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = module.configure_optimizers()["optimizer"]
    groups = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in optimizer.param_groups}
    return model, optimizer, groups


@pytest.mark.parametrize("fusion, scalars", [("hl_attn", (".g1", ".g2", ".gamma")), ("mole", (".tau",))])
def test_gates_temperatures_and_norms_are_not_decayed(quick, fusion, scalars):
    model, _, groups = _optimizer(quick, fusion)
    assert set(groups) == {0.1, 0.0}
    kept, decayed = groups[0.0], groups[0.1]
    for suffix in scalars:
        assert any(n.startswith("encoder.fusion") and n.endswith(suffix) for n in kept), suffix
    if fusion == "hl_attn":
        assert any(".norm_q.weight" in n for n in kept) and any(".norm_out.bias" in n for n in kept)
        assert any(n.endswith("ca1.proj.weight") for n in decayed)
    else:
        assert any(n.startswith("encoder.fusion") and n.endswith(".e") for n in decayed)
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert all(model.get_parameter(n).ndim <= 1 for n in kept)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(kept) | set(decayed) == trainable and not set(kept) & set(decayed)


def test_a_gate_with_zero_gradient_is_unchanged_by_a_step(quick):
    model, optimizer, _ = _optimizer(quick, "hl_attn")
    fusion = model.fusion[0]
    assert float(fusion.gamma.detach()) == 0.0  # residual_mean: g1 / g2 are in the graph but get zero gradient
    before = {n: p.detach().clone() for n, p in fusion.named_parameters() if n in ("g1", "g2")}
    loss = model(torch.rand(2, 1, 128, 128)).square().mean()
    loss.backward()
    assert all(float(fusion.get_parameter(n).grad.abs()) == 0.0 for n in before)
    optimizer.step()
    for n, value in before.items():
        assert torch.equal(fusion.get_parameter(n).detach(), value), n


def test_the_samed_recipe_decays_every_trainable_parameter(quick):
    for profile in ("samed", "hsam"):
        published = compose("finetune", ["data.name=synapse", f"profile={profile}", "model.checkpoint=none"])
        assert published.optim.decay_all, profile
    assert not compose("finetune", quick()).optim.decay_all
    model = build_segmenter(
        build_plan(compose("finetune", quick("mode=samed"))).segmenter, ExpertLayout(("image",), "single:image"), 8
    )
    model.set_trainable("samed")
    module = FinetuneModule(model, [f"c{i}" for i in range(8)], weight_decay=0.1, decay_all=True)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)
    (group,) = module.configure_optimizers()["optimizer"].param_groups
    assert group["weight_decay"] == 0.1 and len(group["params"]) == sum(p.requires_grad for p in model.parameters())

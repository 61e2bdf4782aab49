"""Seeds vary what they should: the run seed drives every trainable initialisation (HL-Attn, decoder, each
expert's A), `model.init_seed` only the frozen random encoder."""

import torch

from samora_pl.config.choices import LEVELS
from samora_pl.config.compose import compose
from samora_pl.config.plans import build_plan
from samora_pl.config.specs import ExpertLayout
from samora_pl.models.factory import base_fingerprint, build_segmenter


def build(seed: int, init_seed: int = 0, experts=LEVELS, fusion="hl_attn"):
    cfg = compose("finetune", ["data.name=demo", "model.img_size=64", f"seed={seed}", f"model.init_seed={init_seed}"])
    return build_segmenter(build_plan(cfg).segmenter, ExpertLayout(experts, fusion), 8)


def part(model, prefix: str) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def expert_a(model, level: str) -> torch.Tensor:
    return torch.cat([blk.lora_A_q.flatten() for blk in model.lora[level].blocks])


def test_run_seed_drives_the_trainable_initialisation_and_init_seed_the_frozen_encoder():
    first, again, other = build(0), build(0), build(1)
    for prefix in ("encoder.fusion.", "mask_decoder."):
        assert part(first, prefix), prefix
        assert same(part(first, prefix), part(again, prefix)), prefix
        assert not same(part(first, prefix), part(other, prefix)), prefix
    for level in LEVELS:
        assert torch.equal(expert_a(first, level), expert_a(again, level))
        assert not torch.equal(expert_a(first, level), expert_a(other, level))
    assert base_fingerprint(first) == base_fingerprint(other)  # the frozen encoder: same for every run seed
    assert base_fingerprint(first) != base_fingerprint(build(0, init_seed=1))


def test_each_expert_has_its_own_a_and_keeps_it_in_any_model():
    model = build(0)
    a = {level: expert_a(model, level) for level in LEVELS}
    assert not torch.equal(a["image"], a["patch"]) and not torch.equal(a["patch"], a["pixel"])
    assert not torch.equal(a["image"], a["pixel"])
    for level in LEVELS:  # distillation builds one expert at a time: it starts where the three-expert model does
        alone = build(0, experts=(level,), fusion=f"single:{level}")
        assert torch.equal(expert_a(alone, level), a[level])

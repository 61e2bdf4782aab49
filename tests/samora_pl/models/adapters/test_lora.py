import math
import os

import loralib
import pytest
import torch

from samora_pl.errors import SamoraError
from samora_pl.models.adapters.fusion import build_fusion
from samora_pl.models.adapters.lora import (
    LoRAQV,
    MultiExpertLoRA,
    compose_experts,
    load_expert,
    lora_ab_parameter_count,
    read_expert_metadata,
    save_expert,
)
from samora_pl.models.sam.build import build_image_encoder
from samora_pl.models.sam.encoder import SAMoraEncoder
from samora_pl.models.segmenter import SAMoraSegmenter


def test_rank4_expert_on_vit_b_has_147456_weights():
    with torch.device("meta"):
        m = SAMoraSegmenter(variant="vit_b", img_size=224, num_classes=8)
    for name in ("image", "patch", "pixel"):
        assert lora_ab_parameter_count(m.lora[name]) == 147_456 == 12 * 2 * (768 * 4 + 4 * 768)
        scales = [p for n, p in m.lora[name].named_parameters() if "lora_scale" in n]
        assert len(scales) == 12 and all(p.numel() == 1 for p in scales)
    # k untouched: q and v only, one A and one B each
    names = {n.rsplit(".", 1)[1] for n, _ in m.lora.named_parameters()}
    assert names == {"lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v", "lora_scale"}


def test_init_follows_loralib_conventions():
    torch.manual_seed(0)
    m = LoRAQV(256, 4)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) as nn.Linear / loralib
    for a in (m.lora_A_q, m.lora_A_v):
        assert a.shape == (4, 256) and a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert torch.count_nonzero(m.lora_B_q) == 0 and torch.count_nonzero(m.lora_B_v) == 0
    assert m.lora_scale.item() == 1.0
    x = torch.randn(2, 5, 256)
    dq, dv = m(x)
    assert torch.count_nonzero(dq) == 0 and torch.count_nonzero(dv) == 0
    # names carry lora_ so loralib's helpers select exactly these tensors
    lora = MultiExpertLoRA(("a", "b"), depth=2, dim=16, rank=2)
    sd = loralib.lora_state_dict(lora)
    assert set(sd) == set(lora.state_dict()) and len(sd) == 2 * 2 * 5


def test_delta_is_q_and_v_only_with_scale(randomize_lora):
    lora = randomize_lora(MultiExpertLoRA(("x",), depth=1, dim=8, rank=2))
    m = lora.experts["x"].blocks[0]
    x = torch.randn(3, 8)
    d = m.qkv_delta(x)
    assert torch.count_nonzero(d[:, 8:16]) == 0
    expect_q = m.lora_scale * (x @ m.lora_A_q.t() @ m.lora_B_q.t())
    assert torch.allclose(d[:, :8], expect_q, atol=1e-6)
    assert torch.allclose(d[:, 16:], m.lora_scale * (x @ m.lora_A_v.t() @ m.lora_B_v.t()), atol=1e-6)


def test_batched_streams_equal_per_expert(randomize_lora):
    lora = randomize_lora(MultiExpertLoRA(depth=3, dim=16, rank=4))
    with torch.no_grad():
        lora.experts["patch"].blocks[1].lora_scale.fill_(0.5)
    x, q, v = torch.randn(3, 2, 4, 4, 16).unbind(0)
    q_all, v_all = lora.streams(1, x, q, v)
    assert q_all.shape == v_all.shape == (3, 2, 4, 4, 16)
    for e, n in enumerate(lora.names):
        dq, dv = lora.experts[n].blocks[1](x)
        assert torch.allclose(q_all[e], q + dq, atol=1e-6) and torch.allclose(v_all[e], v + dv, atol=1e-6)
    q_b, v_b = lora.streams(1, x, q, v, names=("pixel",), with_base=True)
    assert q_b.shape[0] == 2 and torch.equal(q_b[0], q) and torch.equal(v_b[0], v)
    assert torch.allclose(q_b[1], q_all[2], atol=1e-6) and torch.allclose(v_b[1], v_all[2], atol=1e-6)


def test_bad_names():
    with pytest.raises(SamoraError, match="finetune.levels"):  # the key that names the experts
        MultiExpertLoRA(("a", "a"), depth=1, dim=4)
    with pytest.raises(SamoraError, match="finetune.levels"):
        MultiExpertLoRA(("a.b",), depth=1, dim=4)
    with pytest.raises(SamoraError, match="has"):
        MultiExpertLoRA(("a",), depth=1, dim=4)["b"]


def _encoder(ie, lora, fusion="single:patch"):
    return SAMoraEncoder(ie, lora, [build_fusion(fusion, lora.names, 64, num_heads=4) for _ in range(4)])


def test_roundtrip_gives_identical_outputs(tmp_path, randomize_encoder, randomize_lora):
    torch.manual_seed(0)
    src = randomize_lora(MultiExpertLoRA(depth=4, dim=64, rank=4))
    dst = MultiExpertLoRA(depth=4, dim=64, rank=4)
    path = tmp_path / "sub" / "expert.safetensors"
    save_expert(src, "patch", path, img_size=64)
    assert os.listdir(path.parent) == ["expert.safetensors"]  # no temp file left behind
    meta = read_expert_metadata(path)
    assert meta["level"] == "patch" and meta["rank"] == "4" and meta["depth"] == "4"
    assert meta["width"] == "64" and meta["img_size"] == "64" and meta["samora_pl_version"]
    x = torch.rand(2, 1, 64, 64)
    ie = randomize_encoder(build_image_encoder("tiny", 64))
    a = _encoder(ie, src)
    b = _encoder(ie, dst)
    assert not torch.allclose(a(x), b(x))
    load_expert(dst, "patch", path)
    assert torch.equal(a(x), b(x))
    for k, v in src.experts["patch"].state_dict().items():
        assert torch.equal(v, dst.experts["patch"].state_dict()[k])
    # overwrite in place is fine
    save_expert(dst, "patch", path)
    assert os.listdir(path.parent) == ["expert.safetensors"]


def test_other_rank_depth_width_fail_with_shapes(tmp_path):
    path = tmp_path / "e.safetensors"
    save_expert(MultiExpertLoRA(depth=4, dim=64, rank=8), "patch", path)
    with pytest.raises(SamoraError, match=r"\[8, 64\].*\[4, 64\]"):
        load_expert(MultiExpertLoRA(depth=4, dim=64, rank=4), "patch", path)
    with pytest.raises(SamoraError, match=r"\[8, 64\].*\[8, 32\]"):
        load_expert(MultiExpertLoRA(depth=4, dim=32, rank=8), "patch", path)
    with pytest.raises(SamoraError, match="depth"):
        load_expert(MultiExpertLoRA(depth=2, dim=64, rank=8), "patch", path)
    with pytest.raises(SamoraError, match="depth"):
        load_expert(MultiExpertLoRA(depth=6, dim=64, rank=8), "patch", path)


def test_level_mismatch_needs_explicit_source_level(tmp_path, randomize_lora):
    samed = randomize_lora(MultiExpertLoRA(("samed",), depth=2, dim=16, rank=4))
    path = tmp_path / "samed.safetensors"
    save_expert(samed, "samed", path)
    target = MultiExpertLoRA(depth=2, dim=16, rank=4)
    with pytest.raises(SamoraError, match="source_level='samed'"):
        load_expert(target, "patch", path)
    with pytest.raises(SamoraError, match="not 'image'"):
        load_expert(target, "patch", path, source_level="image")
    load_expert(target, "patch", path, source_level="samed")
    assert torch.equal(target.experts["patch"].blocks[1].lora_B_v, samed.experts["samed"].blocks[1].lora_B_v)


def test_missing_and_corrupt_files(tmp_path):
    lora = MultiExpertLoRA(depth=1, dim=8, rank=2)
    with pytest.raises(SamoraError, match="not found"):
        load_expert(lora, "patch", tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SamoraError, match="cannot read"):
        load_expert(lora, "patch", bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(SamoraError, match="not a samora_pl LoRA expert"):
        load_expert(lora, "patch", tmp_path / "foreign.safetensors")


def test_compose_experts_lorahub_style(randomize_lora):
    lora = randomize_lora(MultiExpertLoRA(("image", "patch", "pixel", "hub"), depth=2, dim=8, rank=2))
    w = {"image": 0.5, "patch": -1.0, "pixel": 0.25}
    compose_experts(lora, w, "hub")
    hub = lora["hub"].blocks[1]
    assert torch.allclose(hub.lora_A_v, sum(c * lora[n].blocks[1].lora_A_v for n, c in w.items()))
    expect_b = sum(c * lora[n].blocks[1].lora_scale * lora[n].blocks[1].lora_B_q for n, c in w.items())
    assert torch.allclose(hub.lora_B_q, expect_b) and hub.lora_scale.item() == 1.0
    with pytest.raises(SamoraError, match="unknown"):
        compose_experts(lora, {"organ": 1.0}, "hub")
    compose_experts(lora, {}, "hub")  # no weights: the empty sum, a zero expert of scale 1
    assert all(not t.any() for t in lora["hub"].parameters() if t.dim()) and hub.lora_scale.item() == 1.0

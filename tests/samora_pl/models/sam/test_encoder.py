import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos
from torch import nn

from samora_pl.errors import SamoraError
from samora_pl.models.adapters.fusion import build_fusion
from samora_pl.models.adapters.lora import MultiExpertLoRA
from samora_pl.models.sam.build import SamVariant, build_image_encoder, get_variant
from samora_pl.models.sam.encoder import SAMoraEncoder, rel_pos_bias, sdpa_attention

# a second small windowed configuration: 3 heads, window 3 on a 7x7 grid (padding), one global block
SMALL = SamVariant("small", embed_dim=48, depth=3, num_heads=3, global_attn_indexes=(1,), window_size=3, out_chans=32)

CONFIGS = [("tiny", 128), ("tiny", 96), (SMALL, 112)]


def build(randomize_encoder, variant, img_size, experts=("image", "patch", "pixel"), fusion="hl_attn", seed=0, **kw):
    torch.manual_seed(seed)
    v = get_variant(variant)
    ie = randomize_encoder(build_image_encoder(v, img_size), seed)
    lora = MultiExpertLoRA(experts, depth=v.depth, dim=v.embed_dim, rank=4)
    fusions = [build_fusion(fusion, lora.names, v.embed_dim, num_heads=v.num_heads, **kw) for _ in range(v.depth)]
    return SAMoraEncoder(ie, lora, fusions)


def perturb_fusions(enc, seed=3):
    """Open HL-Attn's gates / move MoLE's gate off its init / give LAC unequal weights, so the fusion mixes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in enc.fusion.named_parameters():
            if n.endswith(("g1", "g2", "gamma", ".e", ".tau")):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        for n, b in enc.fusion.named_buffers():
            if n.endswith(".weights"):
                b.copy_(torch.tensor([0.5, -0.25, 0.75]))


@pytest.mark.parametrize("variant,img_size", CONFIGS)
@pytest.mark.parametrize("fusion", ["hl_attn", "sum", "lac", "mole", "single:patch"])
def test_zero_B_equals_plain_sam(randomize_encoder, randomize_lora, variant, img_size, fusion):
    """With B = 0 every expert's residual is 0, so the block is plain SAM; for HL-Attn that holds for the
    residual_mean start (the paper's LN(high) of zero residuals is the units' learned bias, not 0)."""
    kw = {"hl_init": "residual_mean"} if fusion == "hl_attn" else {}
    enc = build(randomize_encoder, variant, img_size, fusion=fusion, **kw)
    randomize_lora(enc.lora, std=0.0)  # B = 0, scales != 1
    x = torch.rand(2, 3, img_size, img_size)
    with torch.no_grad():
        ours = enc(x)
        ref = enc.image_encoder(x)  # segment-anything's own forward, same weights
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("variant,img_size", CONFIGS)
@pytest.mark.parametrize(
    "fusion,kw",
    [
        ("hl_attn", {"hl_init": "residual_mean"}),
        ("hl_attn", {}),
        ("hl_attn", {"hl_order": "image-pixel-patch"}),
        ("mole", {}),
        ("lac", {}),
        ("sum", {}),
        ("single:pixel", {}),
    ],
)
def test_fused_block_equals_naive_four_calls(randomize_encoder, randomize_lora, variant, img_size, fusion, kw):
    enc = build(randomize_encoder, variant, img_size, fusion=fusion, **kw)
    randomize_lora(enc.lora)
    perturb_fusions(enc)
    x = torch.rand(2, 1, img_size, img_size)
    fast = enc(x)
    fast.square().mean().backward()
    g_fast = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad(set_to_none=True)
    naive = enc(x, naive=True)
    naive.square().mean().backward()
    assert torch.allclose(fast, naive, atol=1e-5), (fast - naive).abs().max()
    for n, p in enc.named_parameters():
        if p.grad is not None:
            assert torch.allclose(g_fast[n], p.grad, atol=1e-5, rtol=1e-3), n
    assert any("fusion" in n for n in g_fast) or fusion.startswith(("single", "sum", "lac"))


class SAMedQKV(nn.Module):
    """Test-side oracle: SAMed's LoRA, written independently: qkv(x) + [B_q A_q x, 0, B_v A_v x]."""

    def __init__(self, qkv, a_q, b_q, a_v, b_v):
        super().__init__()
        self.qkv, self.a_q, self.b_q, self.a_v, self.b_v = qkv, a_q, b_q, a_v, b_v

    def forward(self, x):
        out = self.qkv(x)
        C = out.shape[-1] // 3
        out = out.clone()
        out[..., :C] += nn.functional.linear(nn.functional.linear(x, self.a_q), self.b_q)
        out[..., 2 * C :] += nn.functional.linear(nn.functional.linear(x, self.a_v), self.b_v)
        return out


@pytest.mark.parametrize("variant,img_size", CONFIGS)
def test_single_expert_is_samed_lora(randomize_encoder, randomize_lora, variant, img_size):
    enc = build(randomize_encoder, variant, img_size, experts=("samed",), fusion="single:samed")
    randomize_lora(enc.lora)
    with torch.no_grad():
        for b in enc.lora.experts["samed"].blocks:
            b.lora_scale.fill_(1.0)  # SAMed has no scale
    ref = copy.deepcopy(enc.image_encoder)
    for blk, lb in zip(ref.blocks, enc.lora.experts["samed"].blocks):
        blk.attn.qkv = SAMedQKV(blk.attn.qkv, lb.lora_A_q, lb.lora_B_q, lb.lora_A_v, lb.lora_B_v)
    x = torch.rand(2, 3, img_size, img_size)
    with torch.no_grad():
        assert torch.allclose(enc(x), ref(x), atol=1e-5)
        assert torch.allclose(enc(x, naive=True), ref(x), atol=1e-5)


def test_grad_checkpoint_same_outputs_and_grads(randomize_encoder, randomize_lora):
    enc = build(randomize_encoder, "tiny", 128, hl_init="paper")
    randomize_lora(enc.lora)
    x = torch.rand(2, 1, 128, 128)
    a = enc(x)
    a.sum().backward()
    g = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad(set_to_none=True)
    enc.grad_checkpoint = True
    b = enc(x)
    b.sum().backward()
    assert torch.allclose(a, b, atol=1e-6)
    for n, p in enc.named_parameters():
        if p.grad is not None:
            assert torch.allclose(g[n], p.grad, atol=1e-5), n


def test_tokens_and_channels(randomize_encoder):
    enc = build(randomize_encoder, "tiny", 128)
    grey = torch.rand(2, 1, 128, 128)
    out, tokens = enc(grey, return_tokens=True)
    assert out.shape == (2, 64, 8, 8) and tokens.shape == (2, 8, 8, 64)
    assert torch.allclose(enc.neck(tokens), out)
    assert torch.allclose(enc(grey.repeat(1, 3, 1, 1)), out)
    with pytest.raises(SamoraError, match="built for 128x128"):
        enc(torch.rand(1, 1, 96, 96))
    with pytest.raises(SamoraError, match=r"\[B, 1, H, W\]"):
        enc(torch.rand(1, 2, 128, 128))


def test_rel_pos_bias_equals_sam():
    v = get_variant("tiny")
    ie = build_image_encoder(v, 128)
    attn = ie.blocks[1].attn
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    q = torch.randn(6, 64, 16)
    ref = add_decomposed_rel_pos(torch.zeros(6, 64, 64), q, attn.rel_pos_h, attn.rel_pos_w, (8, 8), (8, 8))
    assert torch.allclose(rel_pos_bias(attn, q, (8, 8)), ref, atol=1e-5)


@pytest.mark.parametrize("variant,img_size", CONFIGS)
def test_lac_block_is_sam_attention_with_the_merged_weight(randomize_encoder, randomize_lora, variant, img_size):
    """LAC = weight-space merge: every block equals segment-anything's own Block with
    qkv.weight = W + sum_i w_i s_i B_i A_i on the q and v rows (windowed and global blocks)."""
    weights = [0.5, 0.3, 0.2]
    enc = build(randomize_encoder, variant, img_size, fusion="lac", lac_weights=weights)
    randomize_lora(enc.lora)
    C = enc.embed_dim
    x = torch.randn(2, img_size // 16, img_size // 16, C)
    for i, blk in enumerate(enc.image_encoder.blocks):
        merged = copy.deepcopy(blk)
        with torch.no_grad():
            for w, name in zip(weights, enc.lora.names):
                lb = enc.lora[name].blocks[i]
                merged.attn.qkv.weight[:C] += w * lb.lora_scale * lb.lora_B_q @ lb.lora_A_q
                merged.attn.qkv.weight[2 * C :] += w * lb.lora_scale * lb.lora_B_v @ lb.lora_A_v
            ours, ref = enc.block_forward(i, x), merged(x)
            assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
            assert not torch.allclose(ref, blk(x), atol=1e-3)  # the experts really change the block
    assert not list(enc.fusion.parameters())  # LAC learns nothing


def test_aux_loss(randomize_encoder):
    enc = build(randomize_encoder, "tiny", 128, fusion="mole")
    enc(torch.rand(1, 1, 128, 128))
    gates = [f.last_gate for f in enc.fusion]
    assert len(gates) == enc.depth and all(g.shape == (1, 3) for g in gates)
    q = torch.stack(gates).mean((0, 1))
    assert torch.allclose(enc.aux_loss(), -torch.log(q).sum())
    enc = build(randomize_encoder, "tiny", 128)
    enc(torch.rand(1, 1, 128, 128))
    assert enc.aux_loss().item() == 0.0


def test_sdpa_attention_folds_the_rel_pos_bias_exactly():
    """Queries/keys with appended rel-pos features give SAM's biased softmax attention (H != W too)."""
    from segment_anything.modeling.image_encoder import Attention

    attn = Attention(32, num_heads=2, use_rel_pos=True, input_size=(3, 5))
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    q, k, v = (torch.randn(4, 2, 15, 16, dtype=torch.float64) for _ in range(3))
    attn = attn.double()
    logits = q * attn.scale @ k.transpose(-2, -1) + rel_pos_bias(attn, q, (3, 5))
    ref = logits.softmax(-1) @ v
    out = sdpa_attention(attn, q, k, v, (3, 5))
    assert out.shape == v.shape and torch.allclose(out, ref, atol=1e-10)


def test_paper_init_block_is_x_plus_base_plus_ln_high(randomize_encoder, randomize_lora):
    """Every block with hl_init=paper computes x + base + LN(high) at initialisation: SAM's own attention
    for the base and each expert's residual (naive calls), the authors' HL-Attn written out by hand."""
    from samora_pl.models.adapters.fusion import Fusion
    from samora_pl.models.sam.encoder import naive_block_forward
    from tests.samora_pl.models.adapters.test_fusion import hand_hl_attn_paper

    enc = build(randomize_encoder, "tiny", 128, hl_init="paper")
    randomize_lora(enc.lora)

    class ByHand(Fusion):
        levels = ("image", "patch", "pixel")

        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, rs):
            return hand_hl_attn_paper(self.module, rs)

    x = torch.randn(2, 8, 8, enc.embed_dim)
    with torch.no_grad():
        for i, blk in enumerate(enc.image_encoder.blocks):
            lora_blocks = {n: enc.lora.experts[n].blocks[i] for n in enc.lora.names}
            expect = naive_block_forward(blk, x, lora_blocks, ByHand(enc.fusion[i]))
            assert torch.allclose(enc.block_forward(i, x), expect, atol=1e-5)

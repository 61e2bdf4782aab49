"""LoRA experts and per-block fusion inside Hiera: exactness at B = 0, q/v-only updates in every block
(q-pool blocks included), fusion on windowed / global / q-pool blocks against a per-stream reference."""

import copy

import pytest
import torch

from samora_pl.models.adapters.fusion import build_fusion
from samora_pl.models.adapters.lora import MultiExpertLoRA
from samora_pl.models.sam2.build import build_sam2_parts
from samora_pl.models.sam2.encoder import SAMoraHieraEncoder, hiera_block_heads, hiera_block_widths

pytest.importorskip("sam2")
FUSIONS = ["hl_attn", "sum", "lac", "mole", "single:patch"]


def _randomize_trunk(image_encoder, seed=0):
    """Hiera's position embeddings start at zero: make them non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (image_encoder.trunk.pos_embed, image_encoder.trunk.pos_embed_window):
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return image_encoder


def _encoder(variant="tiny", side=224, fusion="hl_attn", seed=0, hl_init="residual_mean"):
    """residual_mean by default: the start whose block is exactly the package's with B = 0."""
    torch.manual_seed(seed)
    parts = build_sam2_parts(variant, side, 2)
    reference = copy.deepcopy(_randomize_trunk(parts.image_encoder))
    widths = hiera_block_widths(parts.image_encoder.trunk)
    lora = MultiExpertLoRA(("image", "patch", "pixel"), depth=len(widths), dim=widths[0][0], widths=widths)
    heads = hiera_block_heads(parts.image_encoder.trunk)
    kw = {"hl_init": hl_init} if fusion == "hl_attn" else {}
    fusions = [build_fusion(fusion, lora.names, d, num_heads=h, **kw) for (_, d), h in zip(widths, heads)]
    enc = SAMoraHieraEncoder(parts.image_encoder, parts.no_mem_embed, lora, fusions, img_size=side)
    return enc, reference


@pytest.mark.parametrize("fusion", FUSIONS)
def test_zero_B_reproduces_the_package_encoder_exactly(fusion):
    enc, reference = _encoder(fusion=fusion)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = enc.image_encoder(x), reference(x)
    for a, b in zip(ours["backbone_fpn"], theirs["backbone_fpn"]):
        assert torch.equal(a, b)
    assert torch.equal(ours["vision_features"], theirs["vision_features"])


def test_zero_B_exact_on_hiera_t_at_224():
    enc, reference = _encoder("t", 224, "hl_attn")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(enc.image_encoder(x)["vision_features"], reference(x)["vision_features"])


def test_state_dict_keeps_the_package_names():
    enc, reference = _encoder()
    assert list(enc.image_encoder.state_dict()) == list(reference.state_dict())


def _package_attention_with_delta(attn, x, delta_fn):
    """The package's own MultiScaleAttention with ``delta_fn(x)`` added to its qkv output (hook)."""
    handle = attn.qkv.register_forward_hook(lambda m, inp, out: out + delta_fn(inp[0]))
    try:
        return attn(x)
    finally:
        handle.remove()


def k_delta(lb, t):
    """The expert's q update put on k instead: [0, dQ, 0]."""
    dq = lb(t)[0]
    return torch.cat([torch.zeros_like(dq), dq, torch.zeros_like(dq)], -1)


def test_random_B_changes_the_whole_of_q_and_v_and_never_k_in_every_block(randomize_lora):
    enc, reference = _encoder(fusion="single:patch")
    randomize_lora(enc.lora)
    trunk, ref_trunk = enc.image_encoder.trunk, reference.trunk
    q_pool_seen = 0
    for i, (blk, ref_blk) in enumerate(zip(trunk.blocks, ref_trunk.blocks)):
        lb = enc.lora["patch"].blocks[i]
        x = torch.randn(3, 8, 8, blk.dim)
        with torch.no_grad():
            ours = blk.attn(x)
            expected = _package_attention_with_delta(ref_blk.attn, x, lb.qkv_delta)
            plain = ref_blk.attn(x)
            k_only = _package_attention_with_delta(ref_blk.attn, x, lambda t, lb=lb: k_delta(lb, t))
            dq, dv = lb(x)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours, plain) and not torch.allclose(ours, k_only)
        # A is (r, dim_in), B (dim_out, r): every one of q's and v's dim_out columns moves
        assert tuple(lb.lora_A_q.shape) == (4, blk.dim) and tuple(lb.lora_B_v.shape) == (blk.dim_out, 4)
        assert dq.shape[-1] == dv.shape[-1] == blk.dim_out
        assert bool((dq.abs().amax(dim=(0, 1, 2)) > 0).all()) and bool((dv.abs().amax(dim=(0, 1, 2)) > 0).all())
        q_pool_seen += blk.dim != blk.dim_out
    assert q_pool_seen == 3


@pytest.mark.parametrize("fusion", ["sum", "mole", "hl_attn"])
def test_fusion_matches_a_per_stream_reference_on_windowed_global_and_q_pool_blocks(fusion, randomize_lora):
    """out = base + Fuse({e: Attn_e - base}) with each stream from the package's own attention."""
    enc, reference = _encoder(fusion=fusion)
    randomize_lora(enc.lora)
    with torch.no_grad():
        for f in enc.fusion:  # move the fusions off their (mean-like) start
            for p in f.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    for i, (blk, ref_blk) in enumerate(zip(enc.image_encoder.trunk.blocks, reference.trunk.blocks)):
        # windowed blocks see B x windows on the batch axis; global ones the whole map
        x = torch.randn(5 if blk.window_size else 2, 8, 8, blk.dim)
        with torch.no_grad():
            base = ref_blk.attn(x)
            residuals = {
                n: _package_attention_with_delta(ref_blk.attn, x, enc.lora[n].blocks[i].qkv_delta) - base
                for n in enc.lora.names
            }
            expected = base + enc.fusion[i](residuals)
            ours = blk.attn(x)
        assert ours.shape[-1] == blk.dim_out
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_batched_streams_backpropagate_as_the_per_stream_reference(randomize_lora):
    """The batched residual projection and cross-attention give the reference's gradients, for the fusion's
    parameters and for the block input, on windowed, global and q-pool blocks."""
    enc, reference = _encoder(fusion="hl_attn", hl_init="paper")
    randomize_lora(enc.lora)
    for i, (blk, ref_blk) in enumerate(zip(enc.image_encoder.trunk.blocks, reference.trunk.blocks)):
        x = torch.randn(3 if blk.window_size else 2, 8, 8, blk.dim)
        fusion = enc.fusion[i]

        def reference_attention(x, i=i, ref_blk=ref_blk, fusion=fusion):
            base = ref_blk.attn(x)
            deltas = {n: enc.lora[n].blocks[i].qkv_delta for n in enc.lora.names}
            return base + fusion(
                {n: _package_attention_with_delta(ref_blk.attn, x, d) - base for n, d in deltas.items()}
            )

        grads = []
        for attention in (reference_attention, blk.attn):
            fusion.zero_grad()
            xi = x.clone().requires_grad_(True)
            out = attention(xi)
            out.backward(torch.ones_like(out).cumsum(-1) / out.shape[-1])
            grads.append([xi.grad] + [p.grad for p in fusion.parameters()])
        # round-off against the block's gradient scale (some, such as norm_k's bias, are zero up to round-off)
        scale = max(float(g.abs().max()) for g in grads[0])
        for expected, ours in zip(*grads):
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_trains_through_the_whole_trunk(fusion, randomize_lora):
    enc, _ = _encoder(fusion=fusion)
    randomize_lora(enc.lora)
    enc.requires_grad_(False)
    enc.fusion.requires_grad_(True)
    for n, p in enc.lora.named_parameters():
        p.requires_grad_("lora_B" in n)
    emb, tokens = enc(torch.rand(2, 1, 224, 224), return_tokens=True)
    (emb.square().mean() + tokens.square().mean() + enc.aux_loss()).backward()
    assert tuple(emb.shape) == (2, 64, 14, 14) and torch.isfinite(emb).all()
    used = ("patch",) if fusion.startswith("single:") else enc.lora.names
    for name in used:  # every block's expert (q-pool, windowed, global) is reached
        assert all(b.lora_B_q.grad is not None and b.lora_B_v.grad.abs().sum() > 0 for b in enc.lora[name].blocks)
    with_grad = {i for i, f in enumerate(enc.fusion) for p in f.parameters() if p.grad is not None}
    if fusion == "mole":
        assert with_grad == set(range(len(enc.fusion)))
    elif fusion == "hl_attn":  # HL-Attn's inner weights get gradient once gamma has moved
        assert all(f.gamma.grad is not None for f in enc.fusion)


def test_lac_merges_the_weighted_experts_at_qkv_in_every_block(randomize_lora):
    enc, reference = _encoder(fusion="lac")
    randomize_lora(enc.lora)
    for i, (blk, ref_blk) in enumerate(zip(enc.image_encoder.trunk.blocks, reference.trunk.blocks)):
        w = enc.fusion[i].weights.tolist()
        deltas = [enc.lora[n].blocks[i].qkv_delta for n in enc.lora.names]
        x = torch.randn(3, 8, 8, blk.dim)
        with torch.no_grad():
            expected = _package_attention_with_delta(
                ref_blk.attn, x, lambda t, w=w, deltas=deltas: sum(a * d(t) for a, d in zip(w, deltas))
            )
            ours = blk.attn(x)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)

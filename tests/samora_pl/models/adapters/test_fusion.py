import math

import pytest
import torch

from samora_pl.errors import SamoraError
from samora_pl.models.adapters.fusion import (
    HLAttention,
    LACFusion,
    MoLEFusion,
    SingleFusion,
    SumFusion,
    attention_entropy,
    build_fusion,
    mole_balance_loss,
    valid_hl_orders,
)

EXPERTS = ("image", "patch", "pixel")


def residuals(shape=(2, 4, 4, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(shape, generator=g).requires_grad_(True) for n in EXPERTS}


def mean_of(rs):
    return torch.stack([rs[n] for n in EXPERTS]).mean(0)


@pytest.mark.parametrize("name", ["hl_attn", "sum", "mole", "single:patch", "single:image"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 32), (2, 16, 32)])
def test_every_fusion_runs_forward_and_backward(name, shape):
    f = build_fusion(name, EXPERTS, 32, num_heads=4, hl_init="paper")
    rs = residuals(shape)
    out = f(rs)
    assert out.shape == shape
    loss = out.square().mean()
    if f.last_gate is not None:
        loss = loss + mole_balance_loss([f.last_gate])
    loss.backward()
    for p in f.parameters():
        assert p.grad is not None
    used = f.levels
    assert all(rs[n].grad is not None for n in used)


@pytest.mark.parametrize("order", valid_hl_orders(EXPERTS))
@pytest.mark.parametrize("init", ["residual_mean", "zero", "paper"])
def test_six_orders_and_inits_run(order, init):
    f = build_fusion("hl_attn", EXPERTS, 32, num_heads=4, hl_order=order, hl_init=init)
    assert "-".join(f.order) == order
    rs = residuals()
    f(rs).sum().backward()
    assert all(p.grad is not None for p in f.parameters())


def test_six_orders_and_error_lists_them():
    orders = valid_hl_orders(EXPERTS)
    assert len(orders) == 6 and "pixel-patch-image" in orders
    with pytest.raises(SamoraError) as e:
        build_fusion("hl_attn", EXPERTS, 32, num_heads=4, hl_order="pixel-image")
    for o in orders:
        assert o in str(e.value)
    with pytest.raises(SamoraError, match="three experts"):
        build_fusion("hl_attn", ("samed",), 32, num_heads=4)


def test_hl_init_what_the_fusion_computes_at_init():
    rs = residuals()
    # residual_mean: the mean of the expert residuals
    f = build_fusion("hl_attn", EXPERTS, 32, num_heads=4, hl_init="residual_mean")
    assert f.init == "residual_mean" and f.gamma.item() == 0.0
    assert torch.allclose(f(rs), mean_of(rs), atol=1e-6)
    # zero: nothing, the block is plain SAM
    f = build_fusion("hl_attn", EXPERTS, 32, num_heads=4, hl_init="zero")
    assert torch.count_nonzero(f(rs)) == 0
    # paper: LN(high), a full-scale update with zero mean and unit variance per token
    f = build_fusion("hl_attn", EXPERTS, 32, num_heads=4, hl_init="paper")
    out = f(rs)
    assert torch.allclose(out.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
    assert f.g1.item() == 1.0 and f.g2.item() == 1.0


def test_hl_attn_wiring_follows_the_order():
    f = HLAttention(("pixel", "patch", "image"), 32, heads=4, init="paper")
    rs = residuals()
    ln = torch.nn.functional.layer_norm
    with torch.no_grad():
        f.g1.zero_()
        f.g2.zero_()
    # both gates closed: only the last level (image) passes: LN(r_image)
    assert torch.allclose(f(rs), ln(rs["image"], (32,)), atol=1e-5)
    with torch.no_grad():
        f.g2.fill_(1.0)
    # gate 1 closed: low = r_patch, so pixel has no influence; high = CA2(Q=r_image, KV=r_patch)
    a = f(rs)
    rs2 = dict(rs, pixel=torch.randn_like(rs["pixel"]))
    assert torch.allclose(a, f(rs2), atol=1e-6)
    expect = ln(f.ca2(rs["image"].flatten(1, 2), rs["patch"].flatten(1, 2)), (32,)).reshape(a.shape)
    assert torch.allclose(a, expect, atol=1e-5)
    with torch.no_grad():
        f.g1.fill_(1.0)
    assert not torch.allclose(f(rs), f(rs2), atol=1e-4)  # now pixel matters through step 1


def test_hl_attn_over_two_experts_is_its_first_unit():
    pair = ("image", "patch")
    f = build_fusion("hl_attn", pair, 32, num_heads=4, hl_order="pixel-patch-image", hl_init="paper")
    assert f.order == ("patch", "image") and f.ca2 is None and f.g2 is None  # pixel dropped, hierarchy kept
    rs = residuals()
    expect = f.ca1(rs["image"].flatten(1, 2), rs["patch"].flatten(1, 2))  # Q = image, KV = patch
    out = f(rs)
    assert torch.allclose(out, torch.nn.functional.layer_norm(expect, (32,)).reshape(out.shape), atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in f.parameters())
    f = build_fusion("hl_attn", pair, 32, num_heads=4, hl_init="residual_mean")  # the mean of the two at init
    assert torch.allclose(f(rs), (rs["image"] + rs["patch"]) / 2, atol=1e-6)
    assert build_fusion("hl_attn", ("pixel", "image"), 32, num_heads=4, hl_order="image-patch-pixel").order == (
        "image",
        "pixel",
    )
    with pytest.raises(SamoraError, match="patch-image"):
        build_fusion("hl_attn", pair, 32, num_heads=4, hl_order="image-pixel")


def test_cross_attention_unit_formula():
    f = HLAttention(EXPERTS, 32, heads=4)
    q, kv = torch.randn(2, 10, 32), torch.randn(2, 7, 32)
    ca = f.ca1
    mha = torch.nn.functional.multi_head_attention_forward
    o, _ = mha(
        ca.norm_q(q).transpose(0, 1),
        ca.norm_k(kv).transpose(0, 1),
        ca.norm_v(kv).transpose(0, 1),
        32,
        4,
        ca.attn.in_proj_weight,
        ca.attn.in_proj_bias,
        None,
        None,
        False,
        0.0,
        ca.attn.out_proj.weight,
        ca.attn.out_proj.bias,
        need_weights=False,
    )
    assert torch.allclose(ca(q, kv), ca.proj(o.transpose(0, 1)) + q, atol=1e-5)


@pytest.mark.parametrize(("batch", "nq", "nkv"), [(3, 10, 7), (1, 16, 16)])
def test_cross_attention_unit_equals_multihead_attention_forward_and_backward(batch, nq, nkv):
    torch.manual_seed(0)
    ca = HLAttention(EXPERTS, 32, heads=4).ca1
    q, kv = torch.randn(batch, nq, 32), torch.randn(batch, nkv, 32)
    qn, kn, vn = (t.detach().requires_grad_(True) for t in (ca.norm_q(q), ca.norm_k(kv), ca.norm_v(kv)))
    grads = []
    for fn in (lambda: ca.attn(qn, kn, vn, need_weights=False)[0], lambda: ca.attend(qn, kn, vn)):
        ca.zero_grad()
        qn.grad = kn.grad = vn.grad = None
        out = fn()
        out.square().sum().backward()
        params = (ca.attn.in_proj_weight.grad, ca.attn.in_proj_bias.grad, ca.attn.out_proj.weight.grad)
        grads.append((out.detach(), qn.grad, kn.grad, vn.grad, *params))
    for reference, fast in zip(*grads):
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_narrow_width_projects_in_and_out():
    f = build_fusion("hl_attn", EXPERTS, 32, num_heads=4, hl_width=16, hl_heads=2, hl_init="paper")
    assert isinstance(f.proj_in, torch.nn.Linear) and f.proj_in.out_features == 16
    rs = residuals()
    assert f(rs).shape == rs["image"].shape
    with pytest.raises(SamoraError, match="multiple of hl_heads"):
        build_fusion("hl_attn", EXPERTS, 32, num_heads=4, hl_width=18, hl_heads=4)
    with pytest.raises(SamoraError, match="hl_init"):
        build_fusion("hl_attn", EXPERTS, 32, num_heads=4, hl_init="random")


def test_hl_attn_full_width_vit_b_is_about_71m():
    with torch.device("meta"):
        blocks = [build_fusion("hl_attn", EXPERTS, 768, num_heads=12) for _ in range(12)]
    n = sum(p.numel() for b in blocks for p in b.parameters())
    # per block: 2 x (3 LN + MHA in/out + Linear) + LN + g1, g2 (the paper's init has no gamma)
    per_unit = 3 * 2 * 768 + (3 * 768 * 768 + 3 * 768) + 2 * (768 * 768 + 768)
    assert n == 12 * (2 * per_unit + 2 * 768 + 2) == 71_000_088
    assert 70.5e6 < n < 71.5e6


def test_baselines_at_init_and_formulas():
    rs = residuals()
    assert torch.allclose(SumFusion(EXPERTS)(rs), rs["image"] + rs["patch"] + rs["pixel"])
    assert torch.equal(SingleFusion("pixel")(rs), rs["pixel"])
    mole = MoLEFusion(EXPERTS, 32)
    assert torch.allclose(mole(rs), mean_of(rs), atol=1e-6)  # e = 0: uniform gate, the experts' mean
    assert mole_balance_loss([mole.last_gate]).item() == pytest.approx(3 * math.log(3))  # its minimum, E log E
    assert SumFusion(EXPERTS).last_gate is None


def test_lac_weights_are_fixed_normalised_and_validated():
    lac = LACFusion(EXPERTS)
    assert torch.allclose(lac.weights, torch.full((3,), 1 / 3)) and not list(lac.parameters())  # nothing learned
    assert LACFusion(EXPERTS, [0.5, 0.25, 0.25]).weights.tolist() == [0.5, 0.25, 0.25]
    for bad in ([0.5, 0.5, 0.5], [1.0, 0.0], [float("nan"), 0.5, 0.5]):
        with pytest.raises(SamoraError, match="lac_weights"):
            LACFusion(EXPERTS, bad)
    assert "weights" in LACFusion(EXPERTS).state_dict()  # a fine-tune's file records the weights it used


def test_mole_gate_and_balance_loss_equal_the_published_formulas():
    """G_i = exp(eps_i / tau) / sum_j exp(eps_j / tau), eps = Normalise(E_0 + ... + E_{N-1})^T e (here each
    expert's output averaged over tokens, L2 normalisation), one distribution per sample; the block update
    is sum_i G_i E_i; L_balance = -log prod_i q_i, q_i the mean of G_i over the gated blocks and the batch."""
    g = torch.Generator().manual_seed(5)
    blocks = [MoLEFusion(EXPERTS, 32) for _ in range(3)]
    inputs = [residuals((4, 3, 5, 32), seed=10 + k) for k in range(3)]
    expected_gates = []
    for f, rs in zip(blocks, inputs):
        with torch.no_grad():
            f.e.copy_(torch.randn(f.e.shape, generator=g) * 3)
            f.tau.fill_(0.7)
        out = f(rs)
        for b in range(4):
            concat = torch.cat([rs[n][b].detach().double().reshape(-1, 32).mean(0) for n in EXPERTS])
            omega = concat / concat.square().sum().sqrt()
            eps = [float(sum(omega[k] * f.e[k, i].detach().double() for k in range(96))) for i in range(3)]
            z = [math.exp(v / 0.7) for v in eps]
            gate = [v / sum(z) for v in z]
            expected_gates.append(gate)
            assert f.last_gate[b].tolist() == pytest.approx(gate, abs=1e-5)
            mix = sum(gate[i] * rs[n][b] for i, n in enumerate(EXPERTS))
            assert torch.allclose(out[b], mix.float(), atol=1e-5)
    q = [sum(gate[i] for gate in expected_gates) / len(expected_gates) for i in range(3)]
    assert mole_balance_loss([f.last_gate for f in blocks]).item() == pytest.approx(-math.log(math.prod(q)), abs=1e-5)
    assert max(max(gate) for gate in expected_gates) > 0.6  # the random gate is far from uniform: a real test
    loss = mole_balance_loss([f.last_gate for f in blocks])
    loss.backward()
    assert all(f.e.grad.abs().sum() > 0 and f.tau.grad is not None for f in blocks)  # e and tau learn from it


def test_bad_fusion_names():
    with pytest.raises(SamoraError, match="hl_attn"):
        build_fusion("concat", EXPERTS, 32)
    with pytest.raises(SamoraError, match="lacks"):
        build_fusion("single:organ", EXPERTS, 32)
    with pytest.raises(SamoraError, match="finetune"):
        build_fusion("lorahub", EXPERTS, 32)


def hand_attention(unit, q, kv):
    """(CA(Q, KV), per-head attention weights [B, heads, Nq, Nkv]) of a cross-attention unit written out head
    by head: CA(Q, KV) = Linear(MHA(LN_q(Q), LN_k(KV), LN_v(KV))) + Q."""
    c, heads = q.shape[-1], unit.attn.num_heads
    w, b = unit.attn.in_proj_weight, unit.attn.in_proj_bias

    def ln(t, norm):
        return torch.nn.functional.layer_norm(t, (c,), norm.weight, norm.bias)

    def split(t):  # [B, N, C] -> [B, heads, N, C / heads]
        return t.reshape(*t.shape[:-1], heads, c // heads).transpose(1, 2)

    qh = split(ln(q, unit.norm_q) @ w[:c].T + b[:c])
    kh = split(ln(kv, unit.norm_k) @ w[c : 2 * c].T + b[c : 2 * c])
    vh = split(ln(kv, unit.norm_v) @ w[2 * c :].T + b[2 * c :])
    p = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(c // heads), -1)
    o = (p @ vh).transpose(1, 2).reshape(q.shape) @ unit.attn.out_proj.weight.T + unit.attn.out_proj.bias
    return o @ unit.proj.weight.T + unit.proj.bias + q, p


def hand_cross_attention(unit, q, kv):
    return hand_attention(unit, q, kv)[0]


def hand_hl_attn_paper(f, rs):
    """The authors' fused update at initialisation (g1 = g2 = 1, final LayerNorm with weight 1 and bias 0):
    low = CA1(Q = r_patch, KV = r_pixel), high = CA2(Q = r_image, KV = low), update = LN(high)."""
    tokens = {n: r.flatten(1, 2) for n, r in rs.items()}
    low = hand_cross_attention(f.ca1, tokens["patch"], tokens["pixel"])
    high = hand_cross_attention(f.ca2, tokens["image"], low)
    return torch.nn.functional.layer_norm(high, (high.shape[-1],)).reshape(rs["image"].shape)


def test_hl_init_paper_is_the_authors_form_at_init():
    """hl_init=paper: the update is LN(high) alone (no mean of the residuals, no gamma), so the block is
    x + base + LN(high); the residual_mean update at init differs from it by the whole LN(high) term."""
    rs = residuals()
    f = build_fusion("hl_attn", EXPERTS, 32, num_heads=4, hl_init="paper")
    assert f.gamma is None and f.g1.item() == 1.0 and f.g2.item() == 1.0
    expect = hand_hl_attn_paper(f, rs)
    assert torch.allclose(f(rs), expect, atol=1e-5), (f(rs) - expect).abs().max()
    torch.manual_seed(0)
    mean_init = build_fusion("hl_attn", EXPERTS, 32, num_heads=4, hl_init="residual_mean")
    assert torch.allclose(mean_init(rs), mean_of(rs), atol=1e-6) and not torch.allclose(expect, mean_of(rs), atol=0.1)


def test_attention_entropy_is_log_n_for_uniform_and_zero_for_one_hot():
    n = 7
    uniform = torch.full((2, 3, 5, n), 1.0 / n)
    assert torch.allclose(attention_entropy(uniform), torch.full((2, 3, 5), math.log(n)))
    one_hot = torch.nn.functional.one_hot(torch.randint(0, n, (2, 3, 5)), n).float()
    assert torch.equal(attention_entropy(one_hot), torch.zeros(2, 3, 5))


def test_hl_attn_diagnostics_record_only_when_asked_and_leave_the_output_unchanged():
    f = build_fusion("hl_attn", EXPERTS, 32, num_heads=4, hl_init="residual_mean")  # the init with a gamma
    rs = residuals()
    plain = f(rs)
    assert f.ca1.entropy_count == 0 and set(f.diagnostics()) == {"g1", "g2", "gamma"}  # training: fast path only
    f.record_diagnostics(True)
    assert torch.allclose(f(rs), plain, atol=1e-6)  # the weights come from the same attention
    f(rs)
    d = f.diagnostics()
    assert (d["g1"], d["g2"], d["gamma"]) == (1.0, 1.0, 0.0) and d["entropy_uniform"] == pytest.approx(math.log(16))
    # by hand: the mean over batch, heads and queries of each softmax row's entropy
    tokens = {n: r.detach().flatten(1, 2) for n, r in rs.items()}
    with torch.no_grad():
        low, p1 = hand_attention(f.ca1, tokens["patch"], tokens["pixel"])
        _, p2 = hand_attention(f.ca2, tokens["image"], low)
    assert d["entropy_step1"] == pytest.approx(float(-(p1 * p1.log()).sum(-1).mean()), rel=1e-5)
    assert d["entropy_step2"] == pytest.approx(float(-(p2 * p2.log()).sum(-1).mean()), rel=1e-5)
    f.record_diagnostics(False)
    f(rs)
    assert f.ca1.entropy_count == 2 * 2 * 4 * 16  # two recorded forwards of [B=2, heads=4, 16 queries]
    assert "g2" not in build_fusion("hl_attn", ("image", "patch"), 32, num_heads=4, hl_init="paper").diagnostics()


def test_mole_and_lac_diagnostics():
    mole = MoLEFusion(EXPERTS, 32)
    with torch.no_grad():
        mole.e.normal_()
    mole.record_diagnostics(True)
    batches = [residuals(seed=s) for s in (1, 2)]
    gates = [mole.gate([rs[n] for n in EXPERTS]).detach() for rs in batches]
    for rs in batches:
        mole(rs)
    d = mole.diagnostics()
    mean = torch.cat(gates).mean(0)
    assert [d[f"gate_{n}"] for n in EXPERTS] == pytest.approx(mean.tolist(), abs=1e-6) and d["tau"] == 1.0
    assert LACFusion(EXPERTS, [0.5, 0.25, 0.25]).diagnostics() == {
        "weight_image": 0.5,
        "weight_patch": 0.25,
        "weight_pixel": 0.25,
    }
    assert SumFusion(EXPERTS).diagnostics() == {}

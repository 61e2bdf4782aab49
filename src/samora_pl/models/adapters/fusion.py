"""Per-block fusion of the LoRA experts (the "Fuse" slot of a SAMora block) and the published baselines.

In every encoder block the experts produce residuals ``r_e = Attn_e(x) - Attn_base(x)`` (see
``encoder.py``); most fusion modules map the dict ``{expert name: r_e}`` (each [B, H, W, C] or [B, N, C])
to one update of the same shape, and the block computes ``x + base + Fuse(residuals)``. Two act earlier,
on the frozen ``qkv`` projection itself: ``single:<level>`` and ``lac`` (one attention call per block).

Choices (``build_fusion(name, ...)``; :data:`FUSION_NAMES` is the one list the config validates against):

``hl_attn``   HL-Attn, the paper's hierarchical cross-attention (:class:`HLAttention`); with two
              experts (level ablation) its first unit only.
``sum``       plain sum of the residuals (all experts at full strength; the level ablation's "all-sum").
``lac``       linear arithmetic composition (MoLE, arXiv 2404.13628, Eq. 2, "normalised"): the LoRAs are
              merged in weight space, ``W' = W + sum_e w_e dW_e`` with fixed ``w_e`` summing to 1 (uniform
              1/E unless ``model.lac_weights``); nothing is learned (:class:`LACFusion`).
``mole``      Mixture of LoRA Experts (MoLE, arXiv 2404.13628, Eqs. 5-8): a learnable gate per block over
              the experts' outputs with a learnable temperature, and the published balance loss
              (:class:`MoLEFusion`, :func:`mole_balance_loss`).
``lorahub``   LoRAHub (arXiv 2307.13269): the experts composed element-wise into one LoRA by a
              gradient-free search; a stage-level choice (``stages/finetune/lorahub.py``) whose blocks then run
              ``single:hub``.
``single:L``  only expert L's update: with one expert this is exactly SAMed's LoRA; the encoder
              runs it on a fast path that never computes the base attention separately.

``docs/baselines.md`` says how each baseline follows its paper and where it deviates.

Diagnostics: between :meth:`Fusion.record_diagnostics` ``(True)`` and ``(False)`` (the fine-tune's
validation, ``callbacks.FusionDiagnostics``) a fusion accumulates what :meth:`Fusion.diagnostics` reports:
HL-Attn's gates and the entropy of each cross-attention unit's attention, MoLE's mean gate per expert,
LAC's weights. Training never records, so it keeps the fast attention path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import permutations

import torch
import torch.nn.functional as F
from torch import nn

from samora_pl.config.choices import FUSION_NAMES, HL_INITS
from samora_pl.errors import SamoraError

__all__ = [
    "FUSION_NAMES",
    "FUSIONS",
    "HL_INITS",
    "Fusion",
    "SumFusion",
    "SingleFusion",
    "LACFusion",
    "MoLEFusion",
    "mole_balance_loss",
    "attention_entropy",
    "CrossAttentionUnit",
    "HLAttention",
    "valid_hl_orders",
    "parse_hl_order",
    "build_fusion",
]

FUSIONS = FUSION_NAMES + ("single:<level>",)  # as error messages name them
MOLE_MIN_TEMPERATURE = 0.05  # the learnable tau is used as max(tau, this), so the gate stays a finite softmax


def _tokens(r: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """[B, H, W, C] or [B, N, C] -> ([B, N, C], original shape)."""
    if r.dim() == 4:
        return r.reshape(r.shape[0], r.shape[1] * r.shape[2], r.shape[3]), r.shape
    if r.dim() == 3:
        return r, r.shape
    raise ValueError(f"expert residuals must be [B, H, W, C] or [B, N, C], got {list(r.shape)}")


class Fusion(nn.Module):
    """Base class: ``forward(residuals: dict[name, Tensor]) -> Tensor`` of the residuals' shape."""

    #: experts this fusion reads (in a fixed order)
    levels: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        #: per-sample gate of the last forward, [B, E] (MoLE only): the encoder's balance loss reads it
        self.last_gate: torch.Tensor | None = None
        self.recording = False

    def record_diagnostics(self, on: bool) -> None:
        """Start (from empty) or stop accumulating what :meth:`diagnostics` reports over the forwards."""
        self.recording = bool(on)
        for module in self.modules():
            if isinstance(module, CrossAttentionUnit):
                module.recording = self.recording
                if on:
                    module.entropy_sum, module.entropy_count = None, 0

    def diagnostics(self) -> dict[str, float]:
        """Named scalars of this block's fusion (empty for fusions with nothing learned or weighted)."""
        return {}

    def _get(self, residuals: dict[str, torch.Tensor]):
        try:
            return [residuals[n] for n in self.levels]
        except KeyError as exc:
            raise SamoraError(
                f"fusion {type(self).__name__} needs expert residuals {list(self.levels)}, got {list(residuals)}"
            ) from exc


class SumFusion(Fusion):
    """``sum_e r_e`` (the level ablation "all experts, plain sum")."""

    def __init__(self, levels: Sequence[str]) -> None:
        super().__init__()
        self.levels = tuple(levels)

    def forward(self, residuals: dict[str, torch.Tensor]) -> torch.Tensor:
        rs = self._get(residuals)
        out = rs[0]
        for r in rs[1:]:
            out = out + r
        return out


class SingleFusion(Fusion):
    """Only ``level``'s residual. One expert + this fusion = SAMed's LoRA exactly."""

    def __init__(self, level: str) -> None:
        super().__init__()
        self.level = level
        self.levels = (level,)

    def forward(self, residuals: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._get(residuals)[0]

    def extra_repr(self) -> str:
        return f"level={self.level!r}"


class LACFusion(Fusion):
    """Linear arithmetic composition (MoLE's "normalised linear arithmetic composition", its Eq. 2).

    ``W' = W + sum_e w_e dW_e`` with one fixed scalar per LoRA, shared by all its layers, and
    ``sum_e w_e = 1`` (uniform 1/E by default). Nothing here is learned: the composition is merged into
    the frozen ``qkv`` projection of every block, so the block is plain SAM attention whose q and v
    weights are ``W + sum_e w_e s_e B_e A_e``, and stage 2 trains the mask decoder on that encoder.

    The encoder applies the merge (``SAMoraEncoder``, one attention call per block) in factored form,
    ``qkv(x) + sum_e w_e s_e (x A_e^T) B_e^T``, the same linear map as the merged weight without forming
    the C x C matrices; there are no residuals to fuse, so :meth:`forward` is never called.
    """

    def __init__(self, levels: Sequence[str], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.levels = tuple(levels)
        n = len(self.levels)
        weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
        if len(weights) != n or not all(math.isfinite(w) for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
            raise SamoraError(
                f"model.lac_weights is {weights}; give {n} finite weights summing to 1, one per expert in the "
                f"order {list(self.levels)} (normalised linear composition), or leave it unset for 1/{n} each"
            )
        self.weights: torch.Tensor
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))

    def forward(self, residuals: dict[str, torch.Tensor]) -> torch.Tensor:
        raise RuntimeError("LAC is merged into qkv by the encoder; it does not fuse attention residuals")

    def diagnostics(self) -> dict[str, float]:
        return {f"weight_{n}": float(w) for n, w in zip(self.levels, self.weights.tolist())}

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, weights={[round(w, 4) for w in self.weights.tolist()]}"


class MoLEFusion(Fusion):
    """MoLE's gate over the experts of one block (arXiv 2404.13628, Eqs. 5-8), one distribution per sample.

    The experts' outputs ``E_e`` are their attention residuals ``r_e`` (the LoRA's delta; the frozen path
    ``F(x) = x + Attn_base(x)`` is added once by the block, so the residual stream is not counted E times),
    and the block computes ``F(x) + sum_e G_e r_e`` with::

        E_Omega = L2-normalise(concat_e(mean over tokens of r_e))       [B, E*C]
        eps     = E_Omega @ e                                           [B, E]   (e learnable, [E*C, E])
        G       = softmax(eps / tau)                                    (tau a learnable scalar, init 1)

    Deviations, all documented in ``docs/baselines.md``: the paper flattens the whole [L, d] output of
    every expert into E_Omega, which gives ``e`` E*L*d*E parameters per block (about 28M per block for
    ViT-B at 1024 px) and ties the gate to one input size; here each expert's output is averaged over its
    tokens first (a pooling deviation; ``e`` has E*C*E parameters). The paper's "normalisation" is
    unnamed; L2 normalisation is what the authors' released code applies to its gate input. ``e`` starts
    at zero (uniform gate: the block starts as the mean of the experts); ``tau`` is used as
    ``max(tau, MOLE_MIN_TEMPERATURE)``. The balance loss over the gated blocks is
    :func:`mole_balance_loss` of every block's :attr:`last_gate`.
    """

    def __init__(self, levels: Sequence[str], dim: int) -> None:
        super().__init__()
        self.levels = tuple(levels)
        n = len(self.levels)
        self.e = nn.Parameter(torch.zeros(n * int(dim), n))
        self.tau = nn.Parameter(torch.ones(()))
        self.gate_sum: torch.Tensor | None = None  # sum over recorded samples of G, [E]
        self.gate_count = 0

    def record_diagnostics(self, on: bool) -> None:
        super().record_diagnostics(on)
        if on:
            self.gate_sum, self.gate_count = None, 0

    def diagnostics(self) -> dict[str, float]:
        out = {"tau": float(self.tau.detach().clamp_min(MOLE_MIN_TEMPERATURE))}
        if self.gate_count and isinstance(self.gate_sum, torch.Tensor):
            mean = (self.gate_sum / self.gate_count).tolist()
            out.update({f"gate_{n}": g for n, g in zip(self.levels, mean)})
        return out

    def gate(self, rs: Sequence[torch.Tensor]) -> torch.Tensor:
        """G [B, E] from the experts' residuals (each [B, H, W, C] or [B, N, C])."""
        pooled = torch.cat([_tokens(r)[0].mean(1) for r in rs], dim=-1)  # [B, E*C]
        omega = F.normalize(pooled.float(), dim=-1)
        eps = omega @ self.e.float()
        return torch.softmax(eps / self.tau.float().clamp_min(MOLE_MIN_TEMPERATURE), dim=-1)

    def forward(self, residuals: dict[str, torch.Tensor]) -> torch.Tensor:
        rs = self._get(residuals)
        g = self.gate(rs)
        self.last_gate = g
        if self.recording:
            total = g.detach().sum(0)
            self.gate_sum = total if self.gate_sum is None else self.gate_sum + total
            self.gate_count += g.shape[0]
        shape = (g.shape[0],) + (1,) * (rs[0].dim() - 1)
        out = g[:, 0].reshape(shape).to(rs[0].dtype) * rs[0]
        for i in range(1, len(rs)):
            out = out + g[:, i].reshape(shape).to(rs[i].dtype) * rs[i]
        return out


def mole_balance_loss(gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """MoLE's gate-balancing loss: ``-sum_e log q_e`` with ``q_e`` the mean of ``G_e`` over the gated blocks
    and over the batch (of this device). ``gates``: one [B, E] gate per block. Smallest (E log E) when
    every expert gets 1/E on average; without it the MoLE paper reports its gates collapse on one LoRA."""
    q = torch.stack([g.float() for g in gates]).mean(dim=(0, 1))
    return -torch.log(q).sum()


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """``-sum_k p_k log p_k`` (nats) of every attention row of ``weights`` [..., N_kv] -> [...]: log(N_kv)
    when a query spreads evenly over the keys, 0 when it attends to one key only."""
    return torch.special.entr(weights.float()).sum(-1)


class CrossAttentionUnit(nn.Module):
    """``CA(Q, KV) = Linear(MHA(LN_q(Q), LN_k(KV), LN_v(KV))) + Q`` over [B, N, W] tokens.

    While ``recording`` (validation diagnostics only) the MHA also returns its per-head weights, a slower
    path, and the unit adds up their entropy per head and query (:func:`attention_entropy`)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_k = nn.LayerNorm(width)
        self.norm_v = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.proj = nn.Linear(width, width)
        self.recording = False
        self.entropy_sum: torch.Tensor | None = None
        self.entropy_count = 0
        self.kv_tokens = 0

    def attend(self, qn: torch.Tensor, kn: torch.Tensor, vn: torch.Tensor) -> torch.Tensor:
        """``self.attn(qn, kn, vn)`` without its weights, in the [B, N, W] layout throughout.

        The same projections and ``scaled_dot_product_attention`` call as ``nn.MultiheadAttention``, but
        that module works sequence-first: with ``batch_first`` it copies every input to [N, B, W] and the
        output back, and the output projection reads a permuted copy. Here the projections run on the
        inputs as they are and the heads are strided views: HL-Attn's forward+backward is 1.16x faster on
        SAM 2's stage-1 windows at 512 px (256 windows of 64 tokens, width 112), the same where B = 1.
        """
        mha = self.attn
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        B, Nq, W = qn.shape
        nh = mha.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, N, W] -> [B, nh, N, W/nh] (a view)
            return t.reshape(B, t.shape[1], nh, W // nh).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            heads(F.linear(qn, w_q, b_q)), heads(F.linear(kn, w_k, b_k)), heads(F.linear(vn, w_v, b_v))
        )
        return mha.out_proj(o.transpose(1, 2).reshape(B, Nq, W))

    def update(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``CA(Q, KV) - Q``: what HL-Attn's gates scale (adding Q only to subtract it again costs two passes)."""
        qn, kn, vn = self.norm_q(q), self.norm_k(kv), self.norm_v(kv)
        if not self.recording:
            return self.proj(self.attend(qn, kn, vn))
        o, weights = self.attn(qn, kn, vn, need_weights=True, average_attn_weights=False)  # [B, heads, Nq, Nkv]
        h = attention_entropy(weights.detach())
        self.entropy_sum = h.sum() if self.entropy_sum is None else self.entropy_sum + h.sum()
        self.entropy_count += h.numel()
        self.kv_tokens = kv.shape[1]
        return self.proj(o)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.update(q, kv) + q

    def mean_entropy(self) -> float | None:
        """Mean attention entropy over the recorded heads and queries (None before any)."""
        if not self.entropy_count or self.entropy_sum is None:
            return None
        return float(self.entropy_sum) / self.entropy_count


class HLAttention(Fusion):
    """HL-Attn: hierarchical (low- then high-level) cross-attention fusion of three expert residuals.

    With ``order = (a, b, c)`` (default pixel -> patch -> image), over all tokens of the image::

        low  = r_b + g1 * (CA1(Q=r_b, KV=r_a) - r_b)
        high = r_c + g2 * (CA2(Q=r_c, KV=low) - r_c)
        h    = LN(high)                                  (width W; projected in/out when W < C)

    ``g1``, ``g2`` are learnable scalars initialised to 1. With two experts ``(a, b)`` (the level
    ablation's pairs) only the first unit exists and ``h = LN(low)``: the lower level still attends
    into the higher one, as in the full hierarchy. The output depends on ``init``:

    ``paper`` (the default, and the paper-scale profiles')  ``h``, as the paper writes it and the authors' code
        computes it: the block is ``x + base + LN(high)``. The LayerNorm makes the update full-scale (unit variance per
        token) at step 0, which perturbs the frozen encoder before any training.
    ``residual_mean`` (the tiny profile's)  ``mean_e(r_e) + gamma * h`` with
        ``gamma`` a learnable scalar at 0. At initialisation the block computes ``x + base + mean_e(r_e)``:
        the frozen encoder sees the average of its distilled experts, and HL-Attn is learned as a
        correction on top (gamma receives gradient from step 0, the rest once gamma moves). Every
        HL-Attn result made this way is mean fusion plus a correction; results tables name the init. In a
        short fine-tune gamma barely moves (|gamma| < 0.05 after 300 steps on Colin27), so it stays mean fusion.
    ``zero``  ``gamma * h`` with ``gamma`` at 0: the block is exactly plain SAM at initialisation.
    """

    def __init__(
        self,
        order: Sequence[str],
        dim: int,
        *,
        width: int | None = None,
        heads: int = 12,
        init: str = "paper",
    ) -> None:
        super().__init__()
        order = tuple(order)
        if len(order) not in (2, 3) or len(set(order)) != len(order):
            raise SamoraError(f"HL-Attn needs two or three distinct experts in its order, got {list(order)}")
        if init not in HL_INITS:
            raise SamoraError(f"unknown model.hl_init {init!r}; choose one of {list(HL_INITS)}")
        width = int(dim if width is None else width)
        if width < 1 or width % int(heads):
            raise SamoraError(
                f"HL-Attn width {width} must be a positive multiple of hl_heads={heads}; fix model.hl_width/hl_heads"
            )
        self.levels = order
        self.order = order
        self.dim, self.width, self.heads, self.init = int(dim), width, int(heads), init
        self.proj_in = nn.Linear(dim, width) if width != dim else nn.Identity()
        self.proj_out = nn.Linear(width, dim) if width != dim else nn.Identity()
        self.ca1 = CrossAttentionUnit(width, heads)
        self.ca2 = CrossAttentionUnit(width, heads) if len(order) == 3 else None
        self.norm_out = nn.LayerNorm(width)
        self.g1 = nn.Parameter(torch.ones(()))
        self.g2 = nn.Parameter(torch.ones(())) if len(order) == 3 else None
        if init in ("residual_mean", "zero"):
            self.gamma = nn.Parameter(torch.zeros(()))
        else:
            self.register_parameter("gamma", None)

    def hierarchical(self, residuals: dict[str, torch.Tensor]) -> torch.Tensor:
        """``proj_out(LN(high))`` as [B, N, C] tokens (the paper's fused output)."""
        ra, rb, *rest = (self.proj_in(_tokens(r)[0]) for r in self._get(residuals))
        high = low = rb + self.g1 * self.ca1.update(rb, ra)
        if rest:
            assert self.ca2 is not None and self.g2 is not None  # a third level builds the second unit
            high = rest[0] + self.g2 * self.ca2.update(rest[0], low)
        return self.proj_out(self.norm_out(high))

    def forward(self, residuals: dict[str, torch.Tensor]) -> torch.Tensor:
        rs = self._get(residuals)
        shape = rs[0].shape
        h = self.hierarchical(residuals).reshape(shape)
        if self.init == "paper":
            return h
        out = self.gamma * h
        if self.init == "residual_mean":
            out = out + torch.stack(rs, 0).mean(0)
        return out

    def diagnostics(self) -> dict[str, float]:
        """g1, g2, gamma (where present), and each unit's mean attention entropy with its uniform value
        log(N_kv), recorded over the forwards since :meth:`record_diagnostics`."""
        gates = (("g1", self.g1), ("g2", self.g2), ("gamma", self.gamma))
        out = {name: float(p.detach()) for name, p in gates if p is not None}
        for step, unit in ((1, self.ca1), (2, self.ca2)):
            entropy = unit.mean_entropy() if unit is not None else None
            if unit is not None and entropy is not None:
                out[f"entropy_step{step}"] = entropy
                out["entropy_uniform"] = math.log(unit.kv_tokens)
        return out

    def extra_repr(self) -> str:
        return f"order={'-'.join(self.order)}, width={self.width}, heads={self.heads}, init={self.init}"


def valid_hl_orders(experts: Sequence[str]) -> tuple[str, ...]:
    return tuple("-".join(p) for p in permutations(tuple(experts)))


def parse_hl_order(order, experts: Sequence[str]) -> tuple[str, ...]:
    """``"pixel-patch-image"`` (or a sequence) -> ("pixel", "patch", "image"), validated.

    A model with two experts takes the three-level order with its missing level dropped
    (pixel-patch-image over image and patch -> patch-image), so one ``model.hl_order`` serves every pair.
    """
    experts = tuple(experts)
    if len(experts) not in (2, 3):
        raise SamoraError(
            f"fusion=hl_attn needs two or three experts, the model has {list(experts)}; "
            f"use fusion=single:<level>, sum, lac or mole otherwise"
        )
    s = order if isinstance(order, str) else "-".join(order)
    names = s.split("-")
    if len(experts) == 2 and len(names) == 3:
        names = [n for n in names if n in experts]
    valid = valid_hl_orders(experts)
    if "-".join(names) not in valid:
        raise SamoraError(f"invalid model.hl_order {s!r}; choose one of: {', '.join(valid)}")
    return tuple(names)


def build_fusion(
    name: str,
    experts: Sequence[str],
    dim: int,
    *,
    num_heads: int = 12,
    hl_order="pixel-patch-image",
    hl_width: int | None = None,
    hl_heads: int | None = None,
    hl_init: str = "paper",
    lac_weights: Sequence[float] | None = None,
) -> Fusion:
    """One fusion module for one block. ``num_heads`` is the encoder's, used when ``hl_heads`` is None;
    ``lac_weights`` (one per expert, summing to 1) only for ``lac``."""
    experts = tuple(experts)
    if not isinstance(name, str):
        raise SamoraError(f"model.fusion must be a string, one of {', '.join(FUSIONS)}; got {name!r}")
    if name.startswith("single:"):
        level = name.split(":", 1)[1]
        if level not in experts:
            raise SamoraError(f"model.fusion={name!r} names an expert the model lacks; experts are {list(experts)}")
        return SingleFusion(level)
    if name == "lorahub":
        raise SamoraError(
            "model.fusion=lorahub composes the experts into one LoRA in the fine-tuning stage, whose blocks "
            "then run single:hub; build that model with `samora finetune model.fusion=lorahub`"
        )
    if name in FUSION_BUILDERS:
        settings = FusionSettings(experts, dim, num_heads, hl_order, hl_width, hl_heads, hl_init, lac_weights)
        return FUSION_BUILDERS[name](settings)
    raise SamoraError(f"unknown model.fusion {name!r}; choose one of {', '.join(FUSIONS)}")


@dataclass(frozen=True)
class FusionSettings:
    """What `build_fusion` was given, for the builder of the named fusion to take its part."""

    experts: tuple[str, ...]
    dim: int
    num_heads: int
    hl_order: str
    hl_width: int | None
    hl_heads: int | None
    hl_init: str
    lac_weights: Sequence[float] | None


def _hl_attention(s: FusionSettings) -> Fusion:
    order = parse_hl_order(s.hl_order, s.experts)
    return HLAttention(order, s.dim, width=s.hl_width, heads=int(s.hl_heads or s.num_heads), init=s.hl_init)


# model.fusion -> its builder (single:<level> and lorahub are handled before the lookup)
FUSION_BUILDERS: dict[str, Callable[[FusionSettings], Fusion]] = {
    "hl_attn": _hl_attention,
    "sum": lambda s: SumFusion(s.experts),
    "lac": lambda s: LACFusion(s.experts, s.lac_weights),
    "mole": lambda s: MoLEFusion(s.experts, s.dim),
}

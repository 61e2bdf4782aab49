"""Per-block fusion of the LoRA experts' attention residuals (the "Fuse" slot of a SAMora block).

In every encoder block the experts produce residuals ``r_e = Attn_e(x) - Attn_base(x)`` (see
``encoder.py``); a fusion module maps the dict ``{expert name: r_e}`` (each [B, H, W, C] or [B, N, C])
to one update of the same shape, and the block computes ``x + base + Fuse(residuals)``.

Choices (``build_fusion(name, ...)``):

``hl_attn``   HL-Attn, the paper's hierarchical cross-attention (:class:`HLAttention`); with two
              experts (level ablation) its first unit only.
``sum``       plain sum of the residuals (all experts at full strength).
``lac``       learned weight per expert, initialised to 1/E (so it starts as the mean).
``mole``      per-token softmax gate over the experts computed by a linear layer from the concatenated
              residuals (MoLE); a gate-balance loss is exposed through :meth:`Fusion.aux_loss`.
              The gate layer is zero-initialised, so it also starts as the mean.
``single:L``  only expert L's residual: with one expert this is exactly SAMed's LoRA; the encoder
              runs it on a fast path that never computes the base attention separately.
"""

from __future__ import annotations

from itertools import permutations
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from samora_pl.errors import SamoraError

__all__ = [
    "FUSIONS",
    "HL_INITS",
    "Fusion",
    "SumFusion",
    "SingleFusion",
    "LACFusion",
    "MoLEFusion",
    "CrossAttentionUnit",
    "HLAttention",
    "valid_hl_orders",
    "parse_hl_order",
    "build_fusion",
]

FUSIONS = ("hl_attn", "sum", "lac", "mole", "single:<level>")
HL_INITS = ("residual_mean", "zero", "paper")


def _tokens(r: torch.Tensor) -> Tuple[torch.Tensor, torch.Size]:
    """[B, H, W, C] or [B, N, C] -> ([B, N, C], original shape)."""
    if r.dim() == 4:
        return r.reshape(r.shape[0], r.shape[1] * r.shape[2], r.shape[3]), r.shape
    if r.dim() == 3:
        return r, r.shape
    raise ValueError(f"expert residuals must be [B, H, W, C] or [B, N, C], got {list(r.shape)}")


class Fusion(nn.Module):
    """Base class: ``forward(residuals: dict[name, Tensor]) -> Tensor`` of the residuals' shape."""

    #: experts this fusion reads (in a fixed order)
    levels: Tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._aux: Optional[torch.Tensor] = None

    def aux_loss(self) -> Optional[torch.Tensor]:
        """Auxiliary loss of the last forward pass (None when the fusion has none)."""
        return self._aux

    def _get(self, residuals: Dict[str, torch.Tensor]):
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

    def forward(self, residuals: Dict[str, torch.Tensor]) -> torch.Tensor:
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

    def forward(self, residuals: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self._get(residuals)[0]

    def extra_repr(self) -> str:
        return f"level={self.level!r}"


class LACFusion(Fusion):
    """Learned weight per expert, ``sum_e w_e r_e`` with ``w_e`` initialised to 1/E."""

    def __init__(self, levels: Sequence[str]) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.weight = nn.Parameter(torch.full((len(self.levels),), 1.0 / len(self.levels)))

    def forward(self, residuals: Dict[str, torch.Tensor]) -> torch.Tensor:
        rs = torch.stack(self._get(residuals), 0)
        w = self.weight.view(-1, *([1] * (rs.dim() - 1)))
        return (w * rs).sum(0)


class MoLEFusion(Fusion):
    """MoLE: per-token softmax gate over the experts from a linear layer on the concatenated residuals.

    ``g = softmax(Linear([r_1, ..., r_E]) / temperature)`` per token; output ``sum_e g_e r_e``.
    The gate layer starts at zero (uniform gate = mean of the residuals). Gate-balance loss (MoLE):
    ``-sum_e log(E * mean_tokens(g_e))``, which is >= 0 and 0 exactly when the average gate is uniform.
    """

    def __init__(self, levels: Sequence[str], dim: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.temperature = float(temperature)
        self.gate = nn.Linear(dim * len(self.levels), len(self.levels))
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, residuals: Dict[str, torch.Tensor]) -> torch.Tensor:
        rs = self._get(residuals)
        g = torch.softmax(self.gate(torch.cat(rs, dim=-1)) / self.temperature, dim=-1)  # [..., E]
        mean_gate = g.reshape(-1, g.shape[-1]).mean(0)
        E = len(self.levels)
        self._aux = -(torch.log(mean_gate * E + 1e-12)).sum()
        out = g[..., 0:1] * rs[0]
        for e in range(1, E):
            out = out + g[..., e : e + 1] * rs[e]
        return out


class CrossAttentionUnit(nn.Module):
    """``CA(Q, KV) = Linear(MHA(LN_q(Q), LN_k(KV), LN_v(KV))) + Q`` over [B, N, W] tokens."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_k = nn.LayerNorm(width)
        self.norm_v = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.proj = nn.Linear(width, width)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        o, _ = self.attn(self.norm_q(q), self.norm_k(kv), self.norm_v(kv), need_weights=False)
        return self.proj(o) + q


class HLAttention(Fusion):
    """HL-Attn: hierarchical (low- then high-level) cross-attention fusion of three expert residuals.

    With ``order = (a, b, c)`` (default pixel -> patch -> image), over all tokens of the image::

        low  = r_b + g1 * (CA1(Q=r_b, KV=r_a) - r_b)
        high = r_c + g2 * (CA2(Q=r_c, KV=low) - r_c)
        h    = LN(high)                                  (width W; projected in/out when W < C)

    ``g1``, ``g2`` are learnable scalars initialised to 1. With two experts ``(a, b)`` (the level
    ablation's pairs) only the first unit exists and ``h = LN(low)``: the lower level still attends
    into the higher one, as in the full hierarchy. The output depends on ``init``:

    ``residual_mean`` (default)  ``mean_e(r_e) + gamma * h`` with ``gamma`` a learnable scalar at 0.
        At initialisation the block computes ``x + base + mean_e(r_e)``: the frozen encoder sees the
        average of its distilled experts, not a random LayerNorm output, and HL-Attn is learned as a
        correction on top (gamma receives gradient from step 0, the rest once gamma moves).
    ``zero``  ``gamma * h`` with ``gamma`` at 0: the block is exactly plain SAM at initialisation.
    ``paper`` ``h`` as written in the paper; the LayerNorm makes the update full-scale (unit variance
        per token) at step 0, which perturbs the frozen encoder before any training.
    """

    def __init__(
        self,
        order: Sequence[str],
        dim: int,
        *,
        width: Optional[int] = None,
        heads: int = 12,
        init: str = "residual_mean",
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

    def hierarchical(self, residuals: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``proj_out(LN(high))`` as [B, N, C] tokens (the paper's fused output)."""
        ra, rb, *rest = (self.proj_in(_tokens(r)[0]) for r in self._get(residuals))
        high = low = rb + self.g1 * (self.ca1(rb, ra) - rb)
        if rest:
            high = rest[0] + self.g2 * (self.ca2(rest[0], low) - rest[0])
        return self.proj_out(self.norm_out(high))

    def forward(self, residuals: Dict[str, torch.Tensor]) -> torch.Tensor:
        rs = self._get(residuals)
        shape = rs[0].shape
        h = self.hierarchical(residuals).reshape(shape)
        if self.init == "paper":
            return h
        out = self.gamma * h
        if self.init == "residual_mean":
            out = out + torch.stack(rs, 0).mean(0)
        return out

    def extra_repr(self) -> str:
        return f"order={'-'.join(self.order)}, width={self.width}, heads={self.heads}, init={self.init}"


def valid_hl_orders(experts: Sequence[str]) -> Tuple[str, ...]:
    return tuple("-".join(p) for p in permutations(tuple(experts)))


def parse_hl_order(order, experts: Sequence[str]) -> Tuple[str, ...]:
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
    hl_width: Optional[int] = None,
    hl_heads: Optional[int] = None,
    hl_init: str = "residual_mean",
) -> Fusion:
    """One fusion module for one block. ``num_heads`` is the encoder's, used when ``hl_heads`` is None."""
    experts = tuple(experts)
    if not isinstance(name, str):
        raise SamoraError(f"model.fusion must be a string, one of {list(FUSIONS)}; got {name!r}")
    if name.startswith("single:"):
        level = name.split(":", 1)[1]
        if level not in experts:
            raise SamoraError(f"model.fusion={name!r} names an expert the model lacks; experts are {list(experts)}")
        return SingleFusion(level)
    if name == "sum":
        return SumFusion(experts)
    if name == "lac":
        return LACFusion(experts)
    if name == "mole":
        return MoLEFusion(experts, dim)
    if name == "hl_attn":
        order = parse_hl_order(hl_order, experts)
        return HLAttention(order, dim, width=hl_width, heads=int(hl_heads or num_heads), init=hl_init)
    raise SamoraError(f"unknown model.fusion {name!r}; choose one of {list(FUSIONS)}")

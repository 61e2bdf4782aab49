"""Multi-expert LoRA on the q and v slices of each SAM block's fused ``qkv`` Linear.

Each expert (default names ``image``, ``patch``, ``pixel``; the SAMed baseline uses one named ``samed``)
holds, for every encoder block, four low-rank factors and one scale::

    dQ(x) = lora_scale * (x @ lora_A_q.T) @ lora_B_q.T        # [.., C]
    dV(x) = lora_scale * (x @ lora_A_v.T) @ lora_B_v.T

``lora_A_*`` is [r, C] and Kaiming-uniform initialised like ``nn.Linear`` / loralib (a = sqrt(5)),
``lora_B_*`` is [C, r] and zero (in SAM 2's Hiera q-pool blocks ``qkv`` widens: A is [r, C_in], B
[C_out, r], so the whole of q and v is adapted), scaling is 1 (no alpha / r), and ``lora_scale`` is a
learnable scalar initialised to 1 (trained with the expert in stage-1 distillation, frozen in stage 2). k is never
touched. One expert on its own is exactly SAMed's LoRA. Given a `seed`, each expert's A is drawn from its
own generator seeded by (seed, name): the three experts start from different A, and the expert of one
name starts alike whichever model (one expert in distillation, three in stage 2) builds it.

Conventions follow loralib: every LoRA tensor name contains ``lora_`` so that ``loralib.lora_state_dict``
and ``mark_only_lora_as_trainable``-style selection work; weights are never merged into ``qkv`` (the
merge-on-eval of loralib layers is deliberately not used: Lightning toggles train/eval and a merged
weight would keep training).

Experts are saved one per ``.safetensors`` file (tensor names ``blocks.<i>.lora_*``) with metadata
(format, level, rank, depth, width, img_size, samora_pl version), written atomically.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import cast

import loralib
import torch
import torch.nn.functional as F
from torch import nn

from samora_pl.errors import SamoraError
from samora_pl.records.atomic import atomic_save

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXPERTS",
    "LoRAQV",
    "block_widths",
    "LoRAExpert",
    "MultiExpertLoRA",
    "save_expert",
    "load_expert",
    "read_expert_metadata",
    "lora_ab_parameter_count",
    "compose_experts",
]

DEFAULT_EXPERTS: tuple[str, ...] = ("image", "patch", "pixel")
FORMAT = "samora_pl.lora_expert.v1"


def _version() -> str:
    try:
        from samora_pl import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def expert_seed(seed: int, name: str) -> int:
    """The seed of expert `name`'s initial A under the run seed `seed` (stable across processes)."""
    return zlib.crc32(f"{int(seed)}/{name}".encode())


def check_expert_names(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise SamoraError("finetune.levels must name at least one LoRA expert, e.g. [image, patch, pixel]")
    for n in names:
        if not isinstance(n, str) or not n.isidentifier():
            raise SamoraError(
                f"invalid expert name {n!r} in finetune.levels: use plain identifiers like image, patch, pixel"
            )
    if len(set(names)) != len(names):
        raise SamoraError(f"finetune.levels has duplicates: {list(names)}")
    return names


class LoRAQV(nn.Module):
    """One expert's low-rank q/v update for one block (plus its learnable scale)."""

    def __init__(self, dim: int, rank: int, out_dim: int | None = None) -> None:
        super().__init__()
        if int(rank) < 1:
            raise SamoraError(f"LoRA rank must be >= 1, got {rank} (model.lora_rank)")
        self.dim, self.rank = int(dim), int(rank)
        self.out_dim = self.dim if out_dim is None else int(out_dim)  # Hiera's q-pool blocks widen qkv
        self.lora_A_q = nn.Parameter(torch.empty(rank, dim))
        self.lora_B_q = nn.Parameter(torch.zeros(self.out_dim, rank))
        self.lora_A_v = nn.Parameter(torch.empty(rank, dim))
        self.lora_B_v = nn.Parameter(torch.zeros(self.out_dim, rank))
        self.lora_scale = nn.Parameter(torch.ones(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A as nn.Linear(dim, rank).weight / loralib (kaiming_uniform_, a=sqrt(5)); B zero; scale 1
        nn.init.kaiming_uniform_(self.lora_A_q, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_A_v, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B_q)
        nn.init.zeros_(self.lora_B_v)
        with torch.no_grad():
            self.lora_scale.fill_(1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (dQ, dV), each [..., out_dim] for ``x`` [..., dim]."""
        dq = (x @ self.lora_A_q.t()) @ self.lora_B_q.t()
        dv = (x @ self.lora_A_v.t()) @ self.lora_B_v.t()
        return dq * self.lora_scale, dv * self.lora_scale

    def qkv_delta(self, x: torch.Tensor) -> torch.Tensor:
        """[dQ, 0, dV] concatenated on the last axis, to add to ``qkv(x)`` ([..., 3C])."""
        dq, dv = self(x)
        return torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, out_dim={self.out_dim}, rank={self.rank}"


def block_widths(depth: int, dim: int, widths: Sequence[tuple[int, int]] | None = None) -> tuple[tuple[int, int], ...]:
    """(qkv input width, q/v width) per block: ``(dim, dim)`` everywhere for SAM's ViT; Hiera passes its own."""
    if widths is None:
        return tuple((int(dim), int(dim)) for _ in range(int(depth)))
    widths = tuple((int(a), int(b)) for a, b in widths)
    if len(widths) != int(depth):
        raise ValueError(f"need one (in, out) width per block ({depth}), got {len(widths)}")
    return widths


class LoRAExpert(nn.Module):
    """One expert: a :class:`LoRAQV` per encoder block (``widths``: per-block (in, out), see block_widths)."""

    def __init__(self, depth: int, dim: int, rank: int = 4, widths: Sequence[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.depth, self.dim, self.rank = int(depth), int(dim), int(rank)
        self.blocks = nn.ModuleList(LoRAQV(a, rank, b) for a, b in block_widths(depth, dim, widths))

    def block(self, i: int) -> LoRAQV:
        """Block ``i``'s :class:`LoRAQV` (``self.blocks[i]``, typed)."""
        return cast(LoRAQV, self.blocks[i])  # self.blocks holds only LoRAQV

    def qv_blocks(self) -> Iterator[LoRAQV]:
        """Every block's :class:`LoRAQV`, in order (``iter(self.blocks)``, typed)."""
        return (cast(LoRAQV, b) for b in self.blocks)  # self.blocks holds only LoRAQV

    def ab_parameters(self):
        """The A/B factors only (no scales)."""
        for n, p in self.named_parameters():
            if ".lora_A_" in n or ".lora_B_" in n:
                yield p


class MultiExpertLoRA(nn.Module):
    """Several named :class:`LoRAExpert` s over the same encoder; their attention streams are
    computed in batch (:meth:`streams`). ``widths`` gives per-block (in, out) widths for encoders whose
    width changes between blocks (SAM 2's Hiera); ``dim`` is then the first block's input width."""

    def __init__(
        self,
        names: Sequence[str] = DEFAULT_EXPERTS,
        *,
        depth: int,
        dim: int,
        rank: int = 4,
        seed: int | None = None,
        widths: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.names = check_expert_names(names)
        self.depth, self.dim, self.rank = int(depth), int(dim), int(rank)
        self.widths = block_widths(depth, dim, widths)
        self.experts = nn.ModuleDict({n: self._new_expert(n, seed) for n in self.names})

    def _new_expert(self, name: str, seed: int | None) -> LoRAExpert:
        if seed is None:
            return LoRAExpert(self.depth, self.dim, self.rank, self.widths)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(expert_seed(seed, name))
            return LoRAExpert(self.depth, self.dim, self.rank, self.widths)

    def __getitem__(self, name: str) -> LoRAExpert:
        if name not in self.experts:
            raise SamoraError(f"no LoRA expert named {name!r}; the model has {list(self.names)}")
        return self._expert(name)

    def _expert(self, name: str) -> LoRAExpert:
        return cast(LoRAExpert, self.experts[name])  # self.experts holds only LoRAExpert

    def streams(
        self,
        block: int,
        x: torch.Tensor,
        q: torch.Tensor,
        v: torch.Tensor,
        names: Sequence[str] | None = None,
        *,
        with_base: bool = False,
        mix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries and values of every attention stream at one block.

        ``x`` [..., Cin] is the block's normed input and ``q``, ``v`` [..., C] the frozen ``qkv``'s slices
        (Cin = C except in Hiera's q-pool blocks). Returns two [S, ..., C] tensors: ``q + dQ_e(x)`` and
        ``v + dV_e(x)`` for each expert (default: all, in ``self.names`` order), preceded by the plain
        ``q`` and ``v`` when ``with_base``. All experts' A factors run in one matmul; each stream's B
        factor and the add of the shared ``q``/``v`` run in one ``baddbmm``, so no per-expert delta,
        concatenation or selection is materialised (those memory passes cost as much as the LoRA
        arithmetic at 512 px).

        With ``mix`` (one weight per named expert) there is one stream, ``q + sum_e mix_e dQ_e(x)`` (and
        the same for v): the experts merged as one rank ``E*r`` update (LAC); ``with_base`` is ignored.
        """
        names = self.names if names is None else tuple(names)
        mods = [self._expert(n).block(block) for n in names]
        E, r, C = len(mods), self.rank, q.shape[-1]
        lead = x.shape[:-1]
        a = torch.cat([torch.cat([m.lora_A_q, m.lora_A_v], 0) for m in mods], 0)  # [E*2r, Cin]
        z = (x.reshape(-1, x.shape[-1]) @ a.t()).reshape(-1, E, 2, r)  # [M, E, 2, r]
        z = z * torch.stack([m.lora_scale for m in mods]).to(z.dtype)[:, None, None]
        if mix is not None:  # [M, E, 2, r] -> [2, M, E*r] against B [2, C, E*r]: one merged stream
            z = (z * mix.to(z.dtype)[:, None, None]).permute(2, 0, 1, 3).reshape(2, -1, E * r).to(q.dtype)
            bq = torch.cat([m.lora_B_q for m in mods], 1).to(q.dtype)
            bv = torch.cat([m.lora_B_v for m in mods], 1).to(q.dtype)
            q_all = torch.addmm(q.reshape(-1, C), z[0], bq.t())
            v_all = torch.addmm(v.reshape(-1, C), z[1], bv.t())
            return q_all.reshape(1, *lead, C), v_all.reshape(1, *lead, C)
        z = z.permute(2, 1, 0, 3)  # [2, E, M, r]
        b = torch.stack([torch.stack([m.lora_B_q for m in mods]), torch.stack([m.lora_B_v for m in mods])])
        if with_base:  # a zero low-rank factor makes the base stream q + 0 in the same call
            z, b = F.pad(z, (0, 0, 0, 0, 1, 0)), F.pad(b, (0, 0, 0, 0, 1, 0))
        z, b = z.to(q.dtype), b.to(q.dtype)
        q_all = torch.baddbmm(q.reshape(1, -1, C), z[0], b[0].transpose(1, 2))
        v_all = torch.baddbmm(v.reshape(1, -1, C), z[1], b[1].transpose(1, 2))
        return q_all.reshape(-1, *lead, C), v_all.reshape(-1, *lead, C)

    # -- state ---------------------------------------------------------------------------------------
    def expert_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """``blocks.<i>.lora_*`` tensors of one expert (A, B and scales)."""
        return {k: v.detach().clone().contiguous() for k, v in loralib.lora_state_dict(self[name]).items()}


@torch.no_grad()
def compose_experts(lora: MultiExpertLoRA, weights: dict[str, float], into: str) -> None:
    """LoRAHub-style composition written into expert slot ``into``:
    ``A = sum_e w_e A_e`` and ``B = sum_e w_e s_e B_e`` per block (each source scale folded into its B),
    target scale 1. The gradient-free search for ``weights`` belongs to the caller (a stage)."""
    unknown = [n for n in weights if n not in lora.names]
    if unknown:
        raise SamoraError(f"cannot compose unknown experts {unknown}; the model has {list(lora.names)}")
    target = lora[into]
    srcs = {
        n: [
            (b.lora_A_q.clone(), b.lora_B_q * b.lora_scale, b.lora_A_v.clone(), b.lora_B_v * b.lora_scale)
            for b in lora[n].qv_blocks()
        ]
        for n in weights
    }
    for i, blk in enumerate(target.qv_blocks()):
        for j, t in enumerate((blk.lora_A_q, blk.lora_B_q, blk.lora_A_v, blk.lora_B_v)):
            # torch's stubs want a Tensor, but copy_ takes a number too: no weights give the sum 0, a zero expert
            t.copy_(sum(float(w) * srcs[n][i][j] for n, w in weights.items()))  # type: ignore[arg-type]
        blk.lora_scale.fill_(1.0)


def lora_ab_parameter_count(module: nn.Module) -> int:
    """Number of LoRA A/B weights in ``module`` (scales excluded)."""
    return sum(p.numel() for n, p in module.named_parameters() if "lora_A" in n or "lora_B" in n)


# ----------------------------------------------------------------------------------------------------
# safetensors files
# ----------------------------------------------------------------------------------------------------


def save_expert(lora: MultiExpertLoRA, name: str, path, *, img_size: int | None = None, extra_metadata=None) -> str:
    """Write expert ``name`` to ``path`` (.safetensors) atomically; returns the path."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors = lora.expert_state_dict(name)
    meta = {
        "format": FORMAT,
        "level": name,
        "rank": str(lora.rank),
        "depth": str(lora.depth),
        "width": str(lora.dim),
        "img_size": "" if img_size is None else str(int(img_size)),
        "samora_pl_version": _version(),
    }
    for k, v in (extra_metadata or {}).items():
        meta[str(k)] = str(v)
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def _open(path):
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SamoraError(
            f"LoRA expert file not found: {path}; run the distillation stage for this level "
            f"(make distill LEVEL=...) or point the config at an existing expert.safetensors"
        )
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as exc:
        raise SamoraError(f"cannot read LoRA expert file {path}: {exc}; re-run the distillation stage") from exc


def read_expert_metadata(path) -> dict[str, str]:
    """The metadata dict stored in an expert file."""
    with _open(path) as f:
        return dict(f.metadata() or {})


def load_expert(
    lora: MultiExpertLoRA,
    name: str,
    path,
    *,
    source_level: str | None = None,
    img_size: int | None = None,
) -> dict[str, str]:
    """Load an expert file into expert ``name`` of ``lora``; returns the file's metadata.

    The file's level must equal ``name`` unless ``source_level`` names the file's level explicitly
    (e.g. ``load_expert(lora, "patch", "samed.safetensors", source_level="samed")``). Rank, depth and
    width must match the model; otherwise a SamoraError names both shapes.
    """
    path = os.fspath(path)
    target = lora[name]
    with _open(path) as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    level = meta.get("level")
    if meta.get("format") != FORMAT or level is None:
        raise SamoraError(
            f"{path} is not a samora_pl LoRA expert file (metadata format={meta.get('format')!r}); "
            f"expert files are written by the distillation stage"
        )
    if level != name:
        if source_level is None:
            raise SamoraError(
                f"{path} holds the {level!r} expert but it is being loaded as {name!r}; pass "
                f"source_level={level!r} to load it into the {name!r} slot on purpose"
            )
        if source_level != level:
            raise SamoraError(f"{path} holds the {level!r} expert, not {source_level!r} as requested")
    own = target.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise SamoraError(
            f"{path}: tensor {unexpected[0]!r} (shape {list(tensors[unexpected[0]].shape)}) has no place in a "
            f"depth-{lora.depth} model (file depth {meta.get('depth')}, model {lora.depth}); "
            f"use an expert distilled for the same SAM variant"
        )
    for k in sorted(own):
        if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape):
            raise SamoraError(
                f"{path}: tensor {k!r} has shape {list(tensors[k].shape)} in the file but the model expects "
                f"{list(own[k].shape)} (file rank {meta.get('rank')}, width {meta.get('width')}; model rank "
                f"{lora.rank}, width {lora.dim}); set model.lora_rank / model.variant to match the expert"
            )
    if missing:
        raise SamoraError(
            f"{path}: missing tensor {missing[0]!r} (shape {list(own[missing[0]].shape)}); the file holds "
            f"{len(tensors)} tensors, the model expects {len(own)} (file depth {meta.get('depth')}, model "
            f"{lora.depth}); use an expert distilled for the same SAM variant"
        )
    if img_size is not None and meta.get("img_size") not in (None, "", str(int(img_size))):
        log.info("expert %s was distilled at img_size %s, model runs at %s", path, meta.get("img_size"), img_size)
    with torch.no_grad():
        target.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=True)
    log.info("loaded LoRA expert %r from %s (level %s, rank %s)", name, path, level, meta.get("rank"))
    return meta

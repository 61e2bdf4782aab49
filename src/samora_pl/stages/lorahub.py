"""`model.fusion=lorahub`: the three experts composed into ONE LoRA by a gradient-free search (LoRAHub).

LoRAHub (Huang et al., 2023) composes LoRA modules element-wise, ``A = sum_e w_e A_e`` and
``B = sum_e w_e B_e`` (here each expert's learnt scale is folded into its B, see
``lora.compose_experts``), and finds ``w`` without gradients by minimising a few-shot loss plus an L1
penalty ``l1 * sum_e |w_e|``. Here the few-shot set is a seeded ``finetune.lorahub.holdout`` share of the
selected labelled slices (at most ``max_slices``), the loss is the fine-tuning segmentation loss
(CE + Dice) of the model's current (not yet fine-tuned) mask decoder, and the search is a seeded
(1 + lambda) evolution strategy: the uniform mixture ``w_e = 1/E`` first, then generations of
``offspring`` Gaussian mutations (std ``sigma``, clipped to ``[-bound, bound]``) of the best candidate
so far, ``candidates`` evaluations in all. A candidate replaces the best only if its penalised score is
strictly lower, so among equal losses the smaller-L1 weights win. Stage 2 then fine-tunes the mask decoder
only, with the composed LoRA frozen; the held-out slices are removed from that training set unless that
would leave it empty. The chosen weights and every evaluated candidate are written to ``lorahub.json``.

Caveat (recorded, not hidden): with a randomly initialised or untuned decoder the search's loss is a
weak signal; LoRAHub assumes a base model that already performs the task.
"""

import json
import logging
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from data_modules.base import SliceDataset
from data_modules.transforms import SegmentationTransform
from samora_pl.config import finetune_levels
from samora_pl.errors import SamoraError
from samora_pl.losses.segmentation import SegmentationLoss
from samora_pl.models.lora import MultiExpertLoRA, compose_experts, load_expert, read_expert_metadata
from samora_pl.runs import atomic_write_text, is_rank_zero, verify_input

log = logging.getLogger(__name__)

HUB = "hub"  # the one LoRA slot of a lorahub model


def search_weights(
    score: Callable[[Dict[str, float]], float],
    names: Sequence[str],
    *,
    candidates: int = 30,
    offspring: int = 5,
    sigma: float = 0.3,
    l1: float = 0.05,
    bound: float = 1.5,
    seed: int = 0,
):
    """Seeded (1 + lambda) search of weights minimising ``score(w) + l1 * sum|w|``; no gradients.

    Returns (best weights {name: float}, history [{"weights", "loss", "score"}] in evaluation order).
    """
    if int(candidates) < 1:
        raise SamoraError(f"finetune.lorahub.candidates must be >= 1, got {candidates}")
    rng = np.random.default_rng(seed)
    names = tuple(names)
    history = []

    def evaluate(vector: np.ndarray) -> float:
        weights = {n: float(v) for n, v in zip(names, vector)}
        loss = float(score(weights))
        total = loss + float(l1) * float(np.abs(vector).sum())
        history.append({"weights": weights, "loss": loss, "score": total})
        return total if np.isfinite(total) else float("inf")

    best = np.full(len(names), 1.0 / len(names))
    best_score = evaluate(best)
    while len(history) < int(candidates):
        parent = best
        for _ in range(min(int(offspring), int(candidates) - len(history))):
            child = np.clip(parent + rng.normal(0.0, float(sigma), size=len(names)), -bound, bound)
            child_score = evaluate(child)
            if child_score < best_score:
                best, best_score = child, child_score
    return {n: float(v) for n, v in zip(names, best)}, history


def holdout_names(selected: Sequence[str], share: float, max_slices: int, seed: int) -> list:
    """A seeded share (at least one slice, at most ``max_slices``) of the selected training slices."""
    if not 0.0 < float(share) <= 1.0:
        raise SamoraError(f"finetune.lorahub.holdout must be in (0, 1], got {share}")
    selected = list(selected)
    n = min(len(selected), max(1, int(max_slices)), max(1, int(round(float(share) * len(selected)))))
    picked = np.random.default_rng(seed).choice(len(selected), size=n, replace=False)
    return [selected[i] for i in sorted(picked.tolist())]


def compose_into(cfg: DictConfig, model, data, folder: Path, expert_paths: dict, record=None) -> dict:
    """Load the experts, search the weights, write the composed LoRA into ``model.lora['hub']``.

    Leaves the model with its mask decoder trainable only; returns {"weights", "loss", "holdout"}.
    """
    from samora_pl.models.factory import base_fingerprint

    hub_cfg = cfg.finetune.lorahub
    levels = finetune_levels(cfg)
    src = MultiExpertLoRA(levels + (HUB,), depth=model.lora.depth, dim=model.lora.dim, rank=model.lora.rank)
    if not cfg.finetune.zero_experts:
        fingerprint = base_fingerprint(model)
        for level, path in expert_paths.items():
            if read_expert_metadata(path).get("base_fingerprint") not in (None, fingerprint):
                raise SamoraError(
                    f"Expert {path} was distilled on another SAM encoder (model.checkpoint or model.init_seed "
                    "differ from this run); re-run `make distill` with this run's model settings."
                )
            load_expert(src, level, path, img_size=model.img_size)
            if record is not None:
                record.add_input(f"expert_{level}", verify_input(path, Path(path).parent))

    data.setup("fit")
    held = holdout_names(data.selected_train_names(), hub_cfg.holdout, hub_cfg.max_slices, cfg.seed)
    transform = SegmentationTransform(cfg.model.img_size, getattr(data, "low_res_factor", 4), augment=False)
    dataset = SliceDataset(held, data.slice_reader(), transform)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([it["image"] for it in items])
    targets = torch.stack([it["low_res_label"] for it in items]).long()
    loss_fn = SegmentationLoss(cfg.loss.ce_weight, cfg.loss.dice_weight)
    model.set_trainable("none")
    was_training = model.training
    model.eval()
    batch = max(1, int(cfg.data.batch_size))

    @torch.no_grad()
    def score(weights: Dict[str, float]) -> float:
        compose_experts(src, weights, into=HUB)
        model.lora[HUB].load_state_dict(src[HUB].state_dict())
        total = 0.0
        for start in range(0, len(images), batch):
            logits = model(images[start : start + batch])
            total += float(loss_fn(logits.float(), targets[start : start + batch])) * len(logits)
        return total / len(images)

    with torch.no_grad():  # gradient-free: no autograd graph anywhere in the search
        weights, history = search_weights(
            score,
            levels,
            candidates=hub_cfg.candidates,
            offspring=hub_cfg.offspring,
            sigma=hub_cfg.sigma,
            l1=hub_cfg.l1,
            bound=hub_cfg.bound,
            seed=cfg.seed,
        )
        compose_experts(src, weights, into=HUB)
        model.lora[HUB].load_state_dict(src[HUB].state_dict())
    model.train(was_training)
    model.set_trainable("samora")  # fusion (none for a single LoRA) + mask decoder; the composed LoRA frozen
    best = min(history, key=lambda h: h["score"])
    log.info(
        "lorahub: weights %s (loss %.4f, %d candidates, %d held-out slices)",
        weights,
        best["loss"],
        len(history),
        len(held),
    )

    train_names = [nm for nm in data.train_set.names if nm not in set(held)]
    if train_names:
        data.train_set.names = train_names
    summary = {
        "weights": weights,
        "loss": best["loss"],
        "score": best["score"],
        "holdout": held,
        "decoder_train_slices": len(data.train_set.names),
        "history": history,
    }
    if is_rank_zero():
        atomic_write_text(folder / "lorahub.json", json.dumps(summary, indent=2) + "\n")
    return summary

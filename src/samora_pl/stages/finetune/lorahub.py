"""`model.fusion=lorahub`: the experts composed into ONE LoRA by LoRAHub's gradient-free search.

LoRAHub (Huang et al., arXiv 2307.13269, code sail-sg/lorahub) composes LoRA modules element-wise,
``A = sum_e w_e A_e`` and ``B = sum_e w_e B_e`` (so ``dW = sum_{e,f} w_e w_f B_e A_f``: bilinear in w, with
cross terms, rank r; here each expert's learnt scale is folded into its B, see ``lora.compose_experts``),
one scalar per expert shared by all blocks. It finds ``w`` with nevergrad's ``NGOpt`` (budget 40, each
weight in [-1.5, 1.5]) minimising a few-shot loss plus ``0.05 * mean_e |w_e|``, as the authors' code does.

A segmentation decoder must be trained, and a random decoder makes every candidate's loss meaningless, so
the decoder budget of stage 2 (``trainer.max_epochs``, one optimiser and schedule) is split:

1. warm-up: the decoder trains on the fixed uniform composition ``w_e = 1/E`` for the first
   ``finetune.lorahub.warmup`` share of the training steps;
2. search: at that step the training pauses; NGOpt scores each candidate ``w`` by the segmentation loss
   of the fine-tuning (CE + Dice) of the warmed decoder, in eval mode and without gradients, on a fixed
   few-shot set, plus the L1 term; the recommended ``w`` is composed into the LoRA;
3. the decoder trains on the result for the remaining steps.

The few-shot set is a seeded ``finetune.lorahub.holdout`` share (at most ``max_slices``) of the selected
LABELLED TRAINING slices, never test data, read without augmentation. It stays in the decoder's training
set: the decoder trains on every selected slice for the same number of steps as every other fusion, so
LoRAHub is not compared on fewer labels (as in LoRAHub, its few-shot examples are labelled data it adapts
to, not a validation set). Deviations from the published code, recorded here and in
``docs/baselines.md``: the search starts from the warm-up composition (``start: uniform``; ``start: zero``
is LoRAHub's own start, no LoRA at all, an input the warmed decoder never saw), and the per-example mean
loss is used (the code sums per-batch means and divides by the number of examples). The chosen weights,
the optimiser's settings and every evaluated candidate are written to ``lorahub.json``.
"""

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch

from data_modules.labelled.base import SliceDataset
from samora_pl.config.plans import LORAHUB_SLOT, FinetunePlan
from samora_pl.errors import SamoraError
from samora_pl.losses.segmentation import SegmentationLoss
from samora_pl.models.adapters.lora import MultiExpertLoRA, compose_experts, load_expert, read_expert_metadata
from samora_pl.records.atomic import atomic_write_text
from samora_pl.records.manifest import is_rank_zero, verify_input

log = logging.getLogger(__name__)

HUB = LORAHUB_SLOT  # the one LoRA slot of a lorahub model
OPTIMIZER = "nevergrad.optimizers.NGOpt"


def search_weights(
    score: Callable[[dict[str, float]], float],
    names: Sequence[str],
    *,
    budget: int = 40,
    bound: float = 1.5,
    l1: float = 0.05,
    start: Sequence[float] = None,
    seed: int = 0,
):
    """LoRAHub's search: NGOpt minimising ``score(w) + l1 * mean_e |w_e|`` over ``w`` in [-bound, bound]^E.

    ``start`` defaults to 0 (LoRAHub's). Returns (recommended weights {name: float}, history
    [{"weights", "loss", "score"}] in evaluation order).
    """
    import nevergrad as ng

    if int(budget) < 1:
        raise SamoraError(f"finetune.lorahub.budget must be >= 1, got {budget}")
    names = tuple(names)
    init = np.zeros(len(names)) if start is None else np.asarray(start, dtype=float)
    param = ng.p.Array(init=init, lower=-float(bound), upper=float(bound))
    param.random_state = np.random.RandomState(int(seed))
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=int(budget))
    history = []

    def objective(vector: np.ndarray) -> float:
        weights = {n: float(v) for n, v in zip(names, vector)}
        loss = float(score(weights))
        total = loss + float(l1) * float(np.abs(vector).mean())
        history.append({"weights": weights, "loss": loss, "score": total})
        return total if np.isfinite(total) else float("inf")

    with warnings.catch_warnings():  # NGOpt's inner solvers warn about their own defaults
        warnings.simplefilter("ignore", UserWarning)
        recommendation = optimizer.minimize(objective)
    return {n: float(v) for n, v in zip(names, recommendation.value)}, history


def holdout_names(selected: Sequence[str], share: float, max_slices: int, seed: int) -> list:
    """A seeded share (at least one slice, at most ``max_slices``) of the selected training slices."""
    if not 0.0 < float(share) <= 1.0:
        raise SamoraError(f"finetune.lorahub.holdout must be in (0, 1], got {share}")
    selected = list(selected)
    n = min(len(selected), max(1, int(max_slices)), max(1, int(round(float(share) * len(selected)))))
    picked = np.random.default_rng(seed).choice(len(selected), size=n, replace=False)
    return [selected[i] for i in sorted(picked.tolist())]


class LoraHubSearch(L.Callback):
    """Runs the weight search once, when training reaches the warm-up's last step, and composes the result
    into the model's hub LoRA; its state (done, weights) travels in checkpoints, so a resumed run does not
    search again (the composed LoRA is in the model's own state)."""

    def __init__(self, model, src: MultiExpertLoRA, images, targets, loss_fn, settings: dict, folder: Path):
        self.model, self.src, self.images, self.targets, self.loss_fn = model, src, images, targets, loss_fn
        self.settings, self.folder = settings, Path(folder)
        self.levels = tuple(n for n in src.names if n != HUB)
        self.done = False
        self.weights = None
        self.at_step = 0

    def state_dict(self) -> dict:
        return {"done": self.done, "weights": self.weights}

    def load_state_dict(self, state_dict: dict) -> None:
        self.done, self.weights = bool(state_dict["done"]), state_dict["weights"]

    def on_train_start(self, trainer, pl_module) -> None:
        self.at_step = int(round(float(self.settings["warmup"]) * trainer.estimated_stepping_batches))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.done and trainer.global_step >= self.at_step:
            self.search(trainer, pl_module.device)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.done:  # training stopped before the warm-up ended (e.g. limit_train_batches)
            log.warning("lorahub: training ended before step %d; searching with the decoder as it is", self.at_step)
            self.search(trainer, pl_module.device)

    def _compose(self, weights: dict[str, float]) -> None:
        compose_experts(self.src, weights, into=HUB)
        self.model.lora[HUB].load_state_dict(self.src[HUB].state_dict())

    def search(self, trainer, device) -> None:
        model, batch = self.model, int(self.settings["batch_size"])
        dtype = model.lora[HUB].blocks[0].lora_A_q.dtype  # bf16-true runs hold a bf16 model
        was_training = model.training
        model.eval()

        def score(weights: dict[str, float]) -> float:
            self._compose(weights)
            total = 0.0
            for start in range(0, len(self.images), batch):
                logits = model(self.images[start : start + batch].to(device, dtype)).float()
                target = self.targets[start : start + batch].to(device)
                if logits.shape[-2:] != target.shape[-2:]:  # H-SAM's decoder predicts at full size
                    logits = torch.nn.functional.interpolate(logits, size=target.shape[-2:], mode="bilinear")
                total += float(self.loss_fn(logits, target)) * len(logits)
            return total / len(self.images)

        start = [0.0 if self.settings["start"] == "zero" else 1.0 / len(self.levels)] * len(self.levels)
        with torch.no_grad():  # gradient-free: no autograd graph anywhere in the search
            weights, history = search_weights(
                score,
                self.levels,
                budget=self.settings["budget"],
                bound=self.settings["bound"],
                l1=self.settings["l1"],
                start=start,
                seed=self.settings["seed"],
            )
            weights = trainer.strategy.broadcast(weights, src=0)  # every rank composes rank zero's choice
            self._compose(weights)
        model.train(was_training)
        self.done, self.weights = True, weights
        log.info("lorahub: weights %s after %d candidates at step %d", weights, len(history), trainer.global_step)
        if is_rank_zero():
            summary = {
                "weights": weights,
                "optimizer": OPTIMIZER,
                **{k: self.settings[k] for k in ("budget", "bound", "l1", "start", "seed", "warmup")},
                "search_step": int(trainer.global_step),
                "total_steps": int(trainer.estimated_stepping_batches),
                "search_slices": self.settings["holdout_names"],
                "decoder_train_slices": self.settings["decoder_train_slices"],
                "history": history,
            }
            atomic_write_text(self.folder / "lorahub.json", json.dumps(summary, indent=2) + "\n")


def prepare(plan: FinetunePlan, model, data, expert_paths: dict, record=None) -> LoraHubSearch:
    """Load the experts, compose the uniform warm-up LoRA into ``model.lora['hub']``, read the few-shot
    slices that score the search (they stay in the decoder's training set), and return the callback that
    searches the weights mid-training.

    Leaves the model with its mask decoder trainable only (the composed LoRA stays frozen)."""
    from samora_pl.models.factory import base_fingerprint

    hub = plan.lorahub
    levels = plan.levels
    src = MultiExpertLoRA(
        levels + (HUB,), depth=model.lora.depth, dim=model.lora.dim, rank=model.lora.rank, widths=model.lora.widths
    )
    if not plan.zero_experts:
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
    with torch.no_grad():
        compose_experts(src, {n: 1.0 / len(levels) for n in levels}, into=HUB)
        model.lora[HUB].load_state_dict(src[HUB].state_dict())

    data.setup("fit")
    held = holdout_names(data.selected_train_names(), hub.holdout, hub.max_slices, plan.seed)
    transform = data.transform(augment=False)  # sized as the training slices (data.train_size too)
    dataset = SliceDataset(held, data.slice_reader(), transform)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([it["image"] for it in items])
    targets = torch.stack([it["low_res_label"] for it in items]).long()
    model.set_trainable("samora")  # fusion (none for a single LoRA) + mask decoder; the composed LoRA frozen
    settings = {
        **{k: getattr(hub, k) for k in ("budget", "bound", "l1", "start", "warmup")},
        "seed": int(plan.seed),
        "batch_size": max(1, int(plan.data_settings.batch_size)),
        "holdout_names": held,
        "decoder_train_slices": len(data.train_set),
    }
    loss_fn = SegmentationLoss(plan.loss.ce_weight, plan.loss.dice_weight)
    log.info("lorahub: %d of the decoder's %d training slices score the search", len(held), len(data.train_set))
    return LoraHubSearch(model, src, images, targets, loss_fn, settings, plan.folder)

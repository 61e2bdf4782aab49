"""The whole fine-tuned model as one TorchScript file: slices at the model size in, label maps out.

`torch.jit.trace` records the segmenter (SAM's encoder with its LoRA experts and their fusion, the prompt-free
decoder, H-SAM's second stage) at its one input size, so experts and fusion are baked into the graph; a small
scripted wrapper, `SliceLabeller`, batches the slices and does what `predict_volume` does after the model:
bilinear upsampling of the logits to the model size (align_corners=False), softmax, argmax, uint8.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samora_pl.errors import SamoraError

TRACE_BATCH = 2  # traced with two slices, so no size-1 batch dimension is folded into the graph


class SliceLabeller(nn.Module):
    """[N, 1, S, S] float32 slices in [0, 1] -> [N, S, S] uint8 labels (0 = background), `batch_size` at a time."""

    def __init__(self, network: nn.Module, img_size: int, batch_size: int):
        super().__init__()
        self.network = network
        self.img_size = int(img_size)
        self.batch_size = int(batch_size)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        labels = []
        for start in range(0, slices.shape[0], self.batch_size):
            logits = self.network(slices[start : start + self.batch_size]).float()
            if logits.shape[-2] != self.img_size or logits.shape[-1] != self.img_size:
                size = [self.img_size, self.img_size]
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            labels.append(torch.argmax(torch.softmax(logits, dim=1), dim=1).to(torch.uint8))
        if not labels:
            return torch.zeros((0, self.img_size, self.img_size), dtype=torch.uint8, device=slices.device)
        return torch.cat(labels)


@torch.no_grad()
def script_model(model: nn.Module, img_size: int, batch_size: int) -> torch.jit.ScriptModule:
    """The eval-mode `model` (images [B, 1, S, S] -> logits) traced at S and wrapped in a scripted SliceLabeller.

    A model TorchScript cannot record is one SamoraError that says why (the bundle then cannot be written)."""
    model = model.eval()
    example = torch.rand(TRACE_BATCH, 1, img_size, img_size, generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings: the shape checks are constant at the one size
            traced = torch.jit.trace(model, example, check_trace=False)
            scripted = torch.jit.script(SliceLabeller(traced, img_size, batch_size))
    except Exception as err:  # torch.jit raises many types (RuntimeError, NotSupportedError, TypeError)
        detail = " ".join(str(err).split())[:300]
        raise SamoraError(f"TorchScript cannot record this model ({type(err).__name__}: {detail})") from err
    expected = model(example).float()
    got = traced(example).float()
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise SamoraError("the traced model does not reproduce the model's logits; it cannot be exported")
    return scripted


def save_scripted(module: torch.jit.ScriptModule, path: Path, extra: dict) -> Path:
    """Write `module` with `extra` text files (e.g. the bundle's metadata) inside the archive."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch 2.14 marks torch.jit deprecated; MONAI's tools read TorchScript
        warnings.filterwarnings("ignore", ".*torch.jit.* is deprecated.*", FutureWarning)
        torch.jit.save(module, str(path), _extra_files=extra)
    return path

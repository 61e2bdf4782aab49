"""NT-Xent (normalised temperature-scaled cross entropy), SimCLR's contrastive loss, DDP-aware.

For a batch of M positive pairs (z1[i], z2[i]) each of the 2M embeddings is an anchor; its positive is
its partner and its negatives are the other 2M - 2 embeddings:

    l(a) = -log( exp(s(a, p) / t) / sum_{k != a} exp(s(a, k) / t) ),   s = cosine similarity,

and the loss is the mean of l over all 2M anchors. Under DDP the candidates are gathered from every rank
with a gradient-carrying all_gather (`torch.distributed.nn.functional.all_gather`), so M is the global
batch; each rank averages over its own anchors. Lightning's DDP averages gradients over ranks, which
makes loss and gradients equal to one process seeing the whole global batch (tested on 2 CPU processes).
"""

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _gather(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' `z` concatenated in rank order (with gradient), and this rank's offset in it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in torch 2.14 in favour of a private API; still correct
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(z)
    return torch.cat(parts, dim=0), dist.get_rank() * z.shape[0]


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    gather: bool = True,
    return_accuracy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent of the pairs (z1[i], z2[i]); z1, z2: [B, D]. With `return_accuracy` also the fraction of
    anchors whose most similar candidate is their positive (a cheap training signal)."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [B, D]; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    local = z1.shape[0]
    if z1.dtype in (torch.float16, torch.bfloat16):  # similarities / t need float32 range and precision
        z1, z2 = z1.float(), z2.float()
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    if gather:
        all1, offset = _gather(z1)
        all2, _ = _gather(z2)
    else:
        all1, all2, offset = z1, z2, 0
    total = all1.shape[0]
    anchors = torch.cat([z1, z2], dim=0)  # [2B, D]
    candidates = torch.cat([all1, all2], dim=0)  # [2M, D]
    logits = anchors @ candidates.t() / temperature  # [2B, 2M]
    rows = torch.arange(local, device=z1.device) + offset
    own = torch.cat([rows, rows + total])
    positive = torch.cat([rows + total, rows])
    arange = torch.arange(2 * local, device=z1.device)
    logits = logits.clone()
    logits[arange, own] = float("-inf")
    loss = F.cross_entropy(logits, positive)
    if not return_accuracy:
        return loss
    accuracy = (logits.argmax(dim=1) == positive).float().mean()
    return loss, accuracy.detach()

"""NT-Xent against a direct per-anchor computation, and the DDP version (2 CPU processes on gloo) against
one process seeing the whole batch."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from samora_pl.losses.nt_xent import nt_xent


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Literal SimCLR definition: mean over the 2N anchors of -log(exp(s_ap/t) / sum_{k != a} exp(s_ak/t))."""
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n = z1.shape[0]
    losses = []
    for a in range(2 * n):
        p = a + n if a < n else a - n
        numerator = torch.exp(torch.dot(z[a], z[p]) / temperature)
        denominator = sum(torch.exp(torch.dot(z[a], z[k]) / temperature) for k in range(2 * n) if k != a)
        losses.append(-torch.log(numerator / denominator))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_matches_reference(temperature):
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    assert torch.allclose(nt_xent(z1, z2, temperature), reference_nt_xent(z1, z2, temperature), atol=1e-10)


def test_gradients_match_reference():
    torch.manual_seed(1)
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    nt_xent(a, b, 0.1).backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    reference_nt_xent(a, b, 0.1).backward()
    assert torch.allclose(ga, a.grad, atol=1e-10) and torch.allclose(gb, b.grad, atol=1e-10)


def test_identical_views_give_low_loss_and_full_accuracy():
    z = torch.eye(8)
    loss, accuracy = nt_xent(z, z.clone(), 0.1, return_accuracy=True)
    # positive similarity 1, every negative 0: loss = -log(e^10 / (e^10 + 14))
    assert math.isclose(float(loss), -math.log(math.exp(10) / (math.exp(10) + 14)), rel_tol=1e-4)
    assert float(accuracy) == 1.0


def _worker(rank: int, world: int, z1_full, z2_full, out_dir: str) -> None:
    # a file rendezvous: no TCP port that a concurrent test run could take first
    rendezvous = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        per = z1_full.shape[0] // world
        z1 = z1_full[rank * per : (rank + 1) * per].clone().requires_grad_(True)
        z2 = z2_full[rank * per : (rank + 1) * per].clone().requires_grad_(True)
        loss = nt_xent(z1, z2, 0.1, gather=True)
        loss.backward()
        torch.save({"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (SIGABRT otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_negatives_equal_one_process(tmp_path):
    """2 ranks x 4 pairs == 1 process x 8 pairs: the mean of the rank losses is the full loss, and each
    rank's gradient divided by the world size (DDP's gradient averaging) is the full-batch gradient."""
    torch.manual_seed(2)
    world = 2
    z1_full = torch.randn(8, 6, dtype=torch.float64)
    z2_full = torch.randn(8, 6, dtype=torch.float64)
    mp.spawn(_worker, args=(world, z1_full, z2_full, str(tmp_path)), nprocs=world, join=True)

    a = z1_full.clone().requires_grad_(True)
    b = z2_full.clone().requires_grad_(True)
    full = nt_xent(a, b, 0.1, gather=False)
    full.backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    mean_loss = sum(r["loss"] for r in results) / world
    assert torch.allclose(mean_loss, full.detach(), atol=1e-10)
    assert torch.allclose(full.detach(), reference_nt_xent(z1_full, z2_full, 0.1), atol=1e-10)
    g1 = torch.cat([r["g1"] for r in results]) / world
    g2 = torch.cat([r["g2"] for r in results]) / world
    assert torch.allclose(g1, a.grad, atol=1e-10)
    assert torch.allclose(g2, b.grad, atol=1e-10)

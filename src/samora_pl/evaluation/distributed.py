"""DDP-safe evaluation: split test cases over ranks, gather every case's rows exactly once.

Case ``i`` goes to rank ``i % world_size``; after evaluation :func:`gather_rows` collects the rows of
all ranks (``torch.distributed.all_gather_object``), drops repeats of the same (case, class) (a padded
sampler can evaluate a case twice) and sorts by case then class, so the result, and every file written
from it, is identical for any world size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch.distributed as dist

from samora_pl.evaluation.metrics import sort_rows

__all__ = ["shard_cases", "gather_rows", "dist_rank_world"]

T = TypeVar("T")


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_cases(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """The items this rank evaluates: ``items[i]`` for every ``i % world_size == rank``.

    ``rank`` and ``world_size`` default to the initialised process group (0 and 1 without one). Every
    item lands on exactly one rank; ranks beyond the number of items get an empty list.
    """
    cur_rank, cur_world = dist_rank_world()
    rank = cur_rank if rank is None else int(rank)
    world_size = cur_world if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items)[rank::world_size]


def _key(row: dict) -> tuple[Any, int]:
    return row["case"], int(row["class_id"])


def gather_rows(rows: Iterable[dict], group: Any = None) -> list[dict]:
    """Rows of every rank, each (case, class) exactly once, sorted by case then class.

    A collective: every rank of ``group`` must call it (each gets the full list). Without an initialised
    process group it only de-duplicates and sorts. Repeats of a (case, class) must carry the same values
    (a case evaluated twice must give the same numbers); otherwise this raises ``RuntimeError``.
    """
    rows = list(rows)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, rows, group=group)
        rows = [r for part in gathered for r in part]
    unique: dict[tuple, dict] = {}
    for r in rows:
        k = _key(r)
        if k in unique:
            if unique[k] != r:
                raise RuntimeError(f"case {k[0]!r} class {k[1]} was evaluated twice with different results")
            continue
        unique[k] = r
    return sort_rows(unique.values())

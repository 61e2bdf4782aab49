"""Case sharding and gathering: every case exactly once, the same rows for any world size."""

import json
import os
import socket

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from samora_pl.evaluation import case_metrics, gather_rows, shard_cases

NUM_CASES = 5  # odd, so the ranks get different numbers of cases
NUM_CLASSES = 3


def make_case(i):
    rng = np.random.default_rng(i)
    label = np.zeros((6, 16, 16), np.uint8)
    pred = np.zeros_like(label)
    for c in range(1, NUM_CLASSES + 1):
        z, y, x = rng.integers(0, 4), rng.integers(0, 12), rng.integers(0, 12)
        label[z : z + 2, y : y + 4, x : x + 4] = c
        if c != i % NUM_CLASSES + 1:  # one class missed per case
            pred[z : z + 2, y + 1 : y + 5, x : x + 3] = c
    return f"case{i:04d}", pred, label


def evaluate_shard(rank, world_size):
    rows = []
    for case, pred, label in (make_case(i) for i in shard_cases(range(NUM_CASES), rank, world_size)):
        for row in case_metrics(pred, label, NUM_CLASSES, spacing=(2.0, 1.0, 1.0)):
            row["case"] = case
            rows.append(row)
    return rows


def _worker(rank, world_size, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # default rank / world size come from the process group
        assert shard_cases(list(range(NUM_CASES))) == list(range(NUM_CASES))[rank::world_size]
        rows = gather_rows(evaluate_shard(rank, world_size))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(rows, fh)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_shard_cases_covers_every_item_exactly_once(world_size):
    items = [f"case{i}" for i in range(6)]
    shards = [shard_cases(items, r, world_size) for r in range(world_size)]
    assert sorted(x for s in shards for x in s) == sorted(items)
    assert shards[0][0] == "case0" and all(items.index(x) % world_size == r for r, s in enumerate(shards) for x in s)


def test_shard_cases_rejects_bad_rank():
    with pytest.raises(ValueError):
        shard_cases([1, 2], 2, 2)


def test_gather_rows_without_process_group_sorts_and_deduplicates():
    rows = evaluate_shard(0, 1)
    shuffled = rows[::-1] + rows[:3]  # a padded sampler can evaluate cases twice
    assert gather_rows(shuffled) == rows
    clash = dict(rows[0], dice=rows[0]["dice"] + 0.5)
    with pytest.raises(RuntimeError, match="twice"):
        gather_rows(rows + [clash])


@pytest.mark.slow
def test_two_process_gloo_gathers_every_case_once(tmp_path):
    expected = gather_rows(evaluate_shard(0, 1))
    assert len(expected) == NUM_CASES * NUM_CLASSES
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        rows = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert rows == expected  # every rank gets all rows, identical to one process (floats round-trip in JSON)

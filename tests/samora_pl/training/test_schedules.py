import pytest
import torch

from samora_pl.training.schedules import decay_groups, warmup_cosine, warmup_poly


def test_warmup_poly_shape():
    f = warmup_poly(total_steps=100, warmup_steps=10, power=0.9)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5**0.9)
    assert f(100) == 0.0
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_cosine_shape():
    f = warmup_cosine(total_steps=20, warmup_steps=0)
    assert f(0) == pytest.approx(1.0) and f(10) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)


def test_no_warmup_when_too_few_steps():
    assert warmup_poly(total_steps=1, warmup_steps=5)(0) == pytest.approx(1.0)


def test_decay_groups_split_by_shape_name_and_trainability():

    weight, bias, token, frozen = (torch.nn.Parameter(torch.ones(*s)) for s in ((3, 2), (3,), (1, 1, 4), (2, 2)))
    frozen.requires_grad_(False)
    named = [("w", weight), ("b", bias), ("cls_token", token), ("f", frozen)]
    decay, rest = decay_groups(named, 0.05, no_decay_names=("cls_token",))
    assert decay["params"] == [weight] and decay["weight_decay"] == 0.05
    assert rest["params"] == [bias, token] and rest["weight_decay"] == 0.0
    assert decay_groups([("w", weight)], 0.1) == [{"params": [weight], "weight_decay": 0.1}]


def test_warmup_in_iterations_with_samed_poly_over_all_steps():
    """SAMed / H-SAM: step 0 at base/250, base at step 250, then (1 - (t - 250) / T) ** 0.9 with T all steps."""
    total = 4200  # H-SAM 10 %: 300 epochs x 14 iterations
    f = warmup_poly(total, 250, 0.9, horizon="total")
    assert f(0) == pytest.approx(1 / 250)
    assert f(249) == pytest.approx(1.0)
    assert f(250) == pytest.approx(1.0)
    assert f(1000) == pytest.approx((1 - 750 / total) ** 0.9)
    assert f(total - 1) == pytest.approx((1 - (total - 251) / total) ** 0.9) and f(total - 1) > 0.05
    assert warmup_poly(total, 250, 0.9)(total - 1) < 0.01  # after_warmup: decays to ~0


def test_a_stop_epoch_trains_the_head_of_a_longer_schedule():
    """SAMed: 200 epochs of schedule, 160 trained; steps are optimiser steps (after accumulation)."""
    from samora_pl.training.schedules import schedule_steps

    iters = 93  # Synapse's 2211 slices in steps of 24
    assert schedule_steps(160 * iters, 160, 200) == (iters, 200 * iters)
    assert schedule_steps(1234, 20) == (61, 1234)  # no stop: the schedule spans the run exactly
    per_epoch, total = schedule_steps(160 * iters, 160, 200)
    f = warmup_poly(total, 250, 0.9, horizon="total")
    last = f(160 * iters)  # the LR after the last step, the one epoch_159.pth ends on
    assert last == pytest.approx((1 - (160 * iters - 250) / (200 * iters)) ** 0.9)
    assert last == pytest.approx(0.25, abs=0.01)

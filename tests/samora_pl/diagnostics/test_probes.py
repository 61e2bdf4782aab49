"""The probes: AUROC and balanced accuracy against hand-worked values, the logistic probe separating separable
classes and at chance on random labels (and matching scikit-learn's where it is installed), the k-NN probe on
clusters, and the seeded split of the probe's slices by case."""

import pytest
import torch

from samora_pl.diagnostics.knn_probe import knn_scores
from samora_pl.diagnostics.linear_probe import LogisticProbe
from samora_pl.diagnostics.probe_data import patch_classes, split_indices
from samora_pl.diagnostics.probing import probe_scores
from samora_pl.diagnostics.scores import auroc, balanced_accuracy, scorable


def test_auroc_and_balanced_accuracy_by_hand():
    target = torch.tensor([0, 0, 1, 1])
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), target) == 0.75
    assert auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), target) == 0.5  # ties count one half
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), target) == 0.0
    # one of two positives found, two of two negatives: (0.5 + 1) / 2
    assert balanced_accuracy(torch.tensor([0, 0, 1, 0]), target) == 0.75
    assert balanced_accuracy(torch.ones(4), target) == 0.5  # always "present": chance however rare


def test_scorable_needs_both_labels_in_every_part():
    a = torch.tensor([[1, 0, 1], [0, 0, 1]])
    b = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert scorable(a, b).tolist() == [True, False, False]


def _data(n, d, seed, separable):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if separable:
        y = torch.stack([x[:, 0] > 0.3, x[:, 1] + x[:, 2] < -0.5], 1).float()
    else:
        y = (torch.rand(n, 2, generator=g) < torch.tensor([0.5, 0.2])).float()
    return x, y


def test_logistic_probe_separates_separable_classes():
    x, y = _data(600, 10, 0, separable=True)
    scores = probe_scores(x[:400], y[:400], x[400:], y[400:], l2=1e-4)
    assert scores["classes"] == 2
    assert scores["linear_bacc"] > 0.95 and scores["linear_auroc"] > 0.99
    assert scores["knn_bacc"] > 0.8


def test_probes_are_at_chance_on_random_labels():
    x, y = _data(3000, 10, 1, separable=False)
    scores = probe_scores(x[:2000], y[:2000], x[2000:], y[2000:])
    for name in ("linear_bacc", "linear_auroc", "knn_bacc", "knn_auroc"):
        assert abs(scores[name] - 0.5) < 0.05, (name, scores[name])


def test_logistic_probe_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = _data(300, 5, 2, separable=False)
    x[:, 0] += 2 * y[:, 0]  # some signal, so the fit is not trivial
    l2 = 0.01
    ours = LogisticProbe(l2).fit(x, y).predict(x[:50])
    z = (x.double() - x.double().mean(0)) / x.double().std(0)
    for c in range(2):
        # sklearn minimises C * sum_i w_i loss_i + ||w||^2 / 2; ours mean_i w_i loss_i + l2 ||w||^2
        ref = linear_model.LogisticRegression(C=1 / (2 * l2 * len(x)), class_weight="balanced", tol=1e-10)
        ref.fit(z.numpy(), y[:, c].numpy())
        theirs = torch.from_numpy(ref.predict_proba(z[:50].numpy())[:, 1])
        assert torch.allclose(ours[:, c], theirs, atol=1e-4)


def test_knn_votes_are_balanced_for_a_rare_class():
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [4.0, 4.0]])
    labels = (torch.rand(400, generator=g) < 0.1).long()  # the rare class is 10 %
    x = centres[labels] + 0.5 * torch.randn(400, 2, generator=g)
    scores = knn_scores(x[:300], labels[:300, None].float(), x[300:], k=5)
    assert balanced_accuracy(scores[:, 0] > 0.5, labels[300:]) > 0.95


def test_split_holds_out_whole_cases_seeded():
    cases = [f"case{i // 10}" for i in range(60)]
    train, test, by = split_indices(cases, 0.3, seed=0)
    assert by == "case"
    assert not {cases[i] for i in train.tolist()} & {cases[i] for i in test.tolist()}
    assert len({cases[i] for i in test.tolist()}) == 2  # round(0.3 * 6)
    assert torch.equal(split_indices(cases, 0.3, seed=0)[1], test)
    assert sorted(train.tolist() + test.tolist()) == list(range(60))
    _, test_one, by_one = split_indices(["only"] * 10, 0.3, seed=0)
    assert by_one == "slice" and len(test_one) == 3


def test_patch_classes_are_the_majority_of_each_cell():
    label = torch.zeros(1, 32, 32, dtype=torch.long)
    label[0, :16, :16] = 3  # one whole cell of organ 3
    label[0, 16:, 16:22] = 2  # 6/16 of a cell: mostly background
    label[0, :16, 16:] = 5
    label[0, :4, 16:] = 1  # 4/16 organ 1, 12/16 organ 5
    assert patch_classes(label, (2, 2), num_classes=8).tolist() == [[[3, 5], [0, 0]]]

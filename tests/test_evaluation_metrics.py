"""Top-k scoring with class subsets and multi-label sets, and the accuracy meter."""

from __future__ import annotations

import pytest
import torch

from robustft.errors import DataError, ModelError
from robustft.evaluation.metrics import AccuracyMeter, Scorer, build_correct_matrix, topk_correct

# Five head classes. Row 0 prefers 0 > 2 > 3 > 1 > 4; row 1 prefers 4 > 3 > 1 > 0 > 2.
LOGITS = torch.tensor([[9.0, 1.0, 5.0, 3.0, 0.0], [2.0, 3.0, 0.0, 7.0, 8.0]])


def test_correct_matrix_marks_every_class_of_each_label_set():
    m = build_correct_matrix([[0], [1, 3], [4]], 5)
    assert m.dtype == torch.bool and m.shape == (3, 5)
    assert m.nonzero().tolist() == [[0, 0], [1, 1], [1, 3], [2, 4]]


def test_correct_matrix_rejects_classes_outside_the_head_and_empty_sets():
    with pytest.raises(ModelError, match="head has 5 classes"):
        build_correct_matrix([[0], [7]], 5)
    with pytest.raises(DataError, match="label 1"):
        build_correct_matrix([[0], []], 5)


def test_top1_over_all_classes():
    sets = build_correct_matrix([[0], [3]], 5)  # sample 0 is class 0, sample 1 class 3
    assert topk_correct(LOGITS, sets, 1).tolist() == [True, False]
    assert topk_correct(LOGITS, sets, 2).tolist() == [True, True]


def test_class_subset_restricts_the_argmax_and_maps_back_to_head_indices():
    subset = torch.tensor([1, 2, 3])
    # Over {1, 2, 3}: row 0 picks 2 (not 0), row 1 picks 3 (not 4).
    sets = build_correct_matrix([[2], [3]], 5)
    assert topk_correct(LOGITS, sets, 1).tolist() == [False, False]
    assert topk_correct(LOGITS, sets, 1, subset).tolist() == [True, True]
    wrong = build_correct_matrix([[0], [4]], 5)  # classes outside the subset are never predicted
    assert topk_correct(LOGITS, wrong, 3, subset).tolist() == [False, False]


def test_multi_label_set_counts_any_of_its_classes():
    sets = build_correct_matrix([[3, 0], [1, 2]], 5)
    assert topk_correct(LOGITS, sets, 1).tolist() == [True, False]
    assert topk_correct(LOGITS, sets, 3).tolist() == [True, True]  # row 1's third choice is 1


def test_topk_is_clipped_to_the_subset_size():
    subset = torch.tensor([1, 4])
    sets = build_correct_matrix([[1], [1]], 5)
    assert topk_correct(LOGITS, sets, 5, subset).tolist() == [True, True]


def test_scorer_indexes_label_sets_by_dataset_label_and_counts_per_k():
    # Three dataset labels; label 2 is multi-label {0, 3}; prediction over subset {0, 1, 3, 4}.
    scorer = Scorer([[1], [4], [0, 3]], 5, class_indices=[0, 1, 3, 4], ks=(1, 2))
    labels = torch.tensor([2, 1])
    # row 0 top over subset: 0 (correct for label 2); row 1 top: 4 (label 1 -> correct).
    assert scorer(LOGITS, labels).tolist() == [2, 2]
    labels = torch.tensor([0, 2])
    # row 0: top-2 = {0, 3}, label 0 wants 1 -> wrong; row 1: top-2 = {4, 3} contains 3 -> top-2 right.
    assert scorer(LOGITS, labels).tolist() == [0, 1]


def test_scorer_rejects_a_head_of_the_wrong_width_or_subset():
    scorer = Scorer([[0], [1]], 5)
    with pytest.raises(ModelError, match="outputs 4 classes"):
        scorer(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ModelError, match="class subset"):
        Scorer([[0]], 5, class_indices=[0, 9])


def test_scorer_is_unaffected_by_bf16_logits():
    scorer = Scorer([[0], [3]], 5)
    labels = torch.tensor([0, 1])  # dataset labels: 0 -> {0}, 1 -> {3}
    assert scorer(LOGITS.bfloat16(), labels).tolist() == scorer(LOGITS, labels).tolist()


class _TwoRankSum:
    """Stand-in for a 2-process DistEnv: adds the other rank's counts."""

    world_size = 2

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor += self.other
        return tensor


def test_meter_sums_batches_and_reduces_over_ranks():
    meter = AccuracyMeter(ks=(1, 5))
    meter.update(torch.tensor([3, 4]), n=4, n_bad=1)
    meter.update(torch.tensor([1, 2]), n=2)
    assert meter.reduce() == {"n": 6, "n_bad": 1, "top1": 4, "top5": 6}
    other = torch.tensor([4, 0, 2, 3])  # the other rank: n=4, n_bad=0, top1=2, top5=3
    acc = meter.accuracies(_TwoRankSum(other))
    assert acc["n"] == 10 and acc["n_bad"] == 1
    assert acc["top1"] == pytest.approx(60.0) and acc["top5"] == pytest.approx(90.0)
    assert meter.reduce() == {"n": 6, "n_bad": 1, "top1": 4, "top5": 6}  # reducing does not change the local sums

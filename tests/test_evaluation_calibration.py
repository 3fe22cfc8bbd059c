"""Macro-F1, worst-group accuracy, ECE and NLL against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from robustft.errors import ConfigError, DataError
from robustft.evaluation.metrics import (
    Scorer,
    SetMeter,
    calibration_bins,
    expected_calibration_error,
    group_accuracies,
    macro_f1,
)


def _logits_for(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_ece_of_a_hand_worked_example():
    # Four predictions, 2 bins ([0, .5), [.5, 1]):
    #   bin 0: confidences .3, .4 -> mean .35, one of two correct (acc .5): |.5 - .35| = .15
    #   bin 1: confidences .9, .6 -> mean .75, both correct (acc 1):       |1 - .75|  = .25
    # ECE = (2 * .15 + 2 * .25) / 4 = .2
    conf = torch.tensor([0.3, 0.4, 0.9, 0.6])
    correct = torch.tensor([True, False, True, True])
    count, conf_sum, hits = calibration_bins(conf, correct, 2)
    assert count.tolist() == [2, 2] and hits.tolist() == [1, 2]
    assert conf_sum.tolist() == pytest.approx([0.7, 1.5])
    assert expected_calibration_error(count, conf_sum, hits) == pytest.approx(0.2)


def test_bins_are_half_open_with_one_in_the_last():
    count, _, _ = calibration_bins(torch.tensor([0.0, 0.1, 0.19999, 0.2, 0.999, 1.0]), torch.ones(6, dtype=torch.bool), 5)
    assert count.tolist() == [3, 1, 0, 0, 2]


def test_set_meter_ece_and_nll_equal_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 7, generator=gen) * 3
    labels = torch.randint(0, 7, (40,), generator=gen)
    meter = SetMeter(Scorer([[c] for c in range(7)], 7), ece_bins=10)
    meter.update(logits[:25], labels[:25], torch.arange(25))
    meter.update(logits[25:], labels[25:], torch.arange(25, 40))
    found = meter.result()
    probs = logits.softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = pred == labels
    ece = 0.0
    for b in range(10):
        inside = (conf >= b / 10) & (conf < (b + 1) / 10) if b < 9 else conf >= 0.9
        if inside.any():
            ece += inside.sum().item() / 40 * abs(correct[inside].float().mean().item() - conf[inside].mean().item())
    assert found.metrics["ece"] == pytest.approx(ece, abs=1e-6)
    assert found.metrics["nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)
    assert found.metrics["top1"] == pytest.approx(100 * correct.float().mean().item())
    assert sum(found.reliability["count"]) == 40 and len(found.reliability["count"]) == 10


def test_calibration_on_a_class_subset_uses_the_subset_softmax():
    # Head of 4 classes, the set allows classes 1 and 3 only (like ImageNet-R's 200 of 1000).
    logits = torch.tensor([[5.0, 0.0, 1.0, 2.0], [9.0, 3.0, 0.0, 3.0]])
    meter = SetMeter(Scorer([[1], [3]], 4, class_indices=[1, 3]), ece_bins=4)
    meter.update(logits, torch.tensor([1, 0]), torch.arange(2))  # true classes 3, then 1
    found = meter.result()
    sub = logits[:, [1, 3]].softmax(dim=1)
    nll = -(sub[0, 1].log() + sub[1, 0].log()).item() / 2
    assert found.metrics["nll"] == pytest.approx(nll, abs=1e-6)
    assert found.metrics["top1"] == 100.0  # argmax over the subset: 3, then a tie 1/3 -> 1
    assert found.reliability["count"] == [0, 0, 1, 1]  # the tie: confidence exactly .5 -> bin [.5, .75)


def test_multi_label_sets_have_ece_but_no_nll_and_no_macro_f1():
    scorer = Scorer([[0, 1], [2]], 3)
    meter = SetMeter(scorer)
    meter.update(torch.eye(3)[[0, 2]] * 4, torch.tensor([0, 1]), torch.arange(2))
    found = meter.result()
    assert "ece" in found.metrics and "nll" not in found.metrics
    with pytest.raises(DataError, match="macro-F1 needs one correct class per label"):
        SetMeter(scorer, metrics=("macro_f1",))


def test_macro_f1_equals_scikit_learn_over_the_classes_present():
    from sklearn import metrics as sklearn_metrics  # the dev extra installs scikit-learn
    gen = torch.Generator().manual_seed(3)
    c = 9
    true = torch.randint(0, 6, (200,), generator=gen)  # classes 6..8 never occur in the labels ...
    pred = torch.where(torch.rand(200, generator=gen) < 0.55, true, torch.randint(0, c, (200,), generator=gen))
    logits = F.one_hot(pred, c).float() * 5  # ... but are predicted
    meter = SetMeter(Scorer([[k] for k in range(c)], c), metrics=("macro_f1",))
    for part in torch.arange(200).split(64):
        meter.update(logits[part], true[part], part)
    expected = sklearn_metrics.f1_score(true.numpy(), pred.numpy(), average="macro", labels=true.unique().numpy())
    assert meter.result().metrics["macro_f1"] == pytest.approx(100 * expected, abs=1e-9)


def test_macro_f1_from_counts_by_hand():
    # class 0: tp 2, predicted 3, true 2 -> 4/5; class 1: tp 0, predicted 0, true 1 -> 0; class 2 absent.
    assert macro_f1(torch.tensor([2, 0, 0]), torch.tensor([3, 0, 1]), torch.tensor([2, 1, 0])) == pytest.approx(40.0)


def test_worst_region_by_hand():
    # Images: region ids and whether correct.
    #   Africa (0): 2 of 4 correct = 50%; Americas (1): 3 of 3 = 100%; Other (2): 0 of 2 = 0% (excluded);
    #   Europe (3): no images (skipped).
    ids = [0, 0, 0, 0, 1, 1, 1, 2, 2, -1]
    hit = [1, 1, 0, 0, 1, 1, 1, 0, 0, 1]
    names = ["Africa", "Americas", "Other", "Europe"]
    labels = torch.zeros(10, dtype=torch.long)
    logits = torch.stack([torch.tensor([3.0, 0.0]) if h else torch.tensor([0.0, 3.0]) for h in hit])
    meter = SetMeter(Scorer([[0], [1]], 2), metrics=("worst_region",),
                     groups={"region": (names, ids, ("Other",))})
    meter.update(logits[:6], labels[:6], torch.arange(6))
    meter.update(logits[6:], labels[6:], torch.arange(6, 10))
    found = meter.result()
    assert found.metrics["worst_region"] == pytest.approx(50.0)
    assert found.groups["region"] == pytest.approx({"Africa": 50.0, "Americas": 100.0, "Other": 0.0})
    worst, per = group_accuracies(torch.tensor([2, 3, 0, 0]), torch.tensor([4, 3, 2, 0]), names, ("Other",))
    assert worst == 50.0 and "Europe" not in per


def test_worst_metric_needs_its_grouping_and_bins_must_be_positive():
    with pytest.raises(DataError, match="needs a 'year' grouping"):
        SetMeter(Scorer([[0], [1]], 2), metrics=("worst_year",))
    with pytest.raises(DataError, match="ECE bins 0"):
        SetMeter(Scorer([[0], [1]], 2), ece_bins=0)


def test_evaluate_rejects_bad_bins_before_reading(tmp_path):
    from robustft.distributed import DistEnv
    from robustft.evaluation.evaluate import evaluate

    with pytest.raises(ConfigError, match="ECE bins -3"):
        evaluate(torch.nn.Identity(), [], dist_env=DistEnv(0, 1, torch.device("cpu")), batch_size=2, ece_bins=-3)
    assert math.isfinite(expected_calibration_error([1], [0.5], [1]))


def test_rows_keep_what_the_evaluation_measured(tmp_path):
    from torch.utils.data import Dataset

    from robustft.data.datasets import EvalSet
    from robustft.distributed import DistEnv
    from robustft.evaluation.evaluate import evaluate
    from robustft.reports.results import append_rows, read_rows, rows_from_results

    class Images(Dataset):
        def __len__(self) -> int:
            return 9

        def __getitem__(self, i: int):
            return torch.full((3, 4, 4), i / 9), i % 3, i

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x.mean(dim=(1, 2, 3)) * k for k in (1.0, 2.0, 3.0)], dim=1)

    es = EvalSet("d", Images(), [[0], [1], [2]], None, "all 3 classes", 3)
    (result,) = evaluate(Net(), [es], dist_env=DistEnv(0, 1, torch.device("cpu")), batch_size=4, progress=False,
                         ece_bins=10)
    append_rows(tmp_path / "r.jsonl", rows_from_results([result], run="r", method="ft"))
    (row,) = read_rows([tmp_path / "r.jsonl"])
    assert row.extra["metrics"] == pytest.approx(result.metrics) and {"ece", "nll", "top1"} <= set(row.extra["metrics"])
    assert row.extra["headline"] == "top1" and row.extra["ece_bins"] == 10
    assert sum(row.extra["reliability"]["count"]) == 9 == row.n

"""evaluate(): protocols end to end, exactly-once sharding, precision, errors, OOD average."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from robustft.data.datasets import EvalSet, Grouping
from robustft.distributed import DistEnv
from robustft.errors import ConfigError, DataError, ModelError
from robustft.evaluation.evaluate import EvalResult, evaluate, ood_average

NUM_CLASSES = 6


class PredictionDataset(Dataset):
    """Item i is an image whose pixel [0, 0, 0] tells :class:`ReadOutClassifier` what to rank first.

    ``preds[i]`` is the head class predicted for item i, ``labels[i]`` its dataset label;
    items listed in ``bad`` are unreadable (None). Records every index it serves.
    """

    def __init__(self, preds: list[int], labels: list[int], bad: frozenset[int] = frozenset()) -> None:
        self.preds, self.labels, self.bad = preds, labels, bad
        self.served: list[int] = []

    def __len__(self) -> int:
        return len(self.preds)

    def __getitem__(self, i: int):
        self.served.append(i)
        if i in self.bad:
            return None
        image = torch.zeros(3, 4, 4)
        image[0, 0, 0] = self.preds[i] / 10.0
        return image, self.labels[i], i


class ReadOutClassifier(nn.Module):
    """Logits = -|class - 10 * pixel|: ranks the encoded class first, then its neighbours."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.register_buffer("classes", torch.arange(num_classes, dtype=torch.float32))
        self.seen_inference_mode: list[bool] = []
        self.seen_training: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen_inference_mode.append(torch.is_inference_mode_enabled())
        self.seen_training.append(self.training)
        code = images[:, 0, 0, 0:1] * 10.0
        return -(self.classes[None, :] - code).abs()


def _expected_top1(preds, labels, label_sets, bad) -> tuple[float, int]:
    good = [i for i in range(len(preds)) if i not in bad]
    hits = sum(preds[i] in label_sets[labels[i]] for i in good)
    return 100.0 * hits / len(good), len(good)


def _env(rank: int = 0, world_size: int = 1) -> DistEnv:
    return DistEnv(rank=rank, world_size=world_size, device=torch.device("cpu"))


def test_multilabel_subset_protocol_counts_each_readable_image():
    # Labels: 0 -> {1}, 1 -> {2, 5} (multi-label), 2 -> {4}; predictions restricted to {1, 2, 4, 5}.
    label_sets = [[1], [2, 5], [4]]
    preds = [1, 5, 2, 4, 4, 1, 2, 5, 1, 4, 2]
    labels = [0, 1, 1, 2, 0, 0, 2, 1, 0, 2, 1]
    bad = frozenset({3, 8})
    data = PredictionDataset(preds, labels, bad)
    es = EvalSet("toy", data, label_sets, [1, 2, 4, 5], "toy protocol", NUM_CLASSES)
    (res,) = evaluate(ReadOutClassifier(), [es], dist_env=_env(), batch_size=4, workers=0, progress=False)
    top1, n = _expected_top1(preds, labels, label_sets, bad)
    assert (res.dataset, res.n, res.n_bad, res.protocol) == ("toy", n, 2, "toy protocol")
    assert res.top1 == pytest.approx(top1)
    assert res.top5 == pytest.approx(100.0)  # top-5 over a 4-class subset always hits
    assert sorted(data.served) == list(range(len(preds)))


def test_class_subset_changes_the_prediction():
    # Every image encodes class 0; restricted to {3, 4, 5} the readout ranks 3 first.
    preds, labels = [0, 0, 0], [0, 0, 0]
    full = EvalSet("full", PredictionDataset(preds, labels), [[3]], None, "all", NUM_CLASSES)
    sub = EvalSet("sub", PredictionDataset(preds, labels), [[3]], [3, 4, 5], "subset", NUM_CLASSES)
    res = evaluate(ReadOutClassifier(), [full, sub], dist_env=_env(), batch_size=2, workers=0, progress=False)
    assert [r.top1 for r in res] == [0.0, 100.0]


def test_shards_of_two_ranks_cover_every_image_exactly_once():
    preds = [i % NUM_CLASSES for i in range(13)]
    labels = [(i * 7) % NUM_CLASSES for i in range(13)]
    label_sets = [[c] for c in range(NUM_CLASSES)]
    bad = frozenset({5})
    whole = evaluate(ReadOutClassifier(), [EvalSet("d", PredictionDataset(preds, labels, bad), label_sets, None, "p",
                                                   NUM_CLASSES)], dist_env=_env(), batch_size=4, workers=0,
                     progress=False)[0]
    served, n, n_bad, hits = [], 0, 0, 0.0
    for rank in range(2):
        data = PredictionDataset(preds, labels, bad)
        # No process group: each rank's result holds its own shard's counts only.
        part = evaluate(ReadOutClassifier(), [EvalSet("d", data, label_sets, None, "p", NUM_CLASSES)],
                        dist_env=_env(rank, 2), batch_size=4, workers=0, progress=False)[0]
        served += data.served
        n, n_bad, hits = n + part.n, n_bad + part.n_bad, hits + part.top1 * part.n / 100.0
    assert sorted(served) == list(range(13))
    assert (n, n_bad) == (whole.n, whole.n_bad) == (12, 1)
    assert 100.0 * round(hits) / n == pytest.approx(whole.top1)


def test_inference_mode_eval_mode_and_restored_training_mode():
    model = ReadOutClassifier().train()
    es = EvalSet("d", PredictionDataset([1, 2], [0, 1]), [[1], [2]], None, "p", NUM_CLASSES)
    evaluate(model, [es], dist_env=_env(), batch_size=2, workers=0, progress=False)
    assert model.seen_inference_mode == [True] and model.seen_training == [False]
    assert model.training


class _DtypeProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, NUM_CLASSES)
        self.dtypes: list[torch.dtype] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.linear(images.mean(dim=(2, 3)))
        self.dtypes.append(out.dtype)
        return out


def test_precision_selects_autocast():
    es = EvalSet("d", PredictionDataset([1, 2], [0, 1]), [[1], [2]], None, "p", NUM_CLASSES)
    probe = _DtypeProbe()
    evaluate(probe, [es], dist_env=_env(), batch_size=2, workers=0, precision="bf16", progress=False)
    evaluate(probe, [es], dist_env=_env(), batch_size=2, workers=0, precision="fp32", progress=False)
    assert probe.dtypes == [torch.bfloat16, torch.float32]
    with pytest.raises(ConfigError, match="did you mean 'fp32'"):
        evaluate(probe, [es], dist_env=_env(), batch_size=2, workers=0, precision="fp23", progress=False)


def test_head_that_does_not_fit_the_class_list_is_a_model_error():
    es = EvalSet("d", PredictionDataset([1], [0]), [[9]], None, "p", 10)
    with pytest.raises(ModelError, match="outputs 6 classes but the dataset expects a head of 10"):
        evaluate(ReadOutClassifier(), [es], dist_env=_env(), batch_size=2, workers=0, progress=False)


def test_known_head_size_fails_before_reading_any_image():
    # With ``num_classes`` (as ImageClassifier has) every rank fails at once, even one without data.
    model = ReadOutClassifier()
    model.num_classes = NUM_CLASSES
    data = PredictionDataset([1, 2], [0, 0])
    with pytest.raises(ModelError, match="class subset"):
        evaluate(model, [EvalSet("d", data, [[1]], [2, 8], "p", 10)], dist_env=_env(), batch_size=2, workers=0,
                 progress=False)
    assert data.served == []


def test_unreadable_images_limits():
    data = PredictionDataset([1, 1, 1, 1], [0, 0, 0, 0], frozenset({0, 1, 2, 3}))
    with pytest.raises(DataError, match="no readable images"):
        evaluate(ReadOutClassifier(), [EvalSet("d", data, [[1]], None, "p", NUM_CLASSES)], dist_env=_env(),
                 batch_size=2, workers=0, progress=False)
    data = PredictionDataset([1, 1, 1, 1], [0, 0, 0, 0], frozenset({2}))
    es = EvalSet("d", data, [[1]], None, "p", NUM_CLASSES)
    with pytest.raises(DataError, match="1 of 4 images unreadable"):
        evaluate(ReadOutClassifier(), [es], dist_env=_env(), batch_size=2, workers=0, progress=False,
                 max_bad_fraction=0.1)
    (res,) = evaluate(ReadOutClassifier(), [es], dist_env=_env(), batch_size=2, workers=0, progress=False,
                      max_bad_fraction=0.5)
    assert (res.n, res.n_bad, res.top1) == (3, 1, 100.0)


def test_ood_average():
    results = [EvalResult("imagenet", 80.0, 95.0, 10, 0, "p"), EvalResult("imagenet-r", 60.0, 80.0, 10, 0, "p"),
               EvalResult("imagenet-a", 30.0, 50.0, 10, 0, "p")]
    assert ood_average(results) == pytest.approx(45.0)
    assert ood_average(results, shift_names=["imagenet-a"]) == pytest.approx(30.0)
    with pytest.raises(DataError, match="objectnet"):
        ood_average(results, shift_names=["objectnet"])


# --------------------------------------------------------------------------------------
# 2 gloo processes give the same results as 1


class _TinyConvNet(nn.Module):
    """A small seeded conv net: real float logits without importing open_clip in every process."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(32, NUM_CLASSES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


class _Images(Dataset):
    """13 seeded random images, labels i % 4, item 6 unreadable."""

    def __init__(self) -> None:
        self.images = torch.rand(13, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return 13

    def __getitem__(self, i: int):
        return None if i == 6 else (self.images[i], i % 4, i)


def _tiny_setup() -> tuple[nn.Module, list[EvalSet]]:
    """Deterministic classifier and three evaluation sets (built alike in every process)."""
    regions = Grouping("region", ["a", "b", "Other"], [i % 3 for i in range(13)], excluded=("Other",))
    years = Grouping("year", ["2016", "2017"], [i % 2 if i != 4 else -1 for i in range(13)])
    sets = [EvalSet("full", _Images(), [[0], [1], [2], [3]], None, "all", NUM_CLASSES),
            EvalSet("objectnet-like", _Images(), [[1], [2, 5], [4], [0, 3]], [1, 2, 3, 4, 5],
                    "multi-label subset", NUM_CLASSES),
            EvalSet("wilds-like", _Images(), [[0], [1], [2], [3]], None, "groups", NUM_CLASSES,
                    metrics=("macro_f1", "worst_region", "worst_year"), headline="worst_region",
                    groups={"region": regions, "year": years})]
    return _TinyConvNet(), sets


def _dist_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import os

    from robustft.distributed import init_distributed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = init_distributed("cpu", timeout_s=60)
    try:
        classifier, sets = _tiny_setup()
        results = evaluate(classifier, sets, dist_env=env, batch_size=3, workers=0, progress=False)
        if env.is_primary:
            with open(out, "w") as handle:
                json.dump([r.__dict__ for r in results], handle)
    finally:
        env.destroy()


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist.json"
    mp.spawn(_dist_worker, args=(2, port, str(out)), nprocs=2, join=True)
    classifier, sets = _tiny_setup()
    single = evaluate(classifier, sets, dist_env=_env(), batch_size=3, workers=0, progress=False)
    two = [EvalResult(**r) for r in json.loads(out.read_text())]
    # Counts are exact; ECE and NLL are float64 sums whose order depends on the sharding.
    for a, b in zip(two, single, strict=True):
        assert a.metrics.keys() == b.metrics.keys()
        assert a.metrics == pytest.approx(b.metrics, rel=1e-12, abs=1e-12)
        assert (a.top1, a.top5, a.n, a.n_bad, a.groups, a.reliability["count"]) == (
            b.top1, b.top5, b.n, b.n_bad, b.groups, b.reliability["count"])
    assert [(r.n, r.n_bad) for r in single] == [(12, 1), (12, 1), (12, 1)]
    assert "nll" not in single[1].metrics and {"macro_f1", "worst_region", "worst_year"} <= set(single[2].metrics)


# --------------------------------------------------------------------------------------
# The official-layout builders of the data layer, end to end through evaluate()


class PreferenceClassifier(nn.Module):
    """The same 1000-way logits for every image: ``order[0]`` first, then ``order[1]``, ..."""

    def __init__(self, order: list[int]) -> None:
        super().__init__()
        scores = torch.zeros(1000)
        scores[order] = torch.arange(len(order), 0, -1, dtype=torch.float32)
        self.register_buffer("scores", scores)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scores.expand(images.shape[0], -1)


def test_imagenet_r_layout_is_scored_on_its_200_class_subset(tmp_path):
    from robustft.data.classnames import imagenet_r_wnids
    from robustft.data.datasets import build_eval_set
    from robustft.data.testing import make_fake_imagenet_r

    make_fake_imagenet_r(tmp_path, classes=list(imagenet_r_wnids()[:3]), per_class=2, size=36)
    es = build_eval_set("imagenet-r", tmp_path, image_size=32)
    outside = next(c for c in range(1000) if c not in es.class_indices)
    # The global favourite lies outside the subset; restricted, the first R class wins.
    model = PreferenceClassifier([outside, *es.class_indices[:3]])
    (res,) = evaluate(model, [es], dist_env=_env(), batch_size=4, workers=0, progress=False)
    assert (res.n, res.protocol) == (6, "200-class subset")
    assert res.top1 == pytest.approx(100.0 / 3)  # the two images of label 0 out of six
    assert res.top5 == pytest.approx(100.0)  # the three present classes rank 1-3 within the subset


def test_objectnet_layout_counts_any_mapped_class_as_correct(tmp_path):
    from robustft.data.datasets import build_eval_set
    from robustft.data.testing import make_fake_objectnet

    make_fake_objectnet(tmp_path, per_class=1, size=36)
    es = build_eval_set("objectnet", tmp_path, image_size=32)
    multi = next(label for label, heads in enumerate(es.label_sets) if len(heads) > 1)
    second = sorted(es.label_sets[multi])[1]  # not the first of the set: any member counts
    outside = next(c for c in range(1000) if c not in es.class_indices)
    (res,) = evaluate(PreferenceClassifier([outside, second]), [es], dist_env=_env(), batch_size=4, workers=0,
                      progress=False)
    targets = es.dataset.targets()
    hits = sum(second in es.label_sets[t] for t in targets)
    assert res.n == len(targets) and hits >= 1
    assert res.top1 == pytest.approx(100.0 * hits / len(targets))

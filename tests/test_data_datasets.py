"""Evaluation sets built from fake trees in each official layout, and user folders."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from robustft.data.classnames import imagenet_a_indices, imagenet_r_indices, imagenet_wnid_to_index, imagenet_wnids
from robustft.data.datasets import (
    EVAL_DATASETS,
    build_eval_set,
    build_folder_eval_set,
    build_folder_train_set,
    build_imagenet_train,
)
from robustft.data.layouts import LAYOUTS
from robustft.data.testing import (
    FAKE_OBJECTNET_MAPPED,
    make_fake_imagenet,
    make_fake_imagenet_a,
    make_fake_imagenet_r,
    make_fake_imagenet_sketch,
    make_fake_imagenet_v2,
    make_fake_objectnet,
    make_image_folder,
)
from robustft.errors import DataError

WNIDS = imagenet_wnids()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("data")
    make_fake_imagenet(base, classes=[WNIDS[0], WNIDS[500], WNIDS[999]], per_class=2)
    make_fake_imagenet_v2(base, classes=[1, 2, 10, 100], per_class=1)
    make_fake_imagenet_r(base, classes=3, per_class=1)
    make_fake_imagenet_a(base, classes=3, per_class=1)
    make_fake_imagenet_sketch(base, classes=2, per_class=1)
    make_fake_objectnet(base, per_class=1)
    return base


def _folder(ds, i: int) -> str:
    return Path(ds.samples[i][0]).parent.name


def test_registry_names_match_layouts() -> None:
    assert EVAL_DATASETS.names() == LAYOUTS.names() == [
        "imagenet", "imagenet-v2", "imagenet-r", "imagenet-sketch", "imagenet-a", "objectnet"]


@pytest.mark.parametrize("name", ["imagenet", "imagenet-sketch"])
def test_wnid_folders_map_to_head_indices(root: Path, name: str) -> None:
    s = build_eval_set(name, root, image_size=32)
    assert s.class_indices is None and s.num_classes == 1000 and len(s.label_sets) == 1000
    for i in range(len(s.dataset)):
        image, label, index = s.dataset[i]
        assert image.shape == (3, 32, 32) and index == i
        assert s.label_sets[label] == [imagenet_wnid_to_index()[_folder(s.dataset, i)]]


def test_v2_folder_name_is_the_class_index(root: Path) -> None:
    s = build_eval_set("imagenet-v2", root, image_size=32)
    labels = {_folder(s.dataset, i): s.dataset[i][1] for i in range(len(s.dataset))}
    assert labels == {"1": 1, "2": 2, "10": 10, "100": 100}  # not string-sorted positions
    assert all(s.label_sets[v] == [v] for v in labels.values())


@pytest.mark.parametrize(("name", "indices"), [("imagenet-r", imagenet_r_indices), ("imagenet-a", imagenet_a_indices)])
def test_200_class_subsets(root: Path, name: str, indices) -> None:
    s = build_eval_set(name, root, image_size=32)
    assert s.class_indices == list(indices()) and s.protocol == "200-class subset"
    for i in range(len(s.dataset)):
        head = s.label_sets[s.dataset[i][1]]
        assert head == [imagenet_wnid_to_index()[_folder(s.dataset, i)]] and head[0] in s.class_indices


def test_objectnet_multilabel_mapping_and_border_crop(root: Path) -> None:
    s = build_eval_set("objectnet", root, image_size=36)
    folders = sorted(FAKE_OBJECTNET_MAPPED)
    assert len(s.dataset) == len(folders)  # unmapped folders' images are not evaluated
    assert {_folder(s.dataset, i) for i in range(len(s.dataset))} == set(folders)
    heads = imagenet_wnid_to_index()
    clock = s.label_sets[folders.index("alarm_clock")]
    assert clock == sorted([heads["n02708093"], heads["n03196217"]])
    assert s.class_indices == sorted({h for hs in s.label_sets for h in hs})
    image = s.dataset[0][0]  # 40 px with a 2-px red frame -> 36 px, no resampling
    edge = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    assert float((edge[0] - edge[1:].mean(0)).max()) < 0.5


def test_sketch_accepts_nested_archive_folder(tmp_path: Path) -> None:
    make_fake_imagenet_sketch(tmp_path, classes=1, per_class=1, nested=True)
    assert len(build_eval_set("imagenet-sketch", tmp_path, image_size=32).dataset) == 1


def test_path_override(root: Path, tmp_path: Path) -> None:
    s = build_eval_set("imagenet", None, image_size=32, path_override=root / "imagenet" / "val")
    assert len(s.dataset) == 6
    s = build_eval_set("imagenet-a", tmp_path, image_size=32, path_override=root / "imagenet-a")
    assert len(s.dataset) == 3


def test_wrong_root_and_missing_folder(root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_eval_set("imagenet-r", tmp_path / "nope", image_size=32)
    with pytest.raises(DataError, match=r"expected 200 ImageNet-R WNID class folders.*found no such folder"):
        build_eval_set("imagenet-r", tmp_path, image_size=32)
    with pytest.raises(DataError, match="looks like the imagenet-a folder itself"):
        build_eval_set("imagenet-a", root / "imagenet-a", image_size=32)
    with pytest.raises(DataError, match="unknown evaluation dataset 'imagenet-c'"):
        build_eval_set("imagenet-c", root, image_size=32)


def test_foreign_folders_are_named(tmp_path: Path) -> None:
    make_fake_imagenet_a(tmp_path, classes=2, per_class=1)
    (tmp_path / "imagenet-a" / "cats").mkdir()
    with pytest.raises(DataError, match=r"expected 200 ImageNet-A WNID.*found 1 other folder\(s\): cats"):
        build_eval_set("imagenet-a", tmp_path, image_size=32)
    make_fake_imagenet(tmp_path, classes=1, per_class=1, split="val")
    shutil.move(tmp_path / "imagenet" / "val", tmp_path / "imagenetv2-matched-frequency-format-val")
    with pytest.raises(DataError, match=r"class index 0\.\.999.*n01440764"):
        build_eval_set("imagenet-v2", tmp_path, image_size=32)


def test_head_must_be_imagenet(root: Path) -> None:
    with pytest.raises(DataError, match="1000 ImageNet classes.*3 classes"):
        build_eval_set("imagenet-r", root, image_size=32, head_classnames=["a", "b", "c"])


def test_partial_tree_is_evaluated_with_a_warning(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        build_eval_set("imagenet-a", root, image_size=32)
    assert "found 3 of 200 class folders and 3 of 7500 images" in caplog.text


def test_user_ood_folder_subset(tmp_path: Path) -> None:
    train = ["cat", "dog", "fish", "owl"]
    make_image_folder(tmp_path / "ood", ["owl", "dog"], per_class=1)
    s = build_folder_eval_set("ood", tmp_path / "ood", train_classes=train, image_size=32)
    assert s.class_indices == [1, 3] and s.label_sets == [[1], [3]] and s.num_classes == 4
    assert s.protocol == "2-of-4 class subset"
    assert [s.label_sets[s.dataset[i][1]] for i in range(2)] == [[1], [3]]
    make_image_folder(tmp_path / "full", train, per_class=1)
    assert build_folder_eval_set("full", tmp_path / "full", train_classes=train, image_size=32).class_indices is None
    make_image_folder(tmp_path / "ood", ["dgo"], per_class=1)
    with pytest.raises(DataError, match=r"'dgo'.*not a training class.*did you mean 'dog'"):
        build_folder_eval_set("ood", tmp_path / "ood", train_classes=train, image_size=32)
    (tmp_path / "only.txt").write_text("owl\n")
    s = build_folder_eval_set("ood", tmp_path / "ood", train_classes=train, image_size=32,
                              classes_file=tmp_path / "only.txt")
    assert s.class_indices == [3] and len(s.dataset) == 1


def test_user_train_folder_classnames(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train", ["red_fox", "apple"], per_class=1)
    ds, names = build_folder_train_set(tmp_path / "train", image_size=32)
    assert ds.classes == ["apple", "red_fox"] and names == ["apple", "red fox"]
    (tmp_path / "names.txt").write_text("an apple\nthe fox\n")
    assert build_folder_train_set(tmp_path / "train", image_size=32, classnames_file=tmp_path / "names.txt")[1] == [
        "an apple", "the fox"]
    (tmp_path / "names.txt").write_text("one\n")
    with pytest.raises(DataError, match="1 names but .* has 2 class folders"):
        build_folder_train_set(tmp_path / "train", image_size=32, classnames_file=tmp_path / "names.txt")
    with pytest.raises(DataError, match="no such folder"):
        build_folder_train_set(tmp_path / "missing", image_size=32)


def test_imagenet_train_holdout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected train/"):
        build_imagenet_train(tmp_path, image_size=32)
    make_fake_imagenet(tmp_path, classes=3, per_class=4, split="train", hardlink=True)
    split = build_imagenet_train(tmp_path, image_size=32, n_holdout=3, seed=1)
    assert len(split.train) == 9 and len(split.holdout.dataset) == 3
    assert sorted(split.holdout.dataset.targets()) == sorted({t for t in split.train.targets()})
    assert split.holdout.dataset[2][2] == 2 and len(split.classnames) == 1000

"""Layout checks: present / complete / partial / foreign trees, and the summary table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from robustft.data.layouts import LAYOUTS, check_layout, format_layout_table
from robustft.data.testing import make_fake_imagenet, make_fake_imagenet_a, make_fake_objectnet
from robustft.errors import DataError


def test_complete_imagenet_a(tmp_path: Path) -> None:
    # 200 folders x 38 hard-linked images = 7600 >= the official 7500.
    make_fake_imagenet_a(tmp_path, classes=None, per_class=38, hardlink=True)
    report = check_layout("imagenet-a", tmp_path)
    assert report.present and report.complete, report.problems
    assert (report.found_classes, report.expected_classes) == (200, 200)
    assert report.found_images == 7600 and report.expected_images == 7500
    assert any("more images" in n for n in report.notes)


def test_partial_tree_is_incomplete(tmp_path: Path) -> None:
    make_fake_imagenet_a(tmp_path, classes=4, per_class=1)
    report = check_layout("imagenet-a", tmp_path)
    assert report.present and not report.complete
    assert (report.found_classes, report.found_images) == (4, 4)
    assert any("expected 200 class folders" in p and "found 4" in p for p in report.problems)
    assert any("expected 7500 images, found 4" in p for p in report.problems)


def test_missing_and_foreign(tmp_path: Path) -> None:
    report = check_layout("imagenet-r", tmp_path)
    assert not report.present and not report.complete and "found no such folder" in report.problems[0]
    make_fake_imagenet(tmp_path, classes=2, per_class=1)
    (tmp_path / "imagenet" / "val" / "n99999999").mkdir()
    report = check_layout("imagenet", tmp_path)
    assert report.present and not report.complete and "n99999999" in report.problems[0]
    assert any("no train/" in n for n in report.notes)


def test_objectnet_partial_download(tmp_path: Path) -> None:
    make_fake_objectnet(tmp_path, classes=["alarm_clock", "banana", "squeegee"], per_class=1)
    report = check_layout("objectnet", tmp_path)
    assert report.present and not report.complete
    assert (report.found_classes, report.expected_classes, report.found_images) == (2, 8, 2)
    assert any("chair" in p for p in report.problems)


def test_objectnet_broken_mapping_is_reported(tmp_path: Path) -> None:
    base = make_fake_objectnet(tmp_path, classes=["banana"], per_class=1)
    (base / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps(["not", "a", "dict"]))
    report = check_layout("objectnet", tmp_path)
    assert report.present and not report.complete and "JSON object" in report.problems[0]
    shutil.rmtree(base / "mappings")
    assert "folder_to_objectnet_label.json" in check_layout("objectnet", tmp_path).problems[0]


def test_table_lists_every_dataset(tmp_path: Path) -> None:
    make_fake_imagenet_a(tmp_path, classes=2, per_class=1)
    table = format_layout_table([check_layout(name, tmp_path) for name in LAYOUTS.names()])
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["dataset", "status", "classes", "images"]
    rows = {line.split()[0]: line.split()[1] for line in lines[1:7]}
    assert rows == {"imagenet": "missing", "imagenet-v2": "missing", "imagenet-r": "missing",
                    "imagenet-sketch": "missing", "imagenet-a": "incomplete", "objectnet": "missing"}
    assert "2/200" in table and "2/7500" in table


def test_unknown_name() -> None:
    with pytest.raises(DataError, match="did you mean 'objectnet'"):
        check_layout("objectnett", "/tmp")


def test_flat_imagenet_val_gets_a_sorting_hint(tmp_path: Path) -> None:
    from robustft.data.datasets import build_eval_set
    from robustft.data.testing import write_image

    write_image(tmp_path / "imagenet" / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match="found no class folders; it holds images directly"):
        build_eval_set("imagenet", tmp_path, image_size=32)


def test_describe_layouts_names_each_archive_folder() -> None:
    from robustft.data.layouts import describe_layouts

    text = describe_layouts("/data")
    for folder in ("/data/imagenet/", "/data/imagenetv2-matched-frequency-format-val/", "/data/imagenet-r/",
                   "/data/sketch/", "/data/imagenet-a/", "/data/objectnet-1.0/"):
        assert folder in text

"""Image folders, transforms and the handling of unreadable images."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from robustft.data.folder import (
    BadImageTracker,
    ImageFolderDataset,
    IndexedSubset,
    check_bad_fraction,
    collate_skip_bad,
)
from robustft.data.testing import make_image_folder, write_corrupt_image, write_image
from robustft.data.transforms import build_transform
from robustft.errors import ConfigError, DataError

TF = build_transform(32)


def test_labels_follow_the_given_class_order(tmp_path: Path) -> None:
    make_image_folder(tmp_path, ["apple", "zebra"], per_class=2)
    ds = ImageFolderDataset(tmp_path, ["zebra", "apple"], TF)
    assert len(ds) == 4
    for i in range(len(ds)):
        image, label, index = ds[i]
        assert index == i
        assert Path(ds.samples[i][0]).parent.name == ["zebra", "apple"][label]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert ds.targets() == [0, 0, 1, 1]


def test_missing_class_folder_is_an_error_unless_allowed(tmp_path: Path) -> None:
    make_image_folder(tmp_path, ["a"], per_class=1)
    with pytest.raises(DataError, match="missing.*b"):
        ImageFolderDataset(tmp_path, ["a", "b"], TF)
    assert len(ImageFolderDataset(tmp_path, ["a", "b"], TF, allow_missing=True)) == 1


def test_transform_resizes_shorter_side_then_center_crops(tmp_path: Path) -> None:
    img = Image.new("RGB", (80, 40), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 10, 40))  # a black band on the left, cropped away
    out = build_transform(32)(img)
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-3)
    aug = build_transform(32, train_augment=True)(img)
    assert aug.shape == (3, 32, 32)


@pytest.mark.parametrize("kwargs", [{"image_size": 0}, {"image_size": 32, "interpolation": "cubic"},
                                    {"image_size": 32, "train_augment": True, "crop_scale": (0.5, 2.0)}])
def test_transform_bad_options(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        build_transform(**kwargs)


def test_border_crop_removes_the_red_frame(tmp_path: Path) -> None:
    write_image(tmp_path / "c" / "x.png", size=40, border=2)
    tf = build_transform(36)  # 40 - 2 * 2: no resampling, so edge pixels are the image's own

    def redness(ds: ImageFolderDataset) -> float:
        image = ds[0][0]
        edge = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
        return float((edge[0] - edge[1:].mean(0)).max())

    assert redness(ImageFolderDataset(tmp_path, ["c"], tf)) > 0.9
    assert redness(ImageFolderDataset(tmp_path, ["c"], tf, crop_border=2)) < 0.5


@pytest.fixture()
def bad_folder(tmp_path: Path) -> Path:
    make_image_folder(tmp_path, ["a", "b"], per_class=3)
    write_corrupt_image(tmp_path / "a" / "trunc.jpg", "truncated")
    write_corrupt_image(tmp_path / "b" / "junk.png", "garbage")
    write_corrupt_image(tmp_path / "b" / "zero.jpg", "empty")
    return tmp_path


def test_unreadable_images_are_skipped_and_counted(bad_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = ImageFolderDataset(bad_folder, ["a", "b"], TF)
    assert len(ds) == 9
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_skip_bad)
    tracker = BadImageTracker()
    seen: list[int] = []
    with caplog.at_level(logging.WARNING):
        for batch in loader:
            tracker.update(batch)
            assert batch["image"].shape[0] == batch["label"].shape[0] == batch["index"].shape[0]
            seen += batch["index"].tolist()
    assert (tracker.n_good, tracker.n_bad) == (6, 3)
    assert sorted(Path(p).name for p in ds.bad_paths()) == ["junk.png", "trunc.jpg", "zero.jpg"]
    assert len(seen) == 6 and not {ds.samples[i][0] for i in seen} & set(ds.bad_paths())
    assert "trunc.jpg" in caplog.text
    with pytest.raises(DataError, match=r"3 of 9 images unreadable.*trunc\.jpg.*junk\.png"):
        tracker.check(0.001, ds, what="toy")
    tracker.check(0.5, ds)  # under the limit: only a warning


def test_bad_flags_set_in_worker_processes_reach_the_main_process(bad_folder: Path) -> None:
    ds = ImageFolderDataset(bad_folder, ["a", "b"], TF)
    loader = DataLoader(ds, batch_size=5, num_workers=1, collate_fn=collate_skip_bad)
    assert sum(batch["n_bad"] for batch in loader) == 3
    assert len(ds.bad_paths()) == 3


def test_all_bad_batch_is_empty_not_an_error() -> None:
    batch = collate_skip_bad([None, None])
    assert batch["n_bad"] == 2 and batch["image"].shape[0] == 0 and batch["label"].dtype == torch.long


def test_check_bad_fraction_threshold() -> None:
    check_bad_fraction(1, 1000, 0.001, ["x.jpg"])  # exactly at the limit is allowed
    with pytest.raises(DataError, match="x.jpg, y.jpg"):
        check_bad_fraction(2, 1000, 0.001, ["x.jpg", "y.jpg"])
    with pytest.raises(DataError, match="fraction"):
        check_bad_fraction(0, 10, 1.5)


def test_subset_reindexes_and_shares_flags(bad_folder: Path) -> None:
    ds = ImageFolderDataset(bad_folder, ["a", "b"], TF)
    trunc = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("trunc.jpg"))
    sub = IndexedSubset(ds.with_transform(build_transform(16)), [trunc, 0])
    assert sub[0] is None and sub[1][2] == 1 and sub[1][0].shape == (3, 16, 16)
    assert [Path(p).name for p in sub.bad_paths()] == ["trunc.jpg"]
    assert [Path(p).name for p in ds.bad_paths()] == ["trunc.jpg"]

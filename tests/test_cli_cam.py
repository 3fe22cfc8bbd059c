"""`robustft cam`: the npz export and its PNG grid, on the tiny model and fake images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustft.cli import main
from robustft.data.testing import make_image_folder

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def zeroshot_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cam")
    names = root / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    out = root / "zs"
    assert main(["zeroshot", "--model", "robustft-tiny", "--pretrained", "none", "--classnames", str(names),
                 "--templates", "simple", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    make_image_folder(root, CLASSES, 3)
    return root


def _export(run: Path, images: Path, out: Path, masking: str, *extra: str) -> dict[str, np.ndarray]:
    assert main(["cam", "--run", str(run), "--images", str(images), "--masking", masking, "--out", str(out),
                 "--seed", "3", *extra]) == 0
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def test_single_fill_export_follows_the_fill_rule(zeroshot_run: Path, images: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    d = _export(zeroshot_run, images, tmp_path / "c.npz", "ObjMaskSingleFill(0.3)", "--grid", str(grid))
    n, _, h, w = d["images"].shape
    gh, gw = d["cam"].shape[1:]
    patch = int(d["patch_size"])
    assert (gh * patch, gw * patch) == (h, w) and n == 9
    assert d["labels"].tolist().count(0) == 3 and set(d["labels"].tolist()) == {0, 1, 2}
    assert np.all(d["cam_raw"] >= 0)
    np.testing.assert_allclose(d["cam"], d["cam_raw"] / (d["cam_raw"].reshape(n, -1).max(1)[:, None, None] + 1e-8),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(d["mask"], d["cam"] > 0.3)  # Obj: strictly above the threshold
    assert d["donors"].shape == (n,) and sorted(d["donors"].tolist()) == list(range(n))
    for i in range(n):
        for r in range(gh):
            for c in range(gw):
                sl = (slice(None), slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch))
                src = d["images"][d["donors"][i]] if d["mask"][i, r, c] else d["images"][i]
                np.testing.assert_array_equal(d["counterfactual"][i][sl], src[sl])
    with Image.open(grid) as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_multi_fill_donors_are_per_patch_and_never_self(zeroshot_run: Path, images: Path, tmp_path: Path) -> None:
    d = _export(zeroshot_run, images, tmp_path / "m.npz", "RandMaskMultiFill(0.5)")
    n = len(d["images"])
    assert d["donors"].shape == (n, *d["mask"].shape[1:])
    assert np.all(d["donors"] != np.arange(n)[:, None, None])
    assert 0.2 < d["mask"].mean() < 0.8


def test_nofill_export_has_no_donors_and_greys_removed_patches(zeroshot_run: Path, images: Path,
                                                               tmp_path: Path) -> None:
    d = _export(zeroshot_run, images, tmp_path / "n.npz", "CtxMaskNoFill(0.6)")
    assert "donors" not in d
    patch = int(d["patch_size"])
    i, r, c = np.argwhere(d["mask"])[0]
    block = d["counterfactual"][i][:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
    assert np.all(block == 0.5)
    np.testing.assert_array_equal(d["mask"], d["cam"] <= 0.6)  # Ctx: at or below the threshold


def test_same_seed_same_export(zeroshot_run: Path, images: Path, tmp_path: Path) -> None:
    a = _export(zeroshot_run, images, tmp_path / "a.npz", "RandMaskSingleFill(0.5)")
    b = _export(zeroshot_run, images, tmp_path / "b.npz", "RandMaskSingleFill(0.5)")
    np.testing.assert_array_equal(a["mask"], b["mask"])
    np.testing.assert_array_equal(a["donors"], b["donors"])


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--masking", "ObjMaskTripleFill(0.3)"], "unknown masking"),
        (["--masking", "ObjMaskSingleFill(1.5)"], "1.5"),
        (["--out", "x.txt"], ".npz"),
    ],
)
def test_cam_bad_input_is_one_line_exit_2(zeroshot_run: Path, images: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], args: list[str], phrase: str) -> None:
    base = {"--masking": "ObjMaskSingleFill(0.3)", "--out": str(tmp_path / "o.npz")}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["cam", "--run", str(zeroshot_run), "--images", str(images)] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert phrase.lower() in err.lower() and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.npz").exists()


def test_cam_rejects_folders_that_are_not_classes_of_the_run(zeroshot_run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    make_image_folder(tmp_path / "imgs", ["zebra"], 1)
    assert main(["cam", "--run", str(zeroshot_run), "--images", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "o.npz")]) == 2
    assert "zebra" in capsys.readouterr().err

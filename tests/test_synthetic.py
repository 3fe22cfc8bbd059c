"""Tests of the synthetic distribution-shift world (robustft.data.synthetic)."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from robustft.data import synthetic as syn
from robustft.errors import ConfigError, DataError

SMALL = syn.WorldConfig(n_train=24, n_test=12)


def test_same_seed_same_pixels_and_other_seed_differs() -> None:
    a = syn.make_split(SMALL, "train", n=16, seed=3)
    b = syn.make_split(SMALL, "train", n=16, seed=3)
    c = syn.make_split(SMALL, "train", n=16, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    pa, ca = syn.make_pretraining_pairs(SMALL, 8, seed=1)
    pb, cb = syn.make_pretraining_pairs(SMALL, 8, seed=1)
    pc, _ = syn.make_pretraining_pairs(SMALL, 8, seed=2)
    np.testing.assert_array_equal(pa, pb)
    assert ca == cb and not np.array_equal(pa, pc)


def test_default_split_seeds_differ_between_splits() -> None:
    assert not np.array_equal(syn.make_split(SMALL, "id").images, syn.make_split(SMALL, "shuffled").images)
    assert not np.array_equal(syn.make_split(SMALL, "train", n=12).images, syn.make_split(SMALL, "id").images)


@pytest.mark.parametrize("split", syn.SPLITS)
def test_split_shapes_dtypes_and_balanced_labels(split: str) -> None:
    data = syn.make_split(SMALL, split, n=30)
    assert data.images.shape == (30, 64, 64, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(data.labels, minlength=6), np.full(6, 5))


def test_default_split_sizes_follow_the_config() -> None:
    assert len(syn.make_split(SMALL, "train").labels) == 24
    assert len(syn.make_split(SMALL, "swapped").labels) == 12


def test_pretraining_pairs_shapes_and_captions_name_the_class() -> None:
    cfg = dataclasses.replace(SMALL, pretrain_sketch_frac=0.5, pretrain_plain_frac=0.5)
    images, captions = syn.make_pretraining_pairs(cfg, 200, seed=0)
    assert images.shape == (200, 64, 64, 3) and images.dtype == np.uint8 and len(captions) == 200
    for cap in captions:
        named = [c for c in cfg.classes if f" {c} " in f" {cap} "]
        assert len(named) == 1, cap
        assert any(f" {s} " in f" {cap} " for s in cfg.shapes), cap
        assert cap.endswith(" background")
    assert any(cap.startswith("a sketch of ") for cap in captions)
    assert any(" plain background" in cap for cap in captions)
    colours = {c for cap in captions for c in cfg.classes if f" {c} " in f" {cap} "}
    assert colours == set(cfg.classes)


def _own(cfg: syn.WorldConfig) -> np.ndarray:
    return np.array([syn.TEXTURES.index(t) for t in cfg.textures[: len(cfg.classes)]])


@pytest.mark.parametrize("rho", [0.97, 0.5])
def test_train_split_rho_statistic(rho: float) -> None:
    cfg = dataclasses.replace(SMALL, rho=rho)
    labels, factors = syn.sample_split(cfg, "train", n=3000, seed=0)
    own = _own(cfg)
    assert abs(np.mean(factors.texture == own[labels]) - rho) < 0.03
    # The remaining images use other CLASS textures, never the held-out (novel) ones.
    assert np.isin(factors.texture, own).all()


def test_shift_defining_properties() -> None:
    own = _own(SMALL)
    labels, factors = syn.sample_split(SMALL, "swapped", n=600)
    assert np.isin(factors.texture, own).all() and not np.any(factors.texture == own[labels])
    labels, factors = syn.sample_split(SMALL, "shuffled", n=1200)
    assert np.isin(factors.texture, own).all()
    assert abs(np.mean(factors.texture == own[labels]) - 1 / 6) < 0.04
    _, factors = syn.sample_split(SMALL, "novel", n=300)
    assert np.isin(factors.texture, [syn.TEXTURES.index(t) for t in SMALL.textures[6:]]).all()
    _, factors = syn.sample_split(SMALL, "sketch", n=50)
    assert factors.layers[-1].outline.all()
    for split in ("train", "id", "shuffled", "swapped", "novel", "clutter"):
        assert not syn.sample_split(SMALL, split, n=20)[1].layers[-1].outline.any()
    # sample_split draws exactly what make_split renders.
    data = syn.make_split(SMALL, "swapped", n=60)
    np.testing.assert_array_equal(data.factors.texture, syn.sample_split(SMALL, "swapped", n=60)[1].texture)


def test_clutter_has_achromatic_distractors_under_the_object() -> None:
    _, factors = syn.sample_split(SMALL, "clutter", n=200)
    *distractors, target = factors.layers
    present = np.stack([d.shape >= 0 for d in distractors]).sum(0)
    assert present.min() == SMALL.distractors[0] and present.max() == SMALL.distractors[1]
    for d in distractors:
        assert np.allclose(d.rgb[:, 0], d.rgb[:, 1]) and np.allclose(d.rgb[:, 1], d.rgb[:, 2])
    assert (target.shape >= 0).all()
    assert len(syn.sample_split(SMALL, "id", n=5)[1].layers) == 1


def _one_object_scene(outline: bool) -> syn.SceneFactors:
    layer = syn.ObjectLayer(shape=np.array([0]), cx=np.array([32.0]), cy=np.array([32.0]), radius=np.array([20.0]),
                            rgb=np.array([[1.0, 0.0, 0.0]]), opacity=np.array([1.0]), outline=np.array([outline]),
                            line_width=np.array([2.0]))
    return syn.SceneFactors(texture=np.array([syn.PLAIN]), period=np.array([8.0]), phase=np.zeros((1, 2)),
                            levels=np.array([[0.5, 0.5]]), tint=np.ones((1, 3)), noise_seed=np.zeros(1, np.uint32),
                            layers=(layer,))


def test_render_filled_vs_outline_pixels() -> None:
    filled = syn.render(_one_object_scene(False), 64)[0]
    outline = syn.render(_one_object_scene(True), 64)[0]
    grey = round(0.5 * 255)
    assert abs(int(filled[0, 0, 0]) - grey) <= 1 and filled[0, 0, 0] == filled[0, 0, 2]  # plain grey corner
    np.testing.assert_array_equal(filled[32, 32], [255, 0, 0])  # solid object colour inside
    assert abs(int(outline[32, 32, 0]) - grey) <= 1  # outline: the inside shows the background
    np.testing.assert_array_equal(outline[32, 12], [255, 0, 0])  # ... and the rim (radius 20) is red
    coloured = lambda img: np.sum(img[..., 0].astype(int) - img[..., 2] > 100)  # noqa: E731
    assert coloured(outline) < coloured(filled) / 4


def test_every_texture_and_shape_renders_distinctly() -> None:
    n = len(syn.TEXTURES)
    base = _one_object_scene(False)
    bg = dataclasses.replace(base, texture=np.arange(n), period=np.full(n, 8.0), phase=np.full((n, 2), 0.3),
                             levels=np.tile([[0.0, 1.0]], (n, 1)), tint=np.ones((n, 3)),
                             noise_seed=np.arange(n, dtype=np.uint32), layers=())
    imgs = syn.render(bg, 64).astype(int)
    assert all(img.std() > 40 for img in imgs)  # bold patterns
    assert len({img.tobytes() for img in imgs}) == n
    shapes = [dataclasses.replace(base.layers[0], shape=np.array([k])) for k in range(len(syn.SHAPES))]
    masks = [syn.render(dataclasses.replace(base, layers=(s,)), 64)[0, ..., 2] < 60 for s in shapes]
    assert len({m.tobytes() for m in masks}) == len(syn.SHAPES)


def test_config_validation_names_the_bad_value() -> None:
    with pytest.raises(ConfigError, match="'redd'.*did you mean 'red'"):
        syn.WorldConfig(classes=("redd", "green"))
    with pytest.raises(ConfigError, match="more textures"):
        syn.WorldConfig(textures=syn.TEXTURES[:6])
    with pytest.raises(ConfigError, match="rho"):
        syn.WorldConfig(rho=1.5)
    with pytest.raises(DataError, match="unknown split 'sketches'"):
        syn.make_split(SMALL, "sketches")


def test_config_key_changes_with_any_knob() -> None:
    assert SMALL.key() == syn.WorldConfig(n_train=24, n_test=12).key()
    assert SMALL.key() != dataclasses.replace(SMALL, rho=0.9).key()


def test_write_world_imagefolder_tree_and_cache(tmp_path, monkeypatch) -> None:
    cfg = syn.WorldConfig(n_train=12, n_test=6, seed=5)
    paths = syn.write_world(cfg, tmp_path / "w")
    assert set(paths.splits) == set(syn.SPLITS)
    for split, root in paths.splits.items():
        assert sorted(p.name for p in root.iterdir()) == sorted(cfg.classes)
        files = sorted(root.glob("*/*.png"))
        assert len(files) == (12 if split == "train" else 6)
    # classnames.txt is in label order (sorted class folders), so it can serve as data.classnames.
    assert paths.classnames.read_text().split() == sorted(cfg.classes) != list(cfg.classes)
    from robustft.data.datasets import build_folder_train_set

    dataset, names = build_folder_train_set(paths.splits["train"], image_size=64, classnames_file=paths.classnames)
    assert names == dataset.classes == sorted(cfg.classes)
    assert json.loads(paths.world_json.read_text())["classnames"] == names
    templates = paths.templates.read_text().splitlines()
    assert templates and all(t.count("{}") == 1 for t in templates)
    meta = json.loads(paths.world_json.read_text())
    assert meta["version"] == syn.WORLD_VERSION and meta["config"]["seed"] == 5
    # The PNGs hold exactly the generated pixels, under their class folders.
    from PIL import Image

    data = syn.make_split(cfg, "swapped")
    first = np.asarray(Image.open(paths.splits["swapped"] / cfg.classes[data.labels[0]] / "00000.png"))
    np.testing.assert_array_equal(first, data.images[0])

    calls = []
    monkeypatch.setattr(syn, "make_split", lambda *a, **k: calls.append(a) or pytest.fail("regenerated"))
    assert syn.write_world(cfg, tmp_path / "w") == paths and not calls


def test_write_world_rewrites_on_new_config_and_refuses_foreign_folders(tmp_path) -> None:
    syn.write_world(syn.WorldConfig(n_train=6, n_test=6), tmp_path / "w")
    paths = syn.write_world(syn.WorldConfig(n_train=12, n_test=6), tmp_path / "w")
    assert len(list(paths.splits["train"].glob("*/*.png"))) == 12
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        syn.write_world(SMALL, tmp_path / "other")


def test_default_cache_dir_honours_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("ROBUSTFT_CACHE", str(tmp_path))
    assert syn.default_cache_dir() == tmp_path
    monkeypatch.delenv("ROBUSTFT_CACHE")
    assert syn.default_cache_dir().parts[-2:] == (".cache", "robustft")


def test_generation_speed_is_reported(record_property) -> None:
    start = time.perf_counter()
    syn.make_pretraining_pairs(SMALL, 500, seed=0)
    per_image_ms = (time.perf_counter() - start) / 500 * 1e3
    record_property("ms_per_image", per_image_ms)
    print(f"synthetic world: {per_image_ms:.3f} ms per 64x64 image")


def test_interrupted_write_leaves_no_half_world(tmp_path, monkeypatch) -> None:
    cfg = syn.WorldConfig(n_train=6, n_test=6)
    real = syn.make_split

    def failing(c, split, *a, **k):
        if split == "sketch":
            raise KeyboardInterrupt
        return real(c, split, *a, **k)

    monkeypatch.setattr(syn, "make_split", failing)
    with pytest.raises(KeyboardInterrupt):
        syn.write_world(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    monkeypatch.setattr(syn, "make_split", real)
    paths = syn.write_world(cfg, tmp_path / "w")
    assert paths.world_json.is_file() and len(list(paths.splits["sketch"].glob("*/*.png"))) == 6

"""The knobs FLYP's recipe needs: warm-up in steps, and the training crop's area range and flip.

``optim.warmup_steps`` (> 0 replaces the ``optim.warmup`` fraction), ``data.augment_crop_scale``
and ``data.augment_flip``: validated in the config, carried into the trainer's schedule and
the training transform, and with defaults that leave every existing run as it was.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from robustft.config import build_config
from robustft.data.datasets import build_imagenet_train
from robustft.data.testing import make_fake_imagenet, make_image_folder
from robustft.data.transforms import build_transform
from robustft.engine import TrainSettings, build_optimizer, build_scheduler, default_param_groups, fit
from robustft.errors import ConfigError
from robustft.pipeline.data import build_run_data
from robustft.pipeline.train import stage_settings
from test_engine_trainer import ToyMethod, settings, toy_loader, train_records

PEAK = 1e-5


# ----------------------------------------------------------------------------- warm-up in steps
def _trace(name: str, total: int, frac: float, steps: int | None) -> list[tuple[float, float, float]]:
    """(lr, beta1, beta2) in force at each optimizer step 0..total-1 (``steps`` None: not passed)."""
    opt = build_optimizer(default_param_groups(nn.Linear(3, 2), 0.1), lr=PEAK, weight_decay=0.1)
    sched = (build_scheduler(opt, name, total, frac) if steps is None
             else build_scheduler(opt, name, total, frac, steps))
    out = []
    for _ in range(total):
        group = opt.param_groups[0]
        out.append((group["lr"], *group["betas"]))
        opt.step()
        sched.step()  # after the last step too, as the trainer does
    return out


def test_cosine_warms_up_for_exactly_warmup_steps_then_decays_to_zero_with_fixed_betas() -> None:
    trace = _trace("cosine", 20, 0.5, 5)  # the fraction (10 steps) is replaced by 5 steps
    lrs = [lr for lr, _, _ in trace]
    assert lrs[:5] == pytest.approx([PEAK * k / 5 for k in range(1, 6)])
    assert lrs[5] == pytest.approx(PEAK)
    assert lrs[12] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert lrs[-1] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * 14 / 15)))
    assert {(b1, b2) for _, b1, b2 in trace} == {(0.9, 0.999)}  # FLYP's betas, never cycled
    assert _trace("cosine", 20, 0.0, 5) == trace


def test_constant_warms_up_for_warmup_steps() -> None:
    assert [lr for lr, _, _ in _trace("constant", 8, 0.02, 4)] == pytest.approx(
        [PEAK / 4, PEAK / 2, PEAK * 3 / 4, PEAK, PEAK, PEAK, PEAK, PEAK])


def test_onecycle_warmup_steps_set_pct_start_and_the_peak_step() -> None:
    by_steps = _trace("onecycle", 100, 0.02, 10)
    assert by_steps == _trace("onecycle", 100, 0.1, 0)  # pct_start = 10 / 100
    lrs = [lr for lr, _, _ in by_steps]
    assert lrs.index(max(lrs)) == 9 and max(lrs) == pytest.approx(PEAK)
    assert {round(b1, 9) for _, b1, _ in by_steps} >= {0.95, 0.85}  # one-cycle still cycles beta1


def test_warmup_steps_zero_keeps_the_fraction() -> None:
    for name in ("onecycle", "cosine", "constant"):
        assert _trace(name, 30, 0.2, 0) == _trace(name, 30, 0.2, None)
    assert [lr for lr, _, _ in _trace("cosine", 30, 0.2, 0)][5] == pytest.approx(PEAK)  # round(0.2 * 30) = 6 steps
    assert TrainSettings().warmup_steps == 0


def test_a_warmup_longer_than_the_run() -> None:
    # cosine: still warming up at the end, as FLYP's schedule would be.
    assert [lr for lr, _, _ in _trace("cosine", 4, 0.0, 10)] == pytest.approx([PEAK * k / 10 for k in (1, 2, 3, 4)])
    # onecycle: rises until the step before last and completes (pct_start 1 would fail at the end).
    lrs = [lr for lr, _, _ in _trace("onecycle", 5, 0.0, 10)]
    assert lrs.index(max(lrs)) == 3 and lrs[-1] < lrs[3]
    assert len(_trace("onecycle", 5, 1.0, 0)) == 5  # a warm-up fraction of 1 completes too


@pytest.mark.parametrize("bad", [-1, 1.5, True, "500"])
def test_bad_warmup_steps_are_refused(bad: object) -> None:
    opt = build_optimizer(default_param_groups(nn.Linear(3, 2), 0.1), lr=PEAK, weight_decay=0.1)
    with pytest.raises(ConfigError, match="warm-up steps"):
        build_scheduler(opt, "cosine", 10, 0.0, bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainSettings(warmup_steps=bad)  # type: ignore[arg-type]


def test_config_warmup_steps_reach_every_stage_and_are_checked() -> None:
    assert build_config().optim.warmup_steps == 0
    stages = stage_settings(build_config("paper-vit-b32-lp-ft", ["optim.warmup_steps=500"]))
    assert [(name, s.warmup_steps) for name, s in stages] == [("lp", 500), ("ft", 500)]
    assert [s.warmup_steps for _, s in stage_settings(build_config("paper-vit-b32"))] == [0]
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: -1 is out of range; valid: >= 0"):
        build_config(None, ["optim.warmup_steps=-1"])
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: expected an integer"):
        build_config(None, ["optim.warmup_steps=2.5"])


def test_fit_trains_with_the_warmup_steps(tmp_path: Path) -> None:
    # 24 images / 4 per batch = 6 steps per epoch, 12 in all; 3 warm-up steps instead of 0.2 * 12.
    fit(ToyMethod(), toy_loader(4), settings(schedule="cosine", warmup_frac=0.2, warmup_steps=3, lr=PEAK),
        run_dir=tmp_path, progress=False)
    train = [r for r in train_records(tmp_path) if r["kind"] == "train"]
    # Each record shows the lr after its step's schedule step: factor(k) at step k = 1..12.
    expected = [PEAK * min(1.0, (k + 1) / 3) if k < 3 else PEAK * 0.5 * (1 + math.cos(math.pi * (k - 3) / 9))
                for k in range(1, 13)]
    assert [r["lr"] for r in train] == pytest.approx(expected)
    assert {r["beta1"] for r in train} == {0.9}


# ----------------------------------------------------------------------------- the training crop and flip
def _coordinates(width: int = 240, height: int = 180) -> Image.Image:
    """Red = x / width, green = y / height: the crop's box can be read off the output's corners."""
    x = torch.linspace(0, 1, width).expand(height, width)
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    rgb = torch.stack([x, y, torch.zeros_like(x)], dim=-1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy(), mode="RGB")


def _steps(tf: T.Compose) -> list[type]:
    return [type(step) for step in tf.transforms]


def test_flyp_transform_is_a_bicubic_random_crop_of_0_9_to_1_without_flip() -> None:
    tf = build_transform(224, train_augment=True, crop_scale=(0.9, 1.0), flip=False)
    assert _steps(tf) == [T.RandomResizedCrop, T.ToTensor]
    crop = tf.transforms[0]
    assert crop.scale == (0.9, 1.0) and crop.interpolation == InterpolationMode.BICUBIC and crop.size == (224, 224)
    # The defaults are unchanged: scale (0.08, 1) and a horizontal flip.
    default = build_transform(224, train_augment=True)
    assert _steps(default) == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor]
    assert default.transforms[0].scale == (0.08, 1.0)
    assert _steps(build_transform(224, flip=False)) == [T.Resize, T.CenterCrop, T.ToTensor]  # no augment: no flip


@pytest.mark.parametrize("flip", [False, True])
def test_no_flip_ever_and_crop_areas_stay_in_scale(flip: bool) -> None:
    image = _coordinates()
    tf = build_transform(32, train_augment=True, crop_scale=(0.9, 1.0), flip=flip)
    flips, areas = 0, []
    for seed in range(200):
        torch.manual_seed(seed)
        out = tf(image)
        left, right = out[0, :, 0].mean().item(), out[0, :, -1].mean().item()
        top, bottom = out[1, 0, :].mean().item(), out[1, -1, :].mean().item()
        flips += left > right
        areas.append(abs(right - left) * (bottom - top))
    if flip:
        assert 60 < flips < 140  # about half: the check does see flips
    else:
        assert flips == 0
    # Corner pixels sit half a pixel inside the box: allow for it, and for 8-bit rounding.
    assert min(areas) > 0.9 - 0.08 and max(areas) <= 1.0
    # The crop step itself never draws outside the scale.
    crop = tf.transforms[0]
    for _ in range(500):
        _, _, h, w = crop.get_params(image, crop.scale, crop.ratio)
        assert 0.9 * 240 * 180 - 240 <= h * w <= 240 * 180


@pytest.mark.parametrize("bad", [(0.0, 1.0), (0.9, 0.5), (0.5, 1.1), (0.9,)])
def test_bad_crop_scales_are_refused(bad: tuple) -> None:
    with pytest.raises(ConfigError, match="crop_scale"):
        build_transform(32, train_augment=True, crop_scale=bad)


@pytest.mark.parametrize(("value", "shown"), [("[0.9]", r"\[0\.9\]"), ("[1.0,0.5]", r"\[1\.0, 0\.5\]"),
                                              ("[0,1]", r"\[0\.0, 1\.0\]"), ("[0.5,1.5]", r"\[0\.5, 1\.5\]")])
def test_config_crop_scale_is_an_area_range(value: str, shown: str) -> None:
    with pytest.raises(ConfigError, match=rf"data\.augment_crop_scale: {shown} is not an area range; valid: "
                                          r"\[low, high\] with 0 < low <= high <= 1"):
        build_config(None, [f"data.augment_crop_scale={value}"])
    with pytest.raises(ConfigError, match=r"data\.augment_flip: expected true or false"):
        build_config(None, ["data.augment_flip=maybe"])
    cfg = build_config()
    assert (cfg.data.augment_crop_scale, cfg.data.augment_flip, cfg.data.train_augment) == ([0.08, 1.0], True, False)


def test_run_data_trains_with_the_configured_crop_and_flip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_image_folder(tmp_path / "train", ["cat", "dog"], per_class=3)
    base = ["data.train=folder", f"data.train_dir={tmp_path / 'train'}", "data.holdout=0"]
    cfg = build_config(None, [*base, "data.train_augment=true", "data.augment_crop_scale=[0.9,1.0]",
                              "data.augment_flip=false"])
    tf = build_run_data(cfg, 32).train.dataset.transform
    assert _steps(tf) == [T.RandomResizedCrop, T.ToTensor] and tf.transforms[0].scale == (0.9, 1.0)
    # Without train_augment the knobs are ignored, and the run says so.
    with caplog.at_level(logging.WARNING, logger="robustft.pipeline.data"):
        tf = build_run_data(build_config(None, [*base, "data.augment_flip=false"]), 32).train.dataset.transform
    assert _steps(tf) == [T.Resize, T.CenterCrop, T.ToTensor] and "are ignored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robustft.pipeline.data"):
        build_run_data(build_config(None, base), 32)
    assert "are ignored" not in caplog.text


def test_imagenet_training_images_use_the_crop_and_flip(tmp_path: Path) -> None:
    make_fake_imagenet(tmp_path, classes=2, per_class=3, split="train", hardlink=True)
    split = build_imagenet_train(tmp_path, image_size=32, n_holdout=2, train_augment=True, crop_scale=(0.9, 1.0),
                                 flip=False)
    tf = split.train.dataset.transform
    assert _steps(tf) == [T.RandomResizedCrop, T.ToTensor] and tf.transforms[0].scale == (0.9, 1.0)
    assert _steps(split.holdout.dataset.dataset.transform) == [T.Resize, T.CenterCrop, T.ToTensor]

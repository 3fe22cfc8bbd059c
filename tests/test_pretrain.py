"""Tests of the demo CLIP's contrastive pretraining and its cache (robustft.model.pretrain)."""

from __future__ import annotations

import dataclasses
import json

import open_clip
import pytest
import torch

from robustft.data.synthetic import WorldConfig
from robustft.errors import ConfigError
from robustft.model import pretrain as pt
from robustft.model.clip import load_clip

WORLD = WorldConfig(n_train=8, n_test=8)
MICRO = pt.PretrainSettings(steps=2, batch_size=6, lr=1e-3, warmup=1, eval_every=1, monitor_size=6, seed=3)


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_demo_architecture_is_a_standard_open_clip_config() -> None:
    pt._random_init(pt.DEMO_ARCH, 0, "cpu")  # registers the config if needed
    cfg = open_clip.get_model_config(pt.DEMO_ARCH)
    assert cfg["vision_cfg"]["image_size"] == WorldConfig().image_size
    assert cfg["text_cfg"]["context_length"] >= 16 and cfg["embed_dim"] == 128


def test_contrastive_loss_soft_targets_for_duplicate_captions() -> None:
    feats = torch.eye(3)
    scale = torch.tensor(10.0)
    assert pt._contrastive_loss(feats, feats, scale, ["a", "b", "c"]).item() < 0.01  # matched pairs
    # Texts with identical captions are interchangeable: swapping them leaves the loss as is,
    # whereas a hard one-hot target would punish the swap.
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    swapped = txt[[1, 0, 2, 3]]
    caps = ["a", "a", "b", "c"]
    assert torch.allclose(pt._contrastive_loss(img, txt, scale, caps), pt._contrastive_loss(img, swapped, scale, caps))
    distinct = ["a", "d", "b", "c"]
    assert not torch.allclose(pt._contrastive_loss(img, txt, scale, distinct),
                              pt._contrastive_loss(img, swapped, scale, distinct))


def test_pretrain_runs_and_reports_metrics() -> None:
    state, metrics = pt.pretrain_clip(WORLD, MICRO, progress=False)
    model = pt._random_init(pt.DEMO_ARCH, 0, "cpu").model
    assert set(state) == set(model.state_dict())
    assert [row["step"] for row in metrics["history"]] == [1, 2]
    assert set(metrics["zeroshot"]) == {"id", "pairs"} and all(0 <= v <= 1 for v in metrics["zeroshot"].values())
    assert metrics["logit_scale"] <= 100 and metrics["seconds"] > 0
    json.dumps(metrics)  # JSON-able
    init = pt._random_init(pt.DEMO_ARCH, MICRO.seed, "cpu").model.state_dict()
    assert not torch.equal(state["visual.proj"], init["visual.proj"])  # trained
    state2, _ = pt.pretrain_clip(WORLD, MICRO, progress=False)
    assert all(torch.equal(state[k], state2[k]) for k in state)  # deterministic from the seed


def test_pretrain_refuses_mismatched_image_size() -> None:
    with pytest.raises(ConfigError, match="image_size 32"):
        pt.pretrain_clip(dataclasses.replace(WORLD, image_size=32), MICRO, progress=False)


def test_load_or_pretrain_caches_and_second_call_does_not_train(tmp_path, monkeypatch) -> None:
    calls = []
    real = pt.pretrain_clip
    monkeypatch.setattr(pt, "pretrain_clip", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = pt.load_or_pretrain_demo_clip(WORLD, tmp_path, settings=MICRO, progress=False)
    assert len(calls) == 1
    folder = tmp_path / "pretrained" / pt.pretrain_cache_key(WORLD, MICRO)
    assert (folder / "model.safetensors").is_file() and (folder / "meta.json").is_file()
    assert first.pretrained == str(folder / "model.safetensors") and first.name == pt.DEMO_ARCH
    rng_state = torch.random.get_rng_state()
    second = pt.load_or_pretrain_demo_clip(WORLD, tmp_path, settings=MICRO, progress=False)
    assert len(calls) == 1  # loaded from the cache
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG did not move
    sd1, sd2 = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not second.model.training
    # The cached file is an ordinary open_clip weights file.
    again = load_clip(pt.DEMO_ARCH, second.pretrained)
    assert torch.equal(again.model.state_dict()["logit_scale"], sd1["logit_scale"])
    assert pt.read_pretrain_metrics(WORLD, MICRO, tmp_path)["history"][-1]["step"] == MICRO.steps


def test_cache_key_depends_on_world_and_settings() -> None:
    key = pt.pretrain_cache_key(WORLD, MICRO)
    assert key == pt.pretrain_cache_key(WorldConfig(n_train=8, n_test=8), dataclasses.replace(MICRO))
    assert key != pt.pretrain_cache_key(WORLD, dataclasses.replace(MICRO, steps=3))
    assert key != pt.pretrain_cache_key(dataclasses.replace(WORLD, tint_max=0.0), MICRO)
    # Fine-tuning knobs do not change the pretrained weights, so they do not invalidate the cache.
    assert key == pt.pretrain_cache_key(dataclasses.replace(WORLD, rho=0.5, finetune_opacity=(0.1, 0.2)), MICRO)


def test_settings_validation() -> None:
    with pytest.raises(ConfigError, match="steps"):
        pt.PretrainSettings(steps=0)

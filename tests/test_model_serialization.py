"""save_classifier / load_classifier: round trip, metadata, and refusal of mismatched files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import robustft
from robustft.errors import CheckpointError, ModelError
from robustft.model import (
    TINY_ARCH,
    ImageClassifier,
    PreprocessCfg,
    build_zeroshot_classifier,
    load_classifier,
    load_clip,
    save_classifier,
)
from robustft.safeio import load_tensors, save_tensors

NAMES = ["cat", "dog", "bird"]
TEMPLATES = ["a photo of a {}."]


@pytest.fixture()
def classifier() -> ImageClassifier:
    bundle = load_clip(TINY_ARCH)
    clf = build_zeroshot_classifier(bundle, NAMES, TEMPLATES, use_cache=False)
    with torch.no_grad():  # make it "trained": differ from any random init
        for p in clf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return clf


def _save(clf: ImageClassifier, run_dir: Path, **extra) -> Path:
    return save_classifier(
        clf,
        run_dir,
        model_name=TINY_ARCH,
        pretrained="none",
        classnames=NAMES,
        templates=TEMPLATES,
        extra=extra or None,
    )


def test_round_trip_predicts_identically(classifier, tmp_path: Path) -> None:
    meta_path = _save(classifier, tmp_path / "run", method="finetune", epochs=3)
    assert meta_path == tmp_path / "run" / "classifier.json"
    images = torch.rand(4, 3, 32, 32)
    classifier.eval()
    loaded, meta = load_classifier(tmp_path / "run")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images), classifier(images))
    assert meta["model_name"] == TINY_ARCH and meta["pretrained"] == "none"
    assert meta["classnames"] == NAMES and meta["templates"] == TEMPLATES
    assert meta["extra"] == {"method": "finetune", "epochs": 3}
    assert meta["robustft_version"] == robustft.__version__
    assert "git_sha" in meta and meta["format_version"] == 1
    assert PreprocessCfg.from_dict(meta["preprocess"]) == classifier.preprocess


@pytest.mark.parametrize("which", ["classifier.json", "classifier.safetensors"])
def test_load_from_either_file(classifier, tmp_path: Path, which: str) -> None:
    _save(classifier, tmp_path)
    loaded, _ = load_classifier(tmp_path / which)
    assert torch.equal(loaded.head.weight, classifier.head.weight.detach())


def test_tensor_file_uses_state_dict_names(classifier, tmp_path: Path) -> None:
    _save(classifier, tmp_path)
    tensors, meta = load_tensors(tmp_path / "classifier.safetensors")
    assert set(tensors) == set(classifier.state_dict())
    assert "head.weight" in tensors and "visual.conv1.weight" in tensors
    assert meta["format"] == "robustft-classifier"


def test_custom_preprocess_survives(tmp_path: Path) -> None:
    bundle = load_clip(TINY_ARCH)
    bundle.preprocess = PreprocessCfg(
        image_size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.3, 0.4), interpolation="bilinear"
    )
    clf = build_zeroshot_classifier(bundle, NAMES, TEMPLATES, use_cache=False)
    _save(clf, tmp_path)
    loaded, _ = load_classifier(tmp_path)
    assert loaded.preprocess == bundle.preprocess
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), clf.eval()(images))


def test_mismatched_tensors_are_all_listed(classifier, tmp_path: Path) -> None:
    _save(classifier, tmp_path)
    tensors, meta = load_tensors(tmp_path / "classifier.safetensors")
    tensors["head.weight"] = torch.zeros(5, 32)  # shape
    tensors["visual.proj"] = tensors["visual.proj"].to(torch.float16)  # dtype
    del tensors["visual.ln_post.bias"]  # missing
    tensors["visual.extra"] = torch.zeros(1)  # unexpected
    save_tensors(tmp_path / "classifier.safetensors", tensors, meta)
    with pytest.raises(CheckpointError) as info:
        load_classifier(tmp_path)
    message = str(info.value)
    for fragment in ("'head.weight'", "(5, 32)", "'visual.proj'", "float16", "missing tensor 'visual.ln_post.bias'",
                     "unexpected tensor 'visual.extra'"):
        assert fragment in message


def test_missing_and_incomplete_runs(classifier, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(tmp_path / "nothing-here")
    _save(classifier, tmp_path / "run")
    (tmp_path / "run" / "classifier.safetensors").unlink()
    with pytest.raises(CheckpointError, match="classifier.safetensors"):
        load_classifier(tmp_path / "run")


def test_foreign_or_newer_metadata(classifier, tmp_path: Path) -> None:
    _save(classifier, tmp_path)
    meta_path = tmp_path / "classifier.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="upgrade"):
        load_classifier(tmp_path)
    meta_path.write_text(json.dumps({"something": "else"}))
    with pytest.raises(CheckpointError, match="not a robustft classifier"):
        load_classifier(tmp_path)
    meta_path.write_text(json.dumps({**meta, "model_name": "no-such-arch"}))
    with pytest.raises(CheckpointError, match="no-such-arch"):
        load_classifier(tmp_path)


def test_classname_count_must_match_head(classifier, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="2 class names"):
        save_classifier(classifier, tmp_path, model_name=TINY_ARCH, pretrained="none", classnames=NAMES[:2],
                        templates=TEMPLATES)


def test_quick_gelu_models_reload_with_quick_gelu(tmp_path: Path) -> None:
    bundle = load_clip(TINY_ARCH, quick_gelu=True)
    assert type(bundle.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    clf = build_zeroshot_classifier(bundle, NAMES, TEMPLATES, use_cache=False)
    _save(clf, tmp_path)
    loaded, meta = load_classifier(tmp_path)
    assert meta["quick_gelu"] is True
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), clf.eval()(images))

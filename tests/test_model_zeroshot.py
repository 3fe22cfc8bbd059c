"""Zero-shot head: equality with open_clip's builder, unit rows, and the disk cache."""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import pytest
import torch

from robustft.errors import ConfigError
from robustft.model import TINY_ARCH, ClassifierHead, build_zeroshot_classifier, build_zeroshot_weights, load_clip
from robustft.model.zeroshot import default_cache_dir

CLASSNAMES = ["cat", "dog", "golden retriever", "red car", "tree", "boat", "apple"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]


@pytest.fixture()
def bundle():
    return load_clip(TINY_ARCH)


def _count_encode_calls(model, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = model.encode_text

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "encode_text", counting)
    return calls


def test_equals_open_clip_builder_times_logit_scale(bundle) -> None:
    reference = open_clip.build_zero_shot_classifier(
        bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, num_classes_per_batch=10, device="cpu"
    )  # [D, C]
    weights = build_zeroshot_weights(
        bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, batch_classes=3, use_cache=False, progress=False
    )
    assert weights.shape == (len(CLASSNAMES), 32)
    torch.testing.assert_close(weights, reference.T, rtol=1e-5, atol=1e-5)
    head = ClassifierHead.from_zeroshot(weights, bundle.model.logit_scale)
    expected = reference.T * bundle.model.logit_scale.exp()
    torch.testing.assert_close(head.weight.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(head.bias.detach(), torch.zeros(len(CLASSNAMES)))


def test_rows_are_unit_norm_and_batch_size_invariant(bundle) -> None:
    model, tok = bundle.model, bundle.tokenizer
    one = build_zeroshot_weights(model, tok, CLASSNAMES, TEMPLATES, batch_classes=1, use_cache=False)
    all_ = build_zeroshot_weights(model, tok, CLASSNAMES, TEMPLATES, batch_classes=100, use_cache=False)
    torch.testing.assert_close(one.norm(dim=-1), torch.ones(len(CLASSNAMES)))
    torch.testing.assert_close(one, all_, rtol=1e-5, atol=1e-6)


def test_single_template_is_normalised_embedding(bundle) -> None:
    weights = build_zeroshot_weights(bundle.model, bundle.tokenizer, ["cat"], ["a photo of a {}."], use_cache=False)
    with torch.no_grad():
        emb = bundle.model.encode_text(bundle.tokenizer(["a photo of a cat."]))
    torch.testing.assert_close(weights, emb / emb.norm(dim=-1, keepdim=True))


def test_cache_hit_skips_text_encoding(bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_encode_calls(bundle.model, monkeypatch)
    first = build_zeroshot_weights(bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    assert calls[0] > 0
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    calls[0] = 0
    second = build_zeroshot_weights(bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    assert calls[0] == 0
    assert torch.equal(first, second)


def test_cache_key_follows_text_weights_not_image_weights(
    bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_encode_calls(bundle.model, monkeypatch)
    build_zeroshot_weights(bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    with torch.no_grad():
        bundle.model.visual.proj.mul_(2.0)
    calls[0] = 0
    build_zeroshot_weights(bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    assert calls[0] == 0  # image tower changes do not affect W
    with torch.no_grad():
        bundle.model.text_projection.mul_(2.0)
    changed = build_zeroshot_weights(bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    assert calls[0] > 0
    fresh = build_zeroshot_weights(bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, use_cache=False)
    torch.testing.assert_close(changed, fresh)
    calls[0] = 0
    build_zeroshot_weights(bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES[:2], cache_dir=tmp_path)
    assert calls[0] > 0  # other templates: other entry


def test_corrupt_cache_entry_is_recomputed(
    bundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = build_zeroshot_weights(bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="robustft.model.zeroshot"):
        again = build_zeroshot_weights(bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, cache_dir=tmp_path)
    assert "recomputing" in caplog.text
    torch.testing.assert_close(first, again)


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTFT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "zeroshot"
    monkeypatch.delenv("ROBUSTFT_CACHE")
    assert default_cache_dir() == Path("~/.cache/robustft/zeroshot").expanduser()


def test_bad_inputs_raise_config_error(bundle) -> None:
    with pytest.raises(ConfigError, match="placeholder|exactly once"):
        build_zeroshot_weights(bundle.model, bundle.tokenizer, ["cat"], ["no placeholder"], use_cache=False)
    with pytest.raises(ConfigError, match="no class names"):
        build_zeroshot_weights(bundle.model, bundle.tokenizer, [], TEMPLATES, use_cache=False)


def test_build_zeroshot_classifier_from_specs(bundle, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n", encoding="utf-8")
    classifier = build_zeroshot_classifier(bundle, names, "simple", cache_dir=tmp_path)
    assert classifier.num_classes == 3
    assert classifier.visual is bundle.model.visual  # shared, as documented
    weights = build_zeroshot_weights(
        bundle.model, bundle.tokenizer, ["cat", "dog", "bird"], ["a photo of a {}."], use_cache=False
    )
    torch.testing.assert_close(classifier.head.weight.detach(), weights * bundle.model.logit_scale.exp().detach())

"""load_clip: architectures, weight sources (none / file / tag from the offline cache), errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import robustft.model.clip as clip_mod
from robustft.errors import ModelError
from robustft.model import TINY_ARCH, ClipBundle, list_architectures, load_clip


def test_tiny_architecture_is_registered_and_fast() -> None:
    assert TINY_ARCH in list_architectures()
    load_clip(TINY_ARCH)  # warm-up: first-time tokenizer vocabulary read
    start = time.perf_counter()
    bundle = load_clip(TINY_ARCH)
    assert time.perf_counter() - start < 1.0
    assert isinstance(bundle, ClipBundle)
    assert bundle.name == TINY_ARCH and bundle.pretrained == "none"
    assert bundle.preprocess.image_size == 32
    assert bundle.preprocess.interpolation == "bicubic"
    assert not bundle.model.training
    visual = bundle.model.visual
    assert visual.patch_size == (8, 8) and len(visual.transformer.resblocks) == 2
    assert visual.transformer.resblocks[0].attn.num_heads == 2


def test_tiny_model_encodes_images_and_text() -> None:
    bundle = load_clip(TINY_ARCH)
    tokens = bundle.tokenizer(["a photo of a cat.", "a dog"])
    assert tokens.shape == (2, 16)
    with torch.no_grad():
        text = bundle.model.encode_text(tokens)
        image = bundle.model.encode_image(torch.randn(3, 3, 32, 32))
    assert text.shape == (2, 32) and image.shape == (3, 32)


def test_slash_spelling_is_accepted() -> None:
    assert load_clip("robustft/tiny").name == TINY_ARCH


def test_unknown_architecture_suggests_close_names() -> None:
    with pytest.raises(ModelError, match="ViT-B-32") as info:
        load_clip("VIT-B-32")
    assert "unknown model architecture" in str(info.value)


def test_unknown_tag_lists_valid_tags() -> None:
    with pytest.raises(ModelError, match="openai") as info:
        load_clip("ViT-B-32", "opneai")
    assert "laion2b_s34b_b79k" in str(info.value)


def test_tag_on_model_without_tags() -> None:
    with pytest.raises(ModelError, match="no open_clip pretrained tags"):
        load_clip(TINY_ARCH, "openai")


def test_missing_tag_weights_fail_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    empty = tmp_path / "hf"
    empty.mkdir()
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache lives under ~/.cache/clip
    start = time.perf_counter()
    with pytest.raises(ModelError) as info:
        load_clip("ViT-B-32", "openai")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "timm/vit_base_patch32_clip_224.openai" in message  # what to obtain
    assert str(empty / "hub") in message  # where to put it
    assert "--pretrained" in message  # the alternative


def test_missing_tag_weights_with_explicit_cache_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="laion/CLIP-ViT-B-32-laion2B-s34B-b79K") as info:
        load_clip("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert str(tmp_path) in str(info.value)


def _fake_hf_cache(root: Path, repo: str, filename: str, state: dict[str, torch.Tensor]) -> None:
    """Lay out files exactly as huggingface_hub's cache does (refs/main -> snapshots/<rev>/)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / filename))


def test_tag_weights_found_in_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = load_clip(TINY_ARCH).model
    with torch.no_grad():
        source.visual.proj.mul_(3.0)
    _fake_hf_cache(tmp_path, "fake/tiny-clip", "open_clip_model.safetensors", source.state_dict())
    tag_cfg = {
        "hf_hub": "fake/tiny-clip/",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "interpolation": "bilinear",
        "resize_mode": "shortest",
        "quick_gelu": True,
    }
    monkeypatch.setattr(clip_mod, "get_pretrained_cfg", lambda arch, tag: tag_cfg if tag == "fake" else {})
    monkeypatch.setattr(clip_mod, "list_pretrained_tags_by_model", lambda arch: ["fake"])
    bundle = load_clip(TINY_ARCH, "fake", cache_dir=str(tmp_path))
    loaded = bundle.model.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    assert bundle.preprocess.mean == (0.5, 0.5, 0.5) and bundle.preprocess.std == (0.25, 0.25, 0.25)
    assert bundle.preprocess.interpolation == "bilinear"
    # The tag was trained with QuickGELU, so the model must run with it.
    mlp_act = bundle.model.visual.transformer.resblocks[0].mlp.gelu
    assert type(mlp_act).__name__ == "QuickGELU"


def test_local_safetensors_and_bin_files(tmp_path: Path) -> None:
    source = load_clip(TINY_ARCH).model
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.bin")
    for name in ("w.safetensors", "w.bin"):
        bundle = load_clip(TINY_ARCH, str(tmp_path / name))
        assert bundle.pretrained == str(tmp_path / name)
        for key, tensor in bundle.model.state_dict().items():
            assert torch.equal(tensor, state[key]), (name, key)


def test_missing_local_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nope.safetensors"):
        load_clip(TINY_ARCH, str(tmp_path / "nope.safetensors"))


def test_unreadable_or_mismatched_file_is_named(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="garbage.safetensors"):
        load_clip(TINY_ARCH, str(garbage))
    state = {k: v.contiguous() for k, v in load_clip(TINY_ARCH).model.state_dict().items()}
    state["visual.proj"] = torch.zeros(7, 7)
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong))
    with pytest.raises(ModelError, match="wrong.safetensors") as info:
        load_clip(TINY_ARCH, str(wrong))
    assert "does not fit" in str(info.value)

"""ImageClassifier, ClassifierHead and the ViT forward options against open_clip's own forward."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from robustft.errors import ModelError
from robustft.model import (
    TINY_ARCH,
    ClassifierHead,
    ImageClassifier,
    build_eval_transform,
    build_zeroshot_classifier,
    load_clip,
    predict,
)

B = 3


@pytest.fixture()
def bundle():
    return load_clip(TINY_ARCH)


@pytest.fixture()
def classifier(bundle) -> ImageClassifier:
    return build_zeroshot_classifier(bundle, ["cat", "dog", "bird", "car"], "simple", use_cache=False)


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(B, 3, 32, 32)


def _normalised(classifier: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(classifier.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(classifier.preprocess.std).view(1, 3, 1, 1)
    return (images - mean) / std


def _tokens_after_pos(visual, x: torch.Tensor) -> torch.Tensor:
    """Reference embedding written from open_clip's parameters: [B, 1 + N, W]."""
    patches = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    return torch.cat([cls, patches], dim=1) + visual.positional_embedding


def _reference_features(visual, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run open_clip's own Transformer on given tokens, then its pooling and projection."""
    out = visual.transformer(visual.ln_pre(tokens), attn_mask=attn_mask)
    return visual.ln_post(out)[:, 0] @ visual.proj


@pytest.mark.parametrize("train_mode", [False, True])
def test_plain_forward_equals_open_clip(bundle, classifier, images, train_mode: bool) -> None:
    classifier.train(train_mode)
    bundle.model.train(train_mode)
    with torch.no_grad():
        expected = bundle.model.encode_image(_normalised(classifier, images))
        features = classifier.forward_features(images).features
        logits = classifier(images)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    scale = bundle.model.logit_scale.exp()
    expected_logits = scale * F.normalize(expected, dim=-1) @ (classifier.head.weight / scale).T
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_forward_variants_agree(classifier, images) -> None:
    with torch.no_grad():
        logits = classifier(images)
        out = classifier.forward_features(images)
        both_logits, both_out = classifier.forward_with_features(images)
    torch.testing.assert_close(classifier.forward_head(out.features), logits)
    torch.testing.assert_close(both_logits, logits)
    torch.testing.assert_close(both_out.features, out.features)
    assert out.attn is None and out.ln1 is None


def test_explicit_attention_path_equals_sdpa(classifier, images) -> None:
    key_mask = torch.zeros(B, 16, dtype=torch.bool)
    key_mask[:, ::3] = True
    with torch.no_grad():
        for mask in (None, key_mask):
            fused = classifier.forward_features(images, key_mask=mask).features
            explicit = classifier.forward_features(images, key_mask=mask, return_attn=True)
            torch.testing.assert_close(explicit.features, fused, rtol=1e-5, atol=1e-5)
    assert len(explicit.attn) == 2
    for attn in explicit.attn:
        assert attn.shape == (B, 2, 17, 17)
        torch.testing.assert_close(attn.sum(-1), torch.ones(B, 2, 17))
        # Masked patches (token index = patch index + 1) receive no attention at all.
        masked_cols = torch.nonzero(key_mask[0]).flatten() + 1
        assert torch.all(attn[..., masked_cols] == 0)


def test_keep_all_tokens_equals_plain_forward(classifier, images) -> None:
    with torch.no_grad():
        plain = classifier.forward_features(images).features
        kept = classifier.forward_features(images, keep_idx=torch.arange(16).repeat(B, 1)).features
        # Attention is permutation-equivariant and positions are added before dropping,
        # so any order of all patches gives the same CLS output.
        shuffled = torch.stack([torch.randperm(16) for _ in range(B)])
        permuted = classifier.forward_features(images, keep_idx=shuffled).features
    torch.testing.assert_close(kept, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(permuted, plain, rtol=1e-5, atol=1e-5)


def test_keep_subset_matches_open_clip_on_gathered_tokens(classifier, images) -> None:
    keep = torch.stack([torch.randperm(16)[:5] for _ in range(B)])
    visual = classifier.visual
    with torch.no_grad():
        out = classifier.forward_features(images, keep_idx=keep, return_attn=True)
        tokens = _tokens_after_pos(visual, _normalised(classifier, images))
        gathered = torch.stack([torch.cat([t[:1], t[1:][k]]) for t, k in zip(tokens, keep)])
        expected = _reference_features(visual, gathered)
    torch.testing.assert_close(out.features, expected, rtol=1e-5, atol=1e-5)
    assert out.attn[0].shape == (B, 2, 6, 6)


def test_key_mask_none_masked_equals_plain(classifier, images) -> None:
    with torch.no_grad():
        plain = classifier.forward_features(images).features
        masked = classifier.forward_features(images, key_mask=torch.zeros(B, 16, dtype=torch.bool)).features
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-5)


def test_key_mask_matches_open_clip_additive_mask(classifier, images) -> None:
    key_mask = torch.rand(B, 16) < 0.4
    visual = classifier.visual
    with torch.no_grad():
        ours = classifier.forward_features(images, key_mask=key_mask).features
        plain = classifier.forward_features(images).features
        blocked = torch.cat([torch.zeros(B, 1, dtype=torch.bool), key_mask], dim=1)  # [B, L]
        additive = torch.zeros(B, 17, 17).masked_fill(blocked[:, None, :], float("-inf"))
        additive = additive.repeat_interleave(2, dim=0)  # [B * heads, L, L], as nn.MultiheadAttention wants
        expected = _reference_features(visual, _tokens_after_pos(visual, _normalised(classifier, images)), additive)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3


def test_key_masked_patch_content_cannot_reach_cls(classifier, images) -> None:
    key_mask = torch.zeros(B, 16, dtype=torch.bool)
    key_mask[:, 5] = True  # patch (row 1, col 1): pixels 8..15 x 8..15
    changed = images.clone()
    changed[:, :, 8:16, 8:16] = torch.rand(B, 3, 8, 8)
    with torch.no_grad():
        before = classifier.forward_features(images, key_mask=key_mask).features
        after = classifier.forward_features(changed, key_mask=key_mask).features
        unmasked_after = classifier.forward_features(changed).features
        unmasked_before = classifier.forward_features(images).features
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert (unmasked_after - unmasked_before).abs().max() > 1e-4


def test_keep_idx_with_key_mask_gathers_the_mask(classifier, images) -> None:
    keep = torch.arange(16).repeat(B, 1).flip(1)
    key_mask = torch.rand(B, 16) < 0.3
    with torch.no_grad():
        both = classifier.forward_features(images, keep_idx=keep, key_mask=key_mask).features
        only_mask = classifier.forward_features(images, key_mask=key_mask).features
    torch.testing.assert_close(both, only_mask, rtol=1e-5, atol=1e-5)


def test_return_ln1_is_last_block_ln1_output_with_graph(bundle, classifier, images) -> None:
    captured = {}
    hook = bundle.model.visual.transformer.resblocks[-1].ln_1.register_forward_hook(
        lambda mod, inp, out: captured.setdefault("ln1", out)
    )
    try:
        with torch.no_grad():
            bundle.model.encode_image(_normalised(classifier, images))
    finally:
        hook.remove()
    out = classifier.forward_features(images, return_ln1=True)
    assert out.ln1.shape == (B, 17, 32)
    torch.testing.assert_close(out.ln1.detach(), captured["ln1"], rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.features.sum(), [out.ln1])
    assert grad.abs().sum() > 0


def test_option_errors(classifier, images) -> None:
    with pytest.raises(ModelError, match="keep_idx"):
        classifier.forward_features(images, keep_idx=torch.zeros(B, 3))  # float indices
    with pytest.raises(ModelError, match="keep_idx"):
        classifier.forward_features(images, keep_idx=torch.zeros(B, 17, dtype=torch.long))
    with pytest.raises(ModelError, match="key_mask"):
        classifier.forward_features(images, key_mask=torch.zeros(B, 16))
    with pytest.raises(ModelError, match="resize"):
        classifier(torch.rand(B, 3, 40, 40))


def test_geometry_properties(classifier) -> None:
    assert classifier.num_classes == 4
    assert classifier.patch_size == 8
    assert classifier.grid_size == (4, 4)
    assert classifier.is_vit


def test_state_dict_names_and_reload_into_open_clip(bundle, classifier, images) -> None:
    with torch.no_grad():
        for p in classifier.visual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = classifier.state_dict()
    assert set(state) == {f"visual.{k}" for k in bundle.model.visual.state_dict()} | {"head.weight", "head.bias"}
    fresh = load_clip(TINY_ARCH).model
    fresh.visual.load_state_dict({k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")})
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.encode_image(_normalised(classifier, images)),
            classifier.forward_features(images).features,
            rtol=1e-5,
            atol=1e-5,
        )


def test_head_is_scaled_cosine_with_trainable_zero_bias() -> None:
    weights = F.normalize(torch.randn(5, 8), dim=-1)
    head = ClassifierHead.from_zeroshot(weights, torch.tensor(4.6052))  # exp = 100
    features = torch.randn(3, 8) * 7
    expected = 100.0 * F.normalize(features, dim=-1) @ weights.T
    torch.testing.assert_close(head(features), expected, rtol=1e-4, atol=1e-4)
    assert head.weight.requires_grad and head.bias.requires_grad
    assert torch.equal(head.bias.detach(), torch.zeros(5))
    with pytest.raises(ModelError, match=r"\[C, D\]"):
        ClassifierHead(torch.zeros(3))


def test_non_vit_tower_plain_forward_and_option_errors() -> None:
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"layers": [1, 1, 1, 1], "width": 8, "head_width": 8, "image_size": 64},
        text_cfg={"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1},
    ).eval()
    bundle = load_clip(TINY_ARCH)
    head = ClassifierHead(F.normalize(torch.randn(3, 16), dim=-1))
    preprocess = type(bundle.preprocess)(image_size=64, mean=bundle.preprocess.mean, std=bundle.preprocess.std)
    classifier = ImageClassifier(model.visual, head, preprocess).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = head(model.encode_image(_normalised(classifier, images)))
        torch.testing.assert_close(classifier(images), expected)
    assert not classifier.is_vit
    for options in ({"return_attn": True}, {"return_ln1": True}, {"key_mask": torch.zeros(2, 4, dtype=torch.bool)}):
        with pytest.raises(ModelError, match="ViT"):
            classifier.forward_features(images, **options)
    with pytest.raises(ModelError, match="ModifiedResNet"):
        _ = classifier.patch_size


def test_eval_transform_and_predict(classifier) -> None:
    transform = build_eval_transform(classifier.preprocess)
    pil = [
        Image.new("RGB", (50, 40), (200, 10, 10)),
        Image.new("RGBA", (32, 64), (10, 200, 10, 128)),
        Image.new("L", (33, 33), 90),
    ]
    tensors = [transform(im) for im in pil]
    assert all(t.shape == (3, 32, 32) and 0 <= t.min() and t.max() <= 1 for t in tensors)
    classifier.train()
    top1, probs = predict(classifier, pil, batch_size=2)
    assert classifier.training  # mode restored
    with torch.no_grad():
        expected = classifier.eval()(torch.stack(tensors)).softmax(-1)
    torch.testing.assert_close(probs, expected)
    assert torch.equal(top1, expected.argmax(-1))
    top1_t, probs_t = predict(classifier, torch.stack(tensors), batch_size=8)
    torch.testing.assert_close(probs_t, probs)
    assert predict(classifier, torch.rand(2, 3, 48, 64))[1].shape == (2, 4)


def test_deepcopy_gives_independent_teacher(classifier, images) -> None:
    teacher = copy.deepcopy(classifier)
    with torch.no_grad():
        classifier.visual.conv1.weight.add_(0.1 * torch.randn_like(classifier.visual.conv1.weight))
        assert not torch.allclose(teacher(images), classifier(images))


def test_grad_checkpointing_gives_same_features_and_grads(classifier, images) -> None:
    classifier.train()
    loss = classifier(images).logsumexp(-1).sum()
    expected = torch.autograd.grad(loss, list(classifier.parameters()))
    classifier.visual.set_grad_checkpointing(True)
    loss_ckpt = classifier(images).logsumexp(-1).sum()
    got = torch.autograd.grad(loss_ckpt, list(classifier.parameters()))
    torch.testing.assert_close(loss_ckpt, loss)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

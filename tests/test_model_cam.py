"""CAMs of the classifier: side-effect free, equal to straightforward reference computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robustft.errors import ModelError
from robustft.model import (
    TINY_ARCH,
    ImageClassifier,
    build_zeroshot_classifier,
    cam_from_forward,
    compute_cam,
    load_clip,
)

B = 3


@pytest.fixture()
def classifier() -> ImageClassifier:
    bundle = load_clip(TINY_ARCH)
    return build_zeroshot_classifier(bundle, ["cat", "dog", "bird", "car", "tree"], "simple", use_cache=False)


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(B, 3, 32, 32)


@pytest.fixture()
def labels() -> torch.Tensor:
    return torch.tensor([0, 3, 4])


def _normalised(classifier: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(classifier.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(classifier.preprocess.std).view(1, 3, 1, 1)
    return (images - mean) / std


def _reference_forward_keep_attn(clf: ImageClassifier, images: torch.Tensor):
    """A deliberately plain ViT forward: one head at a time, every attention map retained."""
    visual = clf.visual
    x = visual.conv1(_normalised(clf, images)).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    maps = []
    for blk in visual.transformer.resblocks:
        h = blk.ln_1(x)
        width, heads = h.shape[-1], blk.attn.num_heads
        hd = width // heads
        wq, wk, wv = blk.attn.in_proj_weight.split(width)
        bq, bk, bv = blk.attn.in_proj_bias.split(width)
        outs, layer_maps = [], []
        for i in range(heads):
            sl = slice(i * hd, (i + 1) * hd)
            q = h @ wq[sl].T + bq[sl]
            k = h @ wk[sl].T + bk[sl]
            v = h @ wv[sl].T + bv[sl]
            a = torch.softmax(q @ k.transpose(1, 2) / hd**0.5, dim=-1)
            a.retain_grad()
            layer_maps.append(a)
            outs.append(a @ v)
        x = x + blk.attn.out_proj(torch.cat(outs, dim=-1))
        x = x + blk.mlp(blk.ln_2(x))
        maps.append(layer_maps)
    features = visual.ln_post(x[:, 0]) @ visual.proj
    return clf.head(features), maps


def _reference_mmcam(clf: ImageClassifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    clf = copy.deepcopy(clf)
    logits, maps = _reference_forward_keep_attn(clf, images)
    torch.testing.assert_close(logits, clf(images), rtol=1e-5, atol=1e-5)  # the reference is a faithful forward
    sum(logits[i, int(labels[i])] for i in range(len(labels))).backward()
    cams = []
    for b in range(images.shape[0]):
        length = maps[0][0].shape[-1]
        relevance = torch.eye(length)
        for layer_maps in maps:
            abar = sum((a.grad[b] * a[b]).clamp(min=0) for a in layer_maps) / len(layer_maps)
            relevance = relevance + abar @ relevance
        cams.append(relevance[0, 1:].detach())
    return torch.stack(cams).reshape(-1, 4, 4)


def _reference_gradcam(clf: ImageClassifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    clf = copy.deepcopy(clf)
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["act"] = output

    hook = clf.visual.transformer.resblocks[-1].ln_1.register_forward_hook(keep)
    logits = clf.head(clf.visual(_normalised(clf, images)))  # open_clip's own forward
    hook.remove()
    sum(logits[i, int(labels[i])] for i in range(len(labels))).backward()
    act, grad = captured["act"], captured["act"].grad
    cams = []
    for b in range(images.shape[0]):
        weights = grad[b].sum(dim=0)  # over all tokens
        cams.append(torch.relu((act[b, 1:] * weights).sum(dim=-1)).detach())
    return torch.stack(cams).reshape(-1, 4, 4)


@pytest.mark.parametrize("kind", ["mmcam", "gradcam"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_no_side_effects(classifier, images, labels, kind: str, train_mode: bool) -> None:
    classifier.train(train_mode)
    result = compute_cam(classifier, images, labels, kind=kind)
    assert classifier.training == train_mode
    assert all(m.training == train_mode for m in classifier.modules())
    assert all(p.grad is None for p in classifier.parameters())
    assert result.raw.shape == (B, 4, 4) and not result.raw.requires_grad
    assert result.logits.shape == (B, 5) and not result.logits.requires_grad
    assert (result.raw >= 0).all() and result.raw.sum() > 0


def test_existing_grads_untouched(classifier, images, labels) -> None:
    classifier(images).sum().backward()
    before = {n: p.grad.clone() for n, p in classifier.named_parameters()}
    compute_cam(classifier, images, labels)
    for name, p in classifier.named_parameters():
        assert torch.equal(p.grad, before[name]), name


def test_mmcam_equals_reference(classifier, images, labels) -> None:
    ours = compute_cam(classifier, images, labels, kind="mmcam").raw
    torch.testing.assert_close(ours, _reference_mmcam(classifier, images, labels), rtol=1e-4, atol=1e-6)


def test_gradcam_equals_reference(classifier, images, labels) -> None:
    ours = compute_cam(classifier, images, labels, kind="gradcam").raw
    torch.testing.assert_close(ours, _reference_gradcam(classifier, images, labels), rtol=1e-4, atol=1e-6)


def test_cam_depends_on_label(classifier, images) -> None:
    a = compute_cam(classifier, images, torch.tensor([0, 0, 0])).raw
    b = compute_cam(classifier, images, torch.tensor([1, 1, 1])).raw
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", ["mmcam", "gradcam"])
def test_cam_from_forward_equals_compute_cam_and_keeps_graph(classifier, images, labels, kind: str) -> None:
    expected = compute_cam(classifier, images, labels, kind=kind)
    logits, out = classifier.forward_with_features(images, return_attn=kind == "mmcam", return_ln1=kind == "gradcam")
    result = cam_from_forward(logits, out, labels, kind)
    torch.testing.assert_close(result.raw, expected.raw, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in classifier.parameters())
    # The graph survives for the training loss, and the CAM left no trace in the gradients.
    F.cross_entropy(logits, labels).backward()
    ours = {n: p.grad.clone() for n, p in classifier.named_parameters()}
    classifier.zero_grad(set_to_none=True)
    F.cross_entropy(classifier(images), labels).backward()
    for name, p in classifier.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_classifier_and_no_grad_context(classifier, images, labels) -> None:
    expected = compute_cam(classifier, images, labels).raw
    for p in classifier.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        frozen = compute_cam(classifier, images, labels).raw
    torch.testing.assert_close(frozen, expected)


def test_normalized_cam(classifier, images, labels) -> None:
    result = compute_cam(classifier, images, labels)
    norm = result.normalized()
    torch.testing.assert_close(norm.amax(dim=(1, 2)), torch.ones(B), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm * result.raw.amax(dim=(1, 2), keepdim=True), result.raw, rtol=1e-5, atol=1e-6)


def test_errors(classifier, images, labels) -> None:
    with pytest.raises(ModelError, match="mmcam"):
        compute_cam(classifier, images, labels, kind="gradcamm")
    with pytest.raises(ModelError, match=r"\[0, 5\)"):
        compute_cam(classifier, images, torch.tensor([0, 1, 5]))
    with pytest.raises(ModelError, match="int64"):
        compute_cam(classifier, images, torch.tensor([0.0, 1.0, 2.0]))
    logits, out = classifier.forward_with_features(images)
    with pytest.raises(ModelError, match="return_attn"):
        cam_from_forward(logits, out, labels, "mmcam")
    with pytest.raises(ModelError, match="return_ln1"):
        cam_from_forward(logits, out, labels, "gradcam")
    with torch.no_grad():
        logits, out = classifier.forward_with_features(images, return_attn=True)
    with pytest.raises(ModelError, match="autograd"):
        cam_from_forward(logits, out, labels, "mmcam")
    logits, out = classifier.forward_with_features(images, return_attn=True, keep_idx=torch.arange(4).repeat(B, 1))
    with pytest.raises(ModelError, match="keep_idx"):
        cam_from_forward(logits, out, labels, "mmcam", grid_size=(4, 4))

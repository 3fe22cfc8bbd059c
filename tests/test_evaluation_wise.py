"""WiSE-FT sweep: endpoints reproduce the two models exactly; every weight is interpolated."""

from __future__ import annotations

import copy

import pytest
import torch

from robustft.errors import CheckpointError, ConfigError
from robustft.evaluation.wise import wise_ft_sweep


@pytest.fixture(scope="module")
def endpoints():
    from robustft.model import ClassifierHead, ImageClassifier, load_clip

    torch.manual_seed(0)
    bundle = load_clip("robustft-tiny", "none")
    zeroshot = ImageClassifier(bundle.model.visual, ClassifierHead(torch.randn(5, 32)), bundle.preprocess).eval()
    finetuned = copy.deepcopy(zeroshot)
    with torch.no_grad():
        for p in finetuned.parameters():  # every weight moves, the head included
            p.add_(0.05 * torch.randn_like(p))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return zeroshot, finetuned, images


def test_alpha_endpoints_equal_the_two_models_and_inputs_are_untouched(endpoints):
    zeroshot, finetuned, images = endpoints
    before = {k: v.clone() for k, v in zeroshot.state_dict().items()}
    with torch.inference_mode():
        zs_logits, ft_logits = zeroshot(images), finetuned(images)
        sweep = wise_ft_sweep(zeroshot, finetuned, [0.0, 0.5, 1.0], lambda m: m(images))
    assert [a for a, _ in sweep] == [0.0, 0.5, 1.0]
    assert torch.equal(sweep[0][1], zs_logits)
    assert torch.equal(sweep[2][1], ft_logits)
    assert not torch.allclose(sweep[1][1], zs_logits) and not torch.allclose(sweep[1][1], ft_logits)
    assert all(torch.equal(before[k], v) for k, v in zeroshot.state_dict().items())


def test_midpoint_is_the_average_of_every_weight_head_included(endpoints):
    zeroshot, finetuned, _ = endpoints
    seen = wise_ft_sweep(zeroshot, finetuned, [0.25], lambda m: {k: v.clone() for k, v in m.state_dict().items()})
    theta = seen[0][1]
    zs, ft = zeroshot.state_dict(), finetuned.state_dict()
    for key in ("head.weight", "head.bias", "visual.conv1.weight"):
        assert torch.allclose(theta[key], 0.75 * zs[key] + 0.25 * ft[key], atol=1e-6)


def test_alphas_outside_the_unit_interval_are_refused_before_any_evaluation(endpoints):
    zeroshot, finetuned, _ = endpoints
    calls = []
    with pytest.raises(ConfigError, match=r"\[0, 1\].*1\.5"):
        wise_ft_sweep(zeroshot, finetuned, [0.5, 1.5], calls.append)
    with pytest.raises(ConfigError):
        wise_ft_sweep(zeroshot, finetuned, [], calls.append)
    assert calls == []


def test_models_of_different_layouts_cannot_be_interpolated(endpoints):
    from robustft.model import ClassifierHead, ImageClassifier

    zeroshot, _, _ = endpoints
    other = ImageClassifier(copy.deepcopy(zeroshot.visual), ClassifierHead(torch.randn(7, 32)), zeroshot.preprocess)
    with pytest.raises(CheckpointError, match="head.weight"):
        wise_ft_sweep(zeroshot, other, [0.5], lambda m: None)

"""Fixtures shared by the method tests: a random-weight tiny CLIP classifier and one batch.

Imported by tests/test_methods_contract.py and tests/test_methods_counterfactual.py
(pytest uses fixtures found in a test module's namespace).
"""

from __future__ import annotations

import math

import pytest
import torch

from robustft.model.classifier import ClassifierHead, ImageClassifier
from robustft.model.clip import load_clip

NUM_CLASSES = 4
BATCH = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (two threads on a busy 2-core machine spin-wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def zeroshot() -> ImageClassifier:
    """A random-weight tiny CLIP ViT (32 px, patch 8) with a random cosine head of scale 10."""
    torch.manual_seed(0)
    bundle = load_clip("robustft-tiny", "none")
    weights = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, bundle.model.visual.output_dim), dim=-1)
    head = ClassifierHead.from_zeroshot(weights, math.log(10.0))
    return ImageClassifier(bundle.model.visual, head, bundle.preprocess).eval()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"image": torch.rand(BATCH, 3, 32, 32, generator=gen),
            "label": torch.arange(BATCH) % NUM_CLASSES, "index": torch.arange(BATCH),
            "template": torch.arange(BATCH) % len(TEMPLATES)}


CLASSNAMES = ("red", "green", "blue", "yellow")
TEMPLATES = ("a photo of a {}.", "a {} thing.")


def text_context() -> dict[str, object]:
    """``build_method``'s context for methods that train the text tower: a fresh tiny text tower."""
    from robustft.methods.task_contrastive import TextSide
    from robustft.model.text import TextTower

    torch.manual_seed(0)
    bundle = load_clip("robustft-tiny", "none")
    return {"text": TextSide(tower=TextTower.from_clip(bundle.model, copy=True), tokenizer=bundle.tokenizer,
                             classnames=list(CLASSNAMES), templates=list(TEMPLATES))}

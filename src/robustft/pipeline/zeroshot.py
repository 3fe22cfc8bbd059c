"""`robustft zeroshot`: build a zero-shot classifier and save it as a run."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from robustft.model import build_zeroshot_classifier, load_classnames, load_clip, load_templates, save_classifier
from robustft.pipeline.runs import prepare_run_dir

__all__ = ["run_zeroshot", "resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_zeroshot(
    *, model: str, pretrained: str, classnames: str, templates: str, out: str | Path,
    device: str = "auto", overwrite: bool = False, progress: bool = True,
) -> Path:
    """Build the zero-shot classifier of ``model`` for ``classnames`` x ``templates`` into ``out``.

    Every input is checked (class names, templates, model, weights) before ``out`` is
    touched, so a bad input writes nothing.
    """
    names = load_classnames(classnames)
    temps = load_templates(templates)
    bundle = load_clip(model, pretrained, device=resolve_device(device))
    identity = hashlib.sha256(
        json.dumps({"model": model, "pretrained": pretrained, "classnames": names, "templates": temps}).encode()
    ).hexdigest()[:12]
    run_dir = prepare_run_dir(out, kind="zeroshot", identity=identity, overwrite=overwrite,
                              extra={"method": "zeroshot", "model": model, "pretrained": pretrained})
    classifier = build_zeroshot_classifier(bundle, names, temps, progress=progress)
    save_classifier(classifier, run_dir, model_name=model, pretrained=pretrained, classnames=names,
                    templates=temps, extra={"method": "zeroshot"})
    logger.info("zero-shot classifier: %s, %d classes x %d templates -> %s", model, len(names), len(temps), run_dir)
    return run_dir

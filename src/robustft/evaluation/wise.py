"""WiSE-FT sweeps: evaluate weight interpolations between a zero-shot and a fine-tuned model.

``theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned`` over every
weight, head included (Wortsman et al., 2022), built by :func:`robustft.ops.weights.blend_into`
(the two-point case of :func:`robustft.ops.weights.average_state_dicts`), which is exact at
both ends: alpha = 0 and alpha = 1 reproduce the zero-shot and the fine-tuned model bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import nn

from robustft.errors import ConfigError
from robustft.ops.weights import assert_compatible, blend_into

__all__ = ["wise_ft_sweep"]

logger = logging.getLogger(__name__)

R = TypeVar("R")


def wise_ft_sweep(
    zeroshot_classifier: nn.Module,
    finetuned_classifier: nn.Module,
    alphas: Sequence[float],
    eval_fn: Callable[[nn.Module], R],
) -> list[tuple[float, R]]:
    """Evaluate the interpolated classifier at each alpha.

    The two input classifiers are left unchanged; each alpha's classifier is a new copy of
    the zero-shot one (eval mode, no gradients), built when its turn comes, so one
    interpolated model is alive at a time unless ``eval_fn`` keeps it.

    Args:
        zeroshot_classifier: The alpha = 0 endpoint.
        finetuned_classifier: The alpha = 1 endpoint; same keys and shapes.
        alphas: Mixing weights, each in [0, 1] (0 = zero-shot weights).
        eval_fn: Called with the interpolated classifier; its return value is kept.

    Returns:
        ``[(alpha, eval_fn(classifier_at_alpha)), ...]`` in the order of ``alphas``.

    Raises:
        ConfigError: No alphas, or an alpha outside [0, 1].
        CheckpointError: The two classifiers' state dicts differ in keys, shapes or kinds.
    """
    bad = [a for a in alphas if not 0.0 <= float(a) <= 1.0]
    if bad or not alphas:
        raise ConfigError(f"WiSE-FT alphas must be in [0, 1] (0 = zero-shot, 1 = fine-tuned); got {list(alphas)}")
    # References, not copies: only the working copy below is ever written to.
    theta0 = {k: v.detach() for k, v in zeroshot_classifier.state_dict().items()}
    theta1 = {k: v.detach() for k, v in finetuned_classifier.state_dict().items()}
    assert_compatible(theta0, theta1)
    out: list[tuple[float, R]] = []
    for alpha in map(float, alphas):
        model = blend_into(zeroshot_classifier, [theta0, theta1], [1.0 - alpha, alpha])
        logger.info("WiSE-FT alpha %.3g", alpha)
        out.append((alpha, eval_fn(model)))
        del model
    return out

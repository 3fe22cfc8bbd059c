"""``wise-ft``: fine-tune like ``ft``, then interpolate every weight with the zero-shot model.

``theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_ft`` over every weight, the
head included; one classifier per alpha of the run's ``alphas``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

from torch import Tensor

from robustft.errors import ConfigError
from robustft.methods.base import Method, register_method
from robustft.model.classifier import ImageClassifier
from robustft.ops.weights import blend_into

__all__ = ["WiseFt", "WiseClassifiers"]

logger = logging.getLogger(__name__)


class WiseClassifiers(Mapping[float, ImageClassifier]):
    """``{alpha: interpolated classifier}``, each built when it is looked up.

    A sweep of 11 alphas over ViT-L/14 would hold 11 models at once if built eagerly;
    iterate and evaluate one classifier at a time instead. Every lookup builds a new
    module (in eval mode, no gradients) sharing no memory with the inputs.

    Args:
        student: The fine-tuned classifier (alpha 1).
        zeroshot: The zero-shot classifier (alpha 0), same architecture and classes.
        alphas: The mixing coefficients, in the order they are listed.
    """

    def __init__(self, student: ImageClassifier, zeroshot: ImageClassifier, alphas: tuple[float, ...]) -> None:
        self._student, self._zeroshot, self._alphas = student, zeroshot, tuple(alphas)

    def __getitem__(self, alpha: float) -> ImageClassifier:
        if alpha not in self._alphas:
            raise KeyError(alpha)
        mixed = blend_into(self._zeroshot, [self._zeroshot.state_dict(), self._student.state_dict()],
                           [1.0 - alpha, alpha])
        logger.info("wise-ft: built the alpha=%g classifier", alpha)
        return mixed

    def __iter__(self) -> Iterator[float]:
        return iter(self._alphas)

    def __len__(self) -> int:
        return len(self._alphas)


@register_method("wise-ft", "WiSE-FT: fine-tune end to end, then interpolate all weights with zero-shot per alpha")
class WiseFt(Method):
    """Trains exactly like ``ft``; :meth:`finalize` gives the interpolated classifiers."""

    interpolates = True

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        logits = self.student_call("forward", batch["image"])
        loss = self.task_term(logits, batch["label"])
        return {"loss": loss, "logits": logits, "loss_task": loss.detach()}

    def finalize(self, student: ImageClassifier, zeroshot: ImageClassifier) -> WiseClassifiers:
        """One classifier per alpha of the options: alpha 0 has ``zeroshot``'s weights, alpha 1 ``student``'s.

        Args:
            student: The fine-tuned classifier (the last or the held-out-best weights, as
                ``method.wise_endpoint`` chose).
            zeroshot: The zero-shot classifier (same architecture and classes).

        Raises:
            ConfigError: The two classifiers do not have the same classes.
        """
        if student.num_classes != zeroshot.num_classes:
            raise ConfigError(f"wise-ft: the fine-tuned classifier has {student.num_classes} classes, the zero-shot "
                              f"one {zeroshot.num_classes}; interpolate classifiers of the same class list")
        return WiseClassifiers(student, zeroshot, self.options.alphas)

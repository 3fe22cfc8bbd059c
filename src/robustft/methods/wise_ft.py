"""WiSE-FT's weight-space step: interpolate every fine-tuned weight with the zero-shot model.

``theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_ft`` over every weight, the
head included; one classifier per alpha of the run's ``alphas``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping


from robustft.errors import ConfigError
from robustft.methods.objective import ComposedMethod
from robustft.model.classifier import ImageClassifier
from robustft.ops.weights import blend_into

__all__ = ["WiseStep", "WiseClassifiers"]

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


class WiseStep(ComposedMethod):
    """A composition followed by WiSE-FT's weight-space step: :meth:`finalize` interpolates.

    Trains exactly as its composition (``wise-ft``: cross-entropy, like ``ft``); after training
    every weight, the head included, is interpolated with the zero-shot model for each alpha
    of ``method.alphas``. Which fine-tuned weights are interpolated (the last, as the
    reference does, or the held-out-best epoch) is the pipeline's ``method.wise_endpoint``.
    """

    interpolates = True

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
            raise ConfigError(f"{self.name}: the fine-tuned classifier has {student.num_classes} classes, the "
                              f"zero-shot one {zeroshot.num_classes}; interpolate classifiers of the same class list")
        return WiseClassifiers(student, zeroshot, self.options.alphas)

"""WiSE-FT's weight-space step: interpolate every fine-tuned weight with the zero-shot model.

``theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_ft`` over every weight, the
head included; one classifier per alpha of the run's ``alphas``.

When the composition's task trains the text tower too (FLYP, ``flyp+wise``), the head is
not a weight of its own but a function of the text tower. Both towers are then
interpolated, the image tower with the zero-shot classifier's and the text tower with the
tower the method started from (a frozen copy taken when the method is built), and each
alpha's head is rebuilt from its interpolated text tower with CLIP's recipe
(:func:`robustft.model.text.refresh_head`), never interpolated itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from robustft.errors import ConfigError
from robustft.methods.objective import ComposedMethod
from robustft.model.classifier import ImageClassifier
from robustft.model.text import TextTower, refresh_head
from robustft.ops.weights import assert_compatible, blend_into

__all__ = ["WiseStep", "WiseClassifiers", "TextEnds"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEnds:
    """The two ends of a text-tower interpolation and what a head is rebuilt with.

    Attributes:
        zeroshot: The zero-shot text tower's state dict (alpha 0); may live on another device.
        finetuned: The fine-tuned text tower (alpha 1); also the template every mixed tower copies.
        tokenizer: The model's tokenizer.
        classnames: Class names in label order (the classifiers' classes).
        templates: The prompt templates each head is built from.
    """

    zeroshot: Mapping[str, Tensor]
    finetuned: TextTower
    tokenizer: Callable[[list[str]], Tensor]
    classnames: Sequence[str]
    templates: Sequence[str]


class WiseClassifiers(Mapping[float, ImageClassifier]):
    """``{alpha: interpolated classifier}``, each built when it is looked up.

    A sweep of 11 alphas over ViT-L/14 would hold 11 models at once if built eagerly;
    iterate and evaluate one classifier at a time instead. Every lookup builds a new
    module (in eval mode, no gradients) sharing no memory with the inputs.

    Args:
        student: The fine-tuned classifier (alpha 1).
        zeroshot: The zero-shot classifier (alpha 0), same architecture and classes.
        alphas: The mixing coefficients, in the order they are listed.
        text: For a method that trained the text tower: both text towers. The image towers
            are interpolated as usual, and each head is rebuilt from the text tower
            interpolated at the same alpha (:meth:`text_tower`) instead of being interpolated.
    """

    def __init__(self, student: ImageClassifier, zeroshot: ImageClassifier, alphas: tuple[float, ...],
                 text: TextEnds | None = None) -> None:
        self._student, self._zeroshot, self._alphas = student, zeroshot, tuple(alphas)
        self.text = text
        if text is not None:
            assert_compatible(dict(text.zeroshot), text.finetuned.state_dict(), other="the fine-tuned text tower",
                              reference="the zero-shot text tower")

    def __getitem__(self, alpha: float) -> ImageClassifier:
        if alpha not in self._alphas:
            raise KeyError(alpha)
        mixed = blend_into(self._zeroshot, [self._zeroshot.state_dict(), self._student.state_dict()],
                           [1.0 - alpha, alpha])
        if self.text is not None:
            t = self.text
            refresh_head(mixed, self.text_tower(alpha), t.tokenizer, t.classnames, t.templates)
            logger.info("wise-ft: built the alpha=%g classifier (both towers interpolated, head rebuilt from the "
                        "text tower)", alpha)
        else:
            logger.info("wise-ft: built the alpha=%g classifier", alpha)
        return mixed

    def text_tower(self, alpha: float) -> TextTower:
        """The text tower interpolated at ``alpha`` (a new module, eval mode, no gradients).

        Raises:
            KeyError: ``alpha`` is not one of the alphas.
            ConfigError: The classifiers were not built with text towers.
        """
        if alpha not in self._alphas:
            raise KeyError(alpha)
        if self.text is None:
            raise ConfigError("these WiSE-FT classifiers interpolate image classifiers only; there is no text tower")
        tower = self.text.finetuned
        return blend_into(tower, [self.text.zeroshot, tower.state_dict()], [1.0 - alpha, alpha])

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

    A composition whose task trains the text tower (``flyp+wise``) keeps a frozen copy of
    the text tower as it is when the method is built (its zero-shot start; a state dict
    on the CPU, outside the method's modules and checkpoints), interpolates both towers and
    rebuilds every head from its text tower (see the module docstring).
    """

    interpolates = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        side = self._text_side()
        start = None
        if side is not None:
            start = {k: v.detach().to("cpu", copy=True) for k, v in side.tower.state_dict().items()}
        object.__setattr__(self, "_text_start", start)  # not a buffer: never moved, never checkpointed

    def _text_side(self) -> Any:
        """The task's text side (:class:`TextSide`) when it trains the text tower, else None."""
        if not getattr(self, "_terms_built", False) or self.stage_names:
            return None
        return getattr(self.objective, "side", None)

    @property
    def zeroshot_text_state(self) -> dict[str, Tensor] | None:
        """The text tower's weights when the method was built (None unless the task trains text)."""
        return self.__dict__.get("_text_start")

    def finalize(self, student: ImageClassifier, zeroshot: ImageClassifier) -> WiseClassifiers:
        """One classifier per alpha of the options: alpha 0 has ``zeroshot``'s weights, alpha 1 ``student``'s.

        With a text-training task, the image towers are interpolated between ``zeroshot``
        and ``student``, the text towers between the start and the current one, and each
        head is rebuilt from its text tower: alpha 0's is the zero-shot head of the start
        tower, alpha 1's the fine-tuned student's own (rebuilt) head.

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
        side, start = self._text_side(), self.zeroshot_text_state
        text = None
        if side is not None and start is not None:
            text = TextEnds(zeroshot=start, finetuned=side.tower, tokenizer=side.tokenizer,
                            classnames=list(side.classnames), templates=list(side.templates))
        return WiseClassifiers(student, zeroshot, self.options.alphas, text=text)

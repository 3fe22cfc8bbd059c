"""The method contract, the method registry, and the loss terms the methods share.

A :class:`Method` is an ``nn.Module`` that owns what it trains (the student classifier),
what it keeps frozen (the zero-shot teacher, in eval mode, never wrapped in DDP) and its
loss. ``forward(batch)`` returns a dict with at least ``"loss"`` (a scalar with autograd)
and ``"logits"`` (the student's logits on the CLEAN images, ``[B, C]``); every other
entry is a detached scalar the trainer logs as-is (``"loss_task"``, ``"loss_dist"``, ...).

Methods are looked up by name in :data:`METHODS`; a method file adds itself with
``@register_method("name")``. Methods never import each other: a method made of stages
(LP-FT) names them in :meth:`Method.stages` and the pipeline builds each by name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.distributed import ddp_call
from robustft.errors import CheckpointError, ConfigError, ModelError, choices_hint
from robustft.registry import Registry

if TYPE_CHECKING:
    from robustft.model.classifier import ImageClassifier

__all__ = [
    "METHODS",
    "Method",
    "MethodOptions",
    "Needs",
    "register_method",
    "build_method",
    "list_methods",
    "task_loss",
    "kd_loss",
    "feature_loss",
]

logger = logging.getLogger(__name__)

#: Every method by name; unknown names raise ConfigError listing the valid ones.
METHODS: Registry[type[Method]] = Registry("method", ConfigError)

_CAM_KINDS = ("mmcam", "gradcam")
_CAM_SOURCES = ("student", "teacher")
_DONORS = ("permutation", "derangement")


def _number(value: object, what: str, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> float:
    """A finite float in [lo, hi] (or (lo, hi] with lo_open), else a one-line ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{what} must be a finite number; got {value!r}")
    number = float(value)
    if number < lo or number > hi or (lo_open and number == lo):
        low = "(" if lo_open else "["
        raise ConfigError(f"{what} = {number!r} is outside the valid range {low}{lo:g}, {hi:g}]")
    return number


@dataclass(frozen=True)
class Needs:
    """What a method needs the pipeline and the trainer to provide (see ``Method.requirements``).

    Attributes:
        teacher: A frozen copy of the zero-shot classifier.
        teacher_cams: Whether a teacher-CAM cache would be used (worth building).
        text_tower: A trainable copy of CLIP's text tower, with the tokenizer, class names
            and templates (the method trains both towers).
        captions: Training batches of (image, template) rows: ``batch["template"]``.
        vit: The image tower must be a ViT (patches, attention): maskings need it.
        min_batch: Fewest readable images a micro-batch needs (donors among OTHER images: 2).
    """

    teacher: bool = False
    teacher_cams: bool = False
    text_tower: bool = False
    captions: bool = False
    vit: bool = False
    min_batch: int = 1

    def __or__(self, other: Needs) -> Needs:
        return Needs(teacher=self.teacher or other.teacher, teacher_cams=self.teacher_cams or other.teacher_cams,
                     text_tower=self.text_tower or other.text_tower, captions=self.captions or other.captions,
                     vit=self.vit or other.vit, min_batch=max(self.min_batch, other.min_batch))


@dataclass(frozen=True)
class MethodOptions:
    """Options of every method; each method reads the ones it uses.

    Attributes:
        task_weight: Weight of the cross-entropy on clean images (>= 0).
        distill_weight: Weight of the distillation term (>= 0).
        temperature: KD temperature T (> 0); the KD term is scaled by T^2.
        masking: Masking strategy in paper notation (``"ObjMaskSingleFill(0.3)"``) or
            structured dict; ``None`` or ``""`` means the method's default. Ignored by
            methods that do not mask.
        cam: CAM rule, ``"mmcam"`` (faithful) or ``"gradcam"``.
        cam_source: Which model computes the CAM: ``"student"`` (faithful, every step) or
            ``"teacher"`` (frozen, cacheable).
        donors: SingleFill donor rule: ``"permutation"`` (faithful) or ``"derangement"``.
            A donor rule written in the masking string itself wins over the default.
        label_smoothing: Label smoothing of the cross-entropy, in [0, 1).
        alphas: WiSE-FT mixing coefficients, each in [0, 1].
        l2sp_weight: Weight of the L2-SP term (>= 0).
        multi_positive: Contrastive task: same-class captions count as positives.
        seed: Run seed for mask and donor draws.
        rank: Distributed rank; every rank draws from its own stream.
    """

    task_weight: float = 1.0
    distill_weight: float = 30.0
    temperature: float = 10.0
    masking: str | Mapping[str, Any] | None = None
    cam: str = "mmcam"
    cam_source: str = "student"
    donors: str = "permutation"
    label_smoothing: float = 0.0
    alphas: tuple[float, ...] = field(default=(0.5,))
    l2sp_weight: float = 0.01
    multi_positive: bool = False
    seed: int = 0
    rank: int = 0

    def __post_init__(self) -> None:
        _number(self.task_weight, "method task_weight", 0.0)
        _number(self.distill_weight, "method distill_weight", 0.0)
        _number(self.l2sp_weight, "method l2sp_weight", 0.0)
        _number(self.temperature, "method temperature", 0.0, lo_open=True)
        _number(self.label_smoothing, "method label_smoothing", 0.0, 1.0)
        if self.label_smoothing >= 1.0:
            raise ConfigError(f"method label_smoothing = {self.label_smoothing!r} must be below 1")
        for key, value, choices in (("cam", self.cam, _CAM_KINDS), ("cam_source", self.cam_source, _CAM_SOURCES),
                                    ("donors", self.donors, _DONORS)):
            if value not in choices:
                raise ConfigError(f"method {key} {value!r} is unknown; {choices_hint(str(value), choices)}")
        if isinstance(self.alphas, (str, bytes)) or not isinstance(self.alphas, Sequence) or not self.alphas:
            raise ConfigError(f"method alphas must be a non-empty list of numbers in [0, 1]; got {self.alphas!r}")
        object.__setattr__(self, "alphas", tuple(_number(a, "WiSE-FT alpha", 0.0, 1.0) for a in self.alphas))
        for key in ("seed", "rank"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or (key == "rank" and value < 0):
                raise ConfigError(f"method {key} must be a{' non-negative' if key == 'rank' else 'n'} integer; "
                                  f"got {value!r}")


# ----------------------------------------------------------------------------- loss terms
def task_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of ``[B, C]`` logits against ``[B]`` labels, mean over the batch."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's distillation term at temperature T, scaled by T^2.

    ``T^2 * sum_i KL(softmax(t_i / T) || softmax(s_i / T)) / B`` (KL summed over classes,
    averaged over the batch: PyTorch's ``batchmean``).

    Args:
        student_logits: ``[B, C]``, with autograd.
        teacher_logits: ``[B, C]``, treated as a constant.
        temperature: T > 0.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def feature_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared error over batch and feature dimensions; the teacher side is a constant."""
    return F.mse_loss(student_features.float(), teacher_features.detach().float())


# ----------------------------------------------------------------------------- the contract
class Method(nn.Module):
    """A robust fine-tuning method: its trainable student, its frozen teacher, its loss.

    Subclasses are registered with :func:`register_method` and implement
    :meth:`forward`. The student is trained in place; the teacher (when given) is frozen
    here, kept in eval mode by :meth:`train`, and is never part of
    :meth:`trainable_module` (so the trainer never wraps it in DDP).

    Class attributes:
        name: Registered name (set by :func:`register_method`).
        description: One line for ``robustft methods``.
        trains: False for evaluation-only methods (zeroshot): the trainer must not fit them.
        needs_teacher: True when the loss uses the frozen zero-shot model.
        accepts_teacher_cams: True when :func:`build_method` may pass a teacher-CAM cache.
        probe: True when only the head trains (a linear probe): the pipeline gives such a
            stage the probe's learning rate and weight decay (``method.lp_lr``,
            ``method.lp_weight_decay``).
        interpolates: True when :meth:`finalize` interpolates the fine-tuned weights with the
            zero-shot ones (WiSE-FT): the pipeline keeps a zero-shot copy for it and
            ``method.wise_endpoint`` chooses which fine-tuned weights (last or best) it gets.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    trains: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = False
    accepts_teacher_cams: ClassVar[bool] = False
    probe: ClassVar[bool] = False
    interpolates: ClassVar[bool] = False

    def __init__(self, student: ImageClassifier, teacher: ImageClassifier | None, options: MethodOptions) -> None:
        super().__init__()
        self.options = options
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.configure_trainable()

    # -- hooks a subclass may override
    def configure_trainable(self) -> None:
        """Set ``requires_grad`` on the student; by default every parameter trains."""
        self.student.requires_grad_(True)

    def trainable_module(self) -> nn.Module:
        """The module the trainer optimises, checkpoints and (in DDP runs) wraps: the student."""
        return self.student

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: every trainable parameter with ``weight_decay`` (the paper's recipe)."""
        params = [p for p in self.trainable_module().parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": float(weight_decay)}]

    @classmethod
    def requirements(cls, options: MethodOptions) -> Needs:
        """What this method needs with ``options``: teacher, text tower, captions, CAM cache, ViT, batch."""
        return Needs(teacher=cls.needs_teacher)

    @classmethod
    def check(cls, options: MethodOptions, micro_batch: int | None = None) -> None:
        """Raise ConfigError when ``options`` (or the per-process micro-batch) cannot work, before any work."""

    @classmethod
    def wants_teacher_cams(cls, options: MethodOptions) -> bool:
        """Whether a teacher-CAM cache would be used with ``options`` (so worth building)."""
        return cls.requirements(options).teacher_cams

    def sync_head(self) -> None:
        """Bring the student's head up to date before it is evaluated or saved (default: nothing to do)."""

    @classmethod
    def stages(cls) -> list[str]:
        """Method names to fit one after the other; a plain method is its own single stage."""
        return [cls.name] if cls.trains else []

    def finalize(self, student: ImageClassifier,
                 zeroshot: ImageClassifier) -> Mapping[float | None, ImageClassifier]:
        """Classifiers to evaluate after training, keyed by WiSE-FT alpha (None: not interpolated)."""
        return {None: student}

    def min_batch_size(self) -> int:
        """Fewest readable images a micro-batch needs for :meth:`forward` (default 1).

        Unreadable images are dropped from their micro-batch, which may leave fewer than a
        method can use (none at all, or one image when donors must be other images). The
        trainer then skips that micro-batch on every process instead of calling forward.
        """
        return 1

    def extra_state(self) -> dict[str, Tensor]:
        """Method state a resumed run needs besides the weights (generator states); tensors only."""
        return {}

    def load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`extra_state` returned."""
        if state:
            raise CheckpointError(f"method {self.name!r} keeps no extra state but the checkpoint has "
                                  f"{sorted(state)}; was it written by another method?")

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One training step's loss on ``batch`` (``image`` [B,3,H,W] in [0,1], ``label`` [B], ``index`` [B])."""
        raise NotImplementedError

    # -- shared behaviour
    def set_ddp_module(self, wrapped: nn.Module | None) -> None:
        """Use ``wrapped`` (``DistEnv.wrap_ddp(trainable_module())``) for student passes; None: the student.

        Stored without registering a submodule, so the method's modules and state dict are unchanged.
        """
        object.__setattr__(self, "_ddp_student", wrapped)

    def student_call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``student.<name>(*args, **kwargs)`` through the DDP wrapper when one is set.

        Every student pass whose output reaches the loss goes through here, so DDP averages
        its gradients over ranks; with one process it is a plain method call.
        """
        wrapped = self.__dict__.get("_ddp_student")
        if wrapped is None:
            return getattr(self.student, name)(*args, **kwargs)
        return ddp_call(wrapped, name, *args, **kwargs)

    def train(self, mode: bool = True) -> Method:
        """Switch the student's mode; the teacher stays in eval mode whatever ``mode`` is."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def task_term(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy with this run's label smoothing."""
        return task_loss(logits, labels, self.options.label_smoothing)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, trains={self.trains}"


def register_method(name: str, description: str) -> Any:
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def decorator(cls: type[Method]) -> type[Method]:
        cls.name = name
        cls.description = description
        METHODS.add(name, cls)
        return cls

    return decorator


def list_methods() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered method, in registration order."""
    return [(name, METHODS.get(name).description) for name in METHODS.names()]


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    ids = {id(p) for p in a.parameters()}
    return any(id(p) in ids for p in b.parameters())


def build_method(
    name: str,
    student: ImageClassifier,
    teacher: ImageClassifier | None,
    options: MethodOptions | None = None,
    *,
    teacher_cams: Tensor | None = None,
    context: Mapping[str, Any] | None = None,
) -> Method:
    """Build the method called ``name``, validating everything before any work starts.

    Args:
        name: A registered method name (see :func:`list_methods`).
        student: The classifier to fine-tune (a copy of the zero-shot classifier), trained in place.
        teacher: The frozen zero-shot classifier; required by distillation methods, else
            ignored. It must not share parameters with ``student``.
        options: Method options (defaults when None).
        teacher_cams: A teacher-CAM cache ``[N, gh, gw]`` (raw CAMs, row ``i`` for dataset
            index ``i``; see :mod:`robustft.methods.cam_cache`), looked up by
            ``batch["index"]``. Only for masked methods (``accepts_teacher_cams``); used
            when the method's ``wants_teacher_cams(options)`` is True.
        context: What the method's :meth:`Method.requirements` asked for beyond the two
            classifiers, by name (``{"text": TextSide}`` for a method that trains the text
            tower); ignored by methods that take none.

    Raises:
        ConfigError: Unknown name, or options the method cannot use (e.g. a masking kind).
        ModelError: A masking needs a ViT and the model is not one, or a missing teacher.
    """
    cls = METHODS.get(name)
    options = options if options is not None else MethodOptions()
    if not isinstance(options, MethodOptions):
        raise TypeError(f"options must be a MethodOptions, got {type(options).__name__}")
    if cls.needs_teacher:
        if teacher is None:
            raise ModelError(f"method {name!r} distils from the frozen zero-shot classifier; pass it as teacher")
        if teacher is student or _shares_parameters(student, teacher):
            raise ModelError(f"method {name!r}: the student must be a copy of the teacher (copy.deepcopy), "
                             "not share its parameters")
    else:
        teacher = None  # a method that does not distil never holds (or moves) a teacher
    kwargs: dict[str, Any] = {"context": context} if getattr(cls, "accepts_context", False) else {}
    if teacher_cams is None:
        method = cls(student, teacher, options, **kwargs)
    elif not cls.accepts_teacher_cams:
        raise ConfigError(f"method {name!r} does not use class activation maps; a teacher-CAM cache applies only "
                          f"to {', '.join(n for n in METHODS.names() if METHODS.get(n).accepts_teacher_cams)}")
    else:
        method = cls(student, teacher, options, teacher_cams=teacher_cams, **kwargs)
    logger.info("method %s built (%s)", name, cls.description)
    return method

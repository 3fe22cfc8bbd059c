"""The objective layer: a method is one task objective, zero or more regularisers, and
optional weight-space steps after training.

A **task objective** (:class:`TaskObjective`) runs the student on the step's clean images
and returns the task loss (cross-entropy through the head; FLYP's contrastive loss between
images and captions). A **regulariser** (:class:`Regulariser`) adds a weighted term
(distillation to the frozen zero-shot model on clean, counterfactual, token-dropped or
attention-masked images; L2-SP). Both are small ``nn.Module`` s that share one
:class:`Step`: before the student's pass each term may ask for what it needs from it (its
features, the attention maps or activations of a student CAM, extra images to run in the
SAME pass), and after it each term reads what it asked for. So the clean pass happens once,
whatever the composition.

A composition is registered as a method by :func:`register_composition`: the registered
class declares what the pipeline and the trainer must provide (:class:`Needs`: a frozen
teacher, a trainable text tower with captions, teacher CAMs, the smallest usable
micro-batch, a ViT image tower), its stages and its weight-space step, so no code outside
this package ever branches on a method's name. ``TASK+REG+...`` names compose on the fly
(``flyp+cf-fd`` is FLYP with the paper's counterfactual feature distillation).

The loss of a step is ``task_weight * L_task + sum_i weight_i * L_i``, in that order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from robustft.errors import CheckpointError, ConfigError, ModelError, TrainingError
from robustft.methods.base import METHODS, Method, MethodOptions, Needs

if TYPE_CHECKING:
    from robustft.model.classifier import ImageClassifier
    from robustft.model.vit import VitOutput

__all__ = [
    "Needs",
    "Step",
    "Term",
    "TaskObjective",
    "Regulariser",
    "ComposedMethod",
    "TASKS",
    "REGULARISERS",
    "register_task",
    "register_regulariser",
    "register_composition",
]

logger = logging.getLogger(__name__)


class Step:
    """What the terms of one training step share (see the module docstring).

    Before the task objective runs, terms set :attr:`want_features`, :attr:`cam_kind` or
    add images with :meth:`add_images`; the task objective then fills :attr:`logits`,
    :attr:`features`, :attr:`clean` and :attr:`extra_out`.
    """

    def __init__(self, method: ComposedMethod, batch: Mapping[str, Tensor]) -> None:
        self.method = method
        self.batch = batch
        self.images: Tensor = batch["image"]
        self.labels: Tensor = batch["label"]
        self.want_features = False
        self.cam_kind: str | None = None  # "mmcam" / "gradcam": keep what a student CAM needs
        self.extra: list[Tensor] = []
        self.logits: Tensor | None = None
        self.features: Tensor | None = None
        self.clean: VitOutput | None = None
        self.extra_out: list[tuple[Tensor, Tensor]] = []
        self.logs: dict[str, Tensor] = {}

    def add_images(self, images: Tensor) -> int:
        """Run ``images`` in the student's clean pass too; returns the index into :attr:`extra_out`."""
        self.extra.append(images)
        return len(self.extra) - 1

    def clean_logits(self) -> Tensor:
        """The student's logits on the clean images (after the task objective ran)."""
        if self.logits is None:
            raise RuntimeError("the task objective has not run yet")
        return self.logits


class Term(nn.Module):
    """One part of a method's loss. Subclasses are registered by name; see the module docstring.

    Class attributes:
        key: Registered name (``ce``, ``contrastive``, ``cf-fd``, ``l2sp``, ...).
        log_name: Name of the term in logs and the step's outputs (``loss_task``, ...).
        description: One line for ``robustft methods``.
    """

    key: ClassVar[str] = ""
    log_name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, method: ComposedMethod) -> None:
        super().__init__()
        object.__setattr__(self, "_method", method)  # a back-reference, not a submodule

    @property
    def method(self) -> ComposedMethod:
        return self.__dict__["_method"]

    @property
    def options(self) -> MethodOptions:
        return self.method.options

    @classmethod
    def needs(cls, options: MethodOptions, owner: str = "") -> Needs:
        """What this term needs with ``options`` (``owner``: the method's name, for messages)."""
        return Needs()

    @classmethod
    def check(cls, options: MethodOptions, micro_batch: int | None = None, owner: str = "") -> None:
        """Raise ConfigError when ``options`` (or the per-process micro-batch) cannot work."""

    def configure_trainable(self) -> None:
        """Adjust ``requires_grad`` of the method's trainable module (after the default: all train)."""

    def prepare(self, step: Step) -> None:
        """Before the task objective's student pass: ask for what this term will read."""

    def forward(self, step: Step) -> Tensor:  # noqa: D102 - documented by subclasses
        raise NotImplementedError

    def extra_state(self) -> dict[str, Tensor]:
        """State a resumed run needs (generator states); tensors only."""
        return {}

    def load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`extra_state`."""
        if state:
            raise CheckpointError(f"{self.key} keeps no extra state but the checkpoint has {sorted(state)}")


class TaskObjective(Term):
    """The loss the method fine-tunes for; runs the student's clean pass.

    ``forward`` must set ``step.logits`` (the clean logits, ``[B, C]``) and the outputs the
    terms asked for, and return the scalar task loss.
    """

    log_name = "loss_task"

    def trainable_module(self) -> nn.Module:
        """What the trainer optimises: the student classifier, unless the task trains more."""
        return self.method.student

    def sync_head(self) -> None:
        """Make the student's head current before it is evaluated (FLYP rebuilds it from its text tower)."""


class Regulariser(Term):
    """A weighted term added to the task loss.

    Class attributes:
        weight_option: The :class:`MethodOptions` field holding its weight.
    """

    weight_option: ClassVar[str] = "distill_weight"

    @property
    def weight(self) -> float:
        return float(getattr(self.options, self.weight_option))


#: Task objectives and regularisers by registered name.
TASKS: dict[str, type[TaskObjective]] = {}
REGULARISERS: dict[str, type[Regulariser]] = {}


def register_task(cls: type[TaskObjective]) -> type[TaskObjective]:
    """Class decorator: register a task objective under ``cls.key``."""
    TASKS[cls.key] = cls
    return cls


def register_regulariser(cls: type[Regulariser]) -> type[Regulariser]:
    """Class decorator: register a regulariser under ``cls.key``."""
    REGULARISERS[cls.key] = cls
    return cls


# ----------------------------------------------------------------------------- the composed method
class ComposedMethod(Method):
    """A method made of a task objective and regularisers; registered per composition.

    Class attributes (set by :func:`register_composition`):
        task: The task objective's registered name.
        regularisers: The regularisers' registered names, in the order their terms are added.
        task_options: Options the task objective is built with (``{"probe": True}`` for LP).
        composition: A readable form of the composition, for ``robustft methods``.
    """

    task: ClassVar[str] = "ce"
    regularisers: ClassVar[tuple[str, ...]] = ()
    task_options: ClassVar[Mapping[str, Any]] = {}
    composition: ClassVar[str] = ""
    stage_names: ClassVar[tuple[str, ...]] = ()
    accepts_context: ClassVar[bool] = True

    def __init__(self, student: ImageClassifier, teacher: ImageClassifier | None, options: MethodOptions, *,
                 teacher_cams: Tensor | None = None, context: Mapping[str, Any] | None = None) -> None:
        self._context = dict(context or {})
        if self.stage_names:
            self._terms_built = False
            super().__init__(student, teacher, options)
            return
        type(self).check(options)
        super().__init__(student, teacher, options)  # calls configure_trainable before the terms exist
        self.objective = TASKS[self.task](self, **self.task_options)
        self.reg_terms = nn.ModuleList(_build_regulariser(REGULARISERS[key], self, teacher_cams)
                                       for key in self.regularisers)
        self._terms_built = True
        self.configure_trainable()

    # -- what the pipeline asks of the class
    @classmethod
    def term_classes(cls) -> list[type[Term]]:
        if cls.stage_names:
            return []
        return [TASKS[cls.task], *(REGULARISERS[key] for key in cls.regularisers)]

    @classmethod
    def requirements(cls, options: MethodOptions) -> Needs:
        needs = Needs()
        for stage in cls.stage_names:
            needs = needs | METHODS.get(stage).requirements(options)
        for term in cls.term_classes():
            needs = needs | term.needs(options, cls.name)
        return needs

    @classmethod
    def check(cls, options: MethodOptions, micro_batch: int | None = None) -> None:
        for stage in cls.stage_names:
            METHODS.get(stage).check(options, micro_batch)
        for term in cls.term_classes():
            term.check(options, micro_batch, cls.name)

    @classmethod
    def wants_teacher_cams(cls, options: MethodOptions) -> bool:
        return cls.requirements(options).teacher_cams

    @classmethod
    def stages(cls) -> list[str]:
        if cls.stage_names:
            return list(cls.stage_names)
        return [cls.name] if cls.trains else []

    # -- what the trainer asks of the instance
    @property
    def task_objective(self) -> TaskObjective:
        return self.objective

    @property
    def masking(self) -> Any:
        """The masking strategy of the composition's counterfactual term (None when nothing masks)."""
        return next((t.masking for t in self._terms() if getattr(t, "masking", None) is not None), None)

    @property
    def teacher_cams(self) -> Tensor | None:
        """The teacher-CAM cache a term uses (None when none is used)."""
        return next((t.teacher_cams for t in self._terms() if getattr(t, "teacher_cams", None) is not None), None)

    @property
    def frozen(self) -> ImageClassifier:
        """The frozen zero-shot teacher (present when a term needs one)."""
        if self.teacher is None:
            raise ModelError(f"method {self.name!r} distils from the frozen zero-shot classifier; pass it as teacher")
        return self.teacher

    def configure_trainable(self) -> None:
        self.student.requires_grad_(True)
        if not getattr(self, "_terms_built", False):
            return
        for term in (self.objective, *self.reg_terms):
            term.configure_trainable()

    def trainable_module(self) -> nn.Module:
        if not getattr(self, "_terms_built", False) or self.stage_names:
            return self.student
        return self.objective.trainable_module()

    def student_call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``trainable_module().<name>(...)``, through the DDP wrapper when one is set."""
        if self.__dict__.get("_ddp_student") is None:
            return getattr(self.trainable_module(), name)(*args, **kwargs)
        return super().student_call(name, *args, **kwargs)

    def min_batch_size(self) -> int:
        return type(self).requirements(self.options).min_batch

    def sync_head(self) -> None:
        """Bring the student's head up to date before an evaluation (a no-op unless the task trains text)."""
        if getattr(self, "_terms_built", False) and not self.stage_names:
            self.objective.sync_head()

    def context(self, key: str) -> Any:
        """What the pipeline provided for a :class:`Needs` entry (``"text"``, ...)."""
        if key not in self._context:
            raise ConfigError(f"method {self.name!r} needs {key!r}, which the pipeline did not provide")
        return self._context[key]

    def extra_state(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for i, term in enumerate(self._terms()):
            for key, value in term.extra_state().items():
                state[key if i == 0 else f"{i}.{key}"] = value
        return state

    def load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        terms = self._terms()
        parts: list[dict[str, Tensor]] = [{} for _ in terms]
        for key, value in state.items():
            head, _, rest = key.partition(".")
            index = int(head) if rest and head.isdigit() else 0
            if index >= len(terms):
                raise CheckpointError(f"method {self.name!r} cannot restore extra state {key!r}")
            parts[index][rest if index else key] = value
        for term, part in zip(terms, parts):
            term.load_extra_state(part)

    def _terms(self) -> list[Term]:
        """Terms holding state, in a fixed order (regularisers first: only they draw at random)."""
        if not getattr(self, "_terms_built", False) or self.stage_names:
            return []
        return [*self.reg_terms, self.objective]

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One step: ``loss``, clean ``logits`` and each term (``loss_task``, ``loss_dist``, ...)."""
        if self.stage_names:
            raise TrainingError(f"{self.name} is trained stage by stage: build and fit each name of stages() "
                                f"({list(self.stage_names)}) with build_method on the same student")
        step = Step(self, batch)
        for reg in self.reg_terms:
            reg.prepare(step)
        loss_task = self.objective(step)
        terms = [(self.objective.log_name, loss_task)]
        loss = self.options.task_weight * loss_task
        for reg in self.reg_terms:
            value = reg(step)
            loss = loss + reg.weight * value
            terms.append((reg.log_name, value))
        logits = step.clean_logits()
        out: dict[str, Tensor] = {"loss": loss, "logits": logits if torch.is_grad_enabled() else logits.detach()}
        for name, value in terms:
            out[name if name not in out else f"{name}_{len(out)}"] = value.detach()
        out.update(step.logs)
        return out


def _build_regulariser(cls: type[Regulariser], method: ComposedMethod, teacher_cams: Tensor | None) -> Regulariser:
    if getattr(cls, "accepts_teacher_cams", False):
        return cls(method, teacher_cams=teacher_cams)  # type: ignore[call-arg]
    return cls(method)


def _describe(task: str, regularisers: Sequence[str], task_options: Mapping[str, Any]) -> str:
    parts = [task + ("(probe)" if task_options.get("probe") else "")]
    return " + ".join(parts + list(regularisers))


def register_composition(name: str, description: str, *, task: str = "ce", regularisers: Sequence[str] = (),
                         task_options: Mapping[str, Any] | None = None, stages: Sequence[str] = (),
                         attrs: Mapping[str, Any] | None = None,
                         base: type[ComposedMethod] = ComposedMethod, listed: bool = True) -> type[ComposedMethod]:
    """Register the method ``name`` as a composition and return its class.

    Args:
        name: The method's registered name.
        description: One line for ``robustft methods``.
        task: A task objective's registered name.
        regularisers: Regularisers' registered names.
        task_options: Keyword arguments of the task objective.
        stages: For a method made of stages (LP-FT): the methods fitted one after the other.
        attrs: More class attributes (``probe``, ``interpolates``, ...).
        base: The class to derive from (a subclass adds a weight-space step).
        listed: Add it to the registry (``robustft methods``, error messages); False for
            a composition built on demand from its name, which the caller caches.
    """
    task_options = dict(task_options or {})
    composition = " -> ".join(stages) if stages else _describe(task, regularisers, task_options)
    if getattr(base, "interpolates", False):
        composition += ", then WiSE-FT weight interpolation"
    extra = dict(attrs or {})
    cls = type(_class_name(name), (base,), {
        "task": task, "regularisers": tuple(regularisers), "task_options": task_options,
        "stage_names": tuple(stages), "composition": composition, "__module__": __name__, **extra,
    })
    if not stages:
        classes = [TASKS[task], *(REGULARISERS[key] for key in regularisers)]
        needs_teacher = any(c.needs(MethodOptions(), name).teacher for c in classes)
        cls.needs_teacher = extra.get("needs_teacher", needs_teacher)
        cls.accepts_teacher_cams = any(getattr(c, "accepts_teacher_cams", False) for c in classes)
    cls.name = name
    cls.description = description
    if listed:
        METHODS.add(name, cls)
    return cls


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("+", "-").split("-")) + "Method"

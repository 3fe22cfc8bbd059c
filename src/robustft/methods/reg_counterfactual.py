"""Regularisers on counterfactual images: the paper's distillation, and its NoFill variants.

``cf-fd`` / ``cf-kd``: feature (MSE) or logit (T^2 KL) distillation on masked-and-refilled
images (``{Rand,Obj,Ctx}Mask{Single,Multi}Fill``; default ``ObjMaskSingleFill(0.3)``, the
paper's method). ``tokendrop-fd``: FD with MAE-style token dropping (``RandMaskNoFill``).
``attnmask-fd``: FD with attention to the masked patches blocked (``Obj/CtxMaskNoFill``).

A step:

1. The CAM of the ground-truth class: from the student's clean pass (the task objective
   keeps every layer's attention maps for MMCAM, or the last block's ln_1 activations for
   Grad-CAM; the CAM gradient is taken w.r.t. those only, with the graph kept for the loss
   backward), from the frozen teacher, or from a teacher-CAM cache looked up by
   ``batch["index"]``; none for random masks.
2. The masking builds the counterfactual: refilled images, or the originals plus
   ``keep_idx`` / ``key_mask``. The teacher and the student see that SAME counterfactual.
3. ``D(student(x_cf), stopgrad teacher(x_cf))``.

When nothing of the student's clean pass is needed before masking (random masks, a teacher
CAM or its cache) and the counterfactual is a batch of refilled images, it is built BEFORE
the clean pass and the student sees ``[x; x_cf]`` in the task objective's one pass.

Every random draw comes from one ``torch.Generator`` (:func:`robustft.ops.masking.make_generator`
of seed and rank) whose state is the term's extra state, so a resumed run draws the same
masks as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from robustft.errors import CheckpointError, ConfigError, DataError, ModelError
from robustft.methods.base import MethodOptions, feature_loss, kd_loss
from robustft.methods.objective import ComposedMethod, Needs, Regulariser, Step, register_regulariser
from robustft.model.cam import cam_from_forward, compute_cam
from robustft.model.classifier import ImageClassifier
from robustft.ops.cam import normalize_cam
from robustft.ops.masking import (
    Counterfactual,
    MaskingSpec,
    build_counterfactual,
    make_generator,
    min_batch_size,
    parse_masking,
)

__all__ = ["CounterfactualDistill", "resolve_masking"]

logger = logging.getLogger(__name__)

_GENERATOR_KEY = "mask_generator_state"
_REFILL_KINDS = tuple(f"{r}Mask{f}Fill" for f in ("Single", "Multi") for r in ("Rand", "Obj", "Ctx"))


def resolve_masking(term: str, options: MethodOptions, kinds: tuple[str, ...], default: str) -> MaskingSpec:
    """The masking strategy a term will use, checked against the kinds it accepts.

    ``options.masking`` None or ``""`` selects ``default``; ``options.donors`` applies unless
    the masking string names a donor rule itself.

    Raises:
        ConfigError: A malformed strategy, or one the term cannot use (the message lists the
            accepted kinds).
    """
    raw = default if options.masking is None or options.masking == "" else options.masking
    spec = parse_masking(raw)
    if spec.name_stem not in kinds:
        raise ConfigError(f"method {term!r} cannot use masking {spec}: it accepts {', '.join(kinds)} "
                          f"(default {default}); NoFill strategies go with fd-tokendrop (RandMaskNoFill) or "
                          f"fd-attnmask (Obj/CtxMaskNoFill), refilling ones with fd-refill or kd-refill")
    if options.donors != "permutation" and spec.donors == "permutation":
        spec = dataclasses.replace(spec, donors=options.donors)
    return spec


def _check_vit(spec: MaskingSpec, model: ImageClassifier, role: str, name: str) -> None:
    if not model.is_vit:
        raise ModelError(f"method {name!r} applies {spec}, which needs a ViT image tower (patch grid, attention), "
                         f"but the {role}'s image tower is a {type(model.visual).__name__}; use a ViT model "
                         f"(e.g. ViT-B-32) or a method without masking (ft, fd, kd)")


class CounterfactualDistill(Regulariser):
    """Distillation on counterfactual images (see the module docstring).

    Subclasses set ``masking_kinds``, ``default_masking`` and ``distill`` (``"fd"`` or ``"kd"``).

    Args:
        method: The composed method (its student, frozen teacher and options).
        teacher_cams: Optional teacher-CAM cache ``[N, gh, gw]`` (raw CAMs by dataset index,
            kept on the CPU). Used with ``cam_source="teacher"`` and a CAM-selected masking.
    """

    log_name = "loss_dist"
    accepts_teacher_cams: ClassVar[bool] = True
    masking_kinds: ClassVar[tuple[str, ...]] = ()
    default_masking: ClassVar[str] = ""
    distill: ClassVar[str] = "fd"

    def __init__(self, method: ComposedMethod, *, teacher_cams: Tensor | None = None) -> None:
        super().__init__(method)
        self.masking = self.spec(method.options, method.name)
        student, teacher = method.student, method.frozen
        _check_vit(self.masking, student, "student", method.name)
        _check_vit(self.masking, teacher, "teacher", method.name)
        if student.grid_size != teacher.grid_size or student.patch_size != teacher.patch_size:
            raise ModelError(f"method {method.name!r}: student and teacher have different patch grids")
        self.patch = student.patch_size
        self.teacher_cams = self._checked_cache(teacher_cams)
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None
        self._cf: Counterfactual | None = None
        self._slot: int | None = None

    # -- what the method declares
    @classmethod
    def spec(cls, options: MethodOptions, owner: str = "") -> MaskingSpec:
        return resolve_masking(owner or cls.key, options, cls.masking_kinds, cls.default_masking)

    @classmethod
    def needs(cls, options: MethodOptions, owner: str = "") -> Needs:
        spec = cls.spec(options, owner)
        return Needs(teacher=True, vit=True, teacher_cams=spec.needs_cam and options.cam_source == "teacher",
                     min_batch=min_batch_size(spec))

    @classmethod
    def check(cls, options: MethodOptions, micro_batch: int | None = None, owner: str = "") -> None:
        spec = cls.spec(options, owner)
        if micro_batch is not None and micro_batch < min_batch_size(spec):
            raise ConfigError(f"{spec} takes donors among the OTHER images of a micro-batch, but each process sees "
                              f"{micro_batch} image(s) per micro-batch; raise data.batch_size or lower "
                              "optim.accum_steps")

    def _checked_cache(self, cams: Tensor | None) -> Tensor | None:
        if cams is None:
            return None
        if not (self.masking.needs_cam and self.options.cam_source == "teacher"):
            # A cache is only a shortcut; one that this run cannot use changes nothing.
            logger.warning("%s: the teacher-CAM cache is not used (cam_source=%s, masking %s)", self.method.name,
                           self.options.cam_source, self.masking)
            return None
        grid = self.method.student.grid_size
        if cams.dim() != 3 or tuple(cams.shape[1:]) != grid or not cams.is_floating_point():
            raise ModelError(f"the teacher-CAM cache has shape {tuple(cams.shape)} ({cams.dtype}); this model needs "
                             f"float [N, {grid[0]}, {grid[1]}]: rebuild it for this model")
        return cams.detach().cpu()

    @property
    def cam_from_student(self) -> bool:
        return self.masking.needs_cam and self.options.cam_source == "student"

    @property
    def joint(self) -> bool:
        """Whether the counterfactual runs in the task objective's clean pass."""
        return not self.cam_from_student and self.masking.fill != "none"

    # -- randomness
    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            if self._generator is not None:
                logger.warning("%s: the images moved to %s; mask draws restart from the seed there", self.key, device)
            self._generator = make_generator(self.options.seed, self.options.rank, device)
            if self._pending_state is not None:
                self._set_generator_state(self._pending_state)
                self._pending_state = None
        return self._generator

    def _set_generator_state(self, state: Tensor) -> None:
        generator = self._generator
        if generator is None:
            raise RuntimeError("no generator to restore into")
        try:
            generator.set_state(state.to("cpu", torch.uint8))
        except RuntimeError as exc:
            raise CheckpointError(f"{self.key}: the checkpoint's mask-generator state does not fit a generator on "
                                  f"{generator.device} (was the run saved on another kind of device?): {exc}") from None

    def extra_state(self) -> dict[str, Tensor]:
        if self._generator is not None:
            return {_GENERATOR_KEY: self._generator.get_state().clone()}
        if self._pending_state is not None:
            return {_GENERATOR_KEY: self._pending_state.clone()}
        return {}

    def load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        unknown = sorted(set(state) - {_GENERATOR_KEY})
        if unknown:
            raise CheckpointError(f"method {self.method.name!r} cannot restore extra state {unknown}; "
                                  f"it keeps only {_GENERATOR_KEY!r}")
        if _GENERATOR_KEY not in state:
            return
        if self._generator is None:
            self._pending_state = state[_GENERATOR_KEY].detach().to("cpu", torch.uint8).clone()
        else:
            self._set_generator_state(state[_GENERATOR_KEY])

    # -- the step
    def _cached_cams(self, cams: Tensor, index: Tensor, device: torch.device) -> Tensor:
        idx = index.detach().to("cpu", torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cams.shape[0]):
            raise DataError(f"batch index {int(idx.max())} is outside the teacher-CAM cache of {cams.shape[0]} "
                            "images; the cache was built for another dataset: rebuild it (robustft cam-cache)")
        return cams[idx].to(device, non_blocking=True)

    def _cam(self, step: Step) -> Tensor | None:
        """Raw CAM ``[B, gh, gw]`` of the ground-truth class, or None when the masking draws at random."""
        if not self.masking.needs_cam:
            return None
        images, labels, kind = step.images, step.labels, self.options.cam
        if self.options.cam_source == "student":
            if step.logits is None or step.clean is None:
                raise RuntimeError(f"{self.key}: the student's CAM needs its clean pass")
            return cam_from_forward(step.logits, step.clean, labels, kind, retain_graph=True,
                                    grid_size=self.method.student.grid_size).raw
        if self.teacher_cams is not None:
            return self._cached_cams(self.teacher_cams, step.batch["index"], images.device)
        return compute_cam(self.method.frozen, images, labels, kind).raw

    def counterfactual(self, step: Step) -> Counterfactual:
        """The counterfactual batch of this step (draws from the term's generator)."""
        images = step.images
        grad: Any = torch.enable_grad() if self.cam_from_student and not torch.is_grad_enabled() \
            else contextlib.nullcontext()
        with grad:
            cam = self._cam(step)
        cam_norm = normalize_cam(cam.flatten(1)) if cam is not None else None
        return build_counterfactual(images, self.masking, patch=self.patch, cam_norm=cam_norm,
                                    generator=self._generator_for(images.device))

    def prepare(self, step: Step) -> None:
        self._cf, self._slot = None, None
        if self.joint:
            self._cf = self.counterfactual(step)
            self._slot = step.add_images(self._cf.images)
        elif self.cam_from_student:
            step.cam_kind = self.options.cam

    def forward(self, step: Step) -> Tensor:
        cf = self._cf if self._cf is not None else self.counterfactual(step)
        student_cf = step.extra_out[self._slot] if self._slot is not None else None
        self._cf, self._slot = None, None
        step.logs["mask_ratio"] = cf.mask.float().mean().detach()
        return self._distill_term(cf, student_cf)

    def _distill_term(self, cf: Counterfactual, student_cf: tuple[Tensor, Tensor] | None) -> Tensor:
        """D(student(x_cf), stopgrad teacher(x_cf)) with the same masks on both sides."""
        m = self.method
        masks = {"keep_idx": cf.keep_idx, "key_mask": cf.key_mask}
        with torch.no_grad():
            t_feat = m.frozen.forward_features(cf.images, **masks).features
        if student_cf is not None:
            s_logits, s_feat = student_cf
        elif self.distill == "fd":  # the features alone: no head
            s_feat = m.student_call("forward_features", cf.images, **masks).features
        else:
            s_logits, _ = m.student_call("forward_with_features", cf.images, **masks)
        if self.distill == "fd":
            return feature_loss(s_feat, t_feat)
        with torch.no_grad():
            t_logits = m.frozen.forward_head(t_feat)
        return kd_loss(s_logits, t_logits, self.options.temperature)


@register_regulariser
class RefillFeatureDistill(CounterfactualDistill):
    key = "cf-fd"
    description = "MSE to zero-shot features on CAM-masked, refilled counterfactual images (the paper's term)"
    masking_kinds = _REFILL_KINDS
    default_masking = "ObjMaskSingleFill(0.3)"
    distill = "fd"


@register_regulariser
class RefillLogitDistill(CounterfactualDistill):
    key = "cf-kd"
    description = "T^2 * KL to zero-shot logits on refilled counterfactual images"
    masking_kinds = _REFILL_KINDS
    default_masking = "ObjMaskSingleFill(0.3)"
    distill = "kd"


@register_regulariser
class TokenDropFeatureDistill(CounterfactualDistill):
    key = "tokendrop-fd"
    description = "MSE to zero-shot features with MAE-style token dropping (RandMaskNoFill)"
    masking_kinds = ("RandMaskNoFill",)
    default_masking = "RandMaskNoFill(0.75)"
    distill = "fd"


@register_regulariser
class AttnMaskFeatureDistill(CounterfactualDistill):
    key = "attnmask-fd"
    description = "MSE to zero-shot features with attention to masked patches blocked (Obj/CtxMaskNoFill)"
    masking_kinds = ("ObjMaskNoFill", "CtxMaskNoFill")
    default_masking = "ObjMaskNoFill(0.3)"
    distill = "fd"

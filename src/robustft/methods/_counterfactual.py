"""What the masked (counterfactual) distillation methods share: one training step.

A step of ``fd-refill``, ``kd-refill``, ``fd-tokendrop`` and ``fd-attnmask``:

1. ONE student pass on the clean images gives the logits of the task loss and, when the
   CAM comes from the student, every layer's attention maps (MMCAM) or the last block's
   ln_1 activations (Grad-CAM). The CAM gradient is taken w.r.t. those maps only, with the
   graph kept for the loss backward (no second or third clean pass, no parameter grads).
2. The CAM (student, frozen teacher on the fly, or a teacher-CAM cache looked up by
   ``batch["index"]``) is max-normalised and the masking strategy builds the
   counterfactual: refilled images, or the originals plus ``keep_idx`` / ``key_mask``.
3. The frozen teacher and the student both see that SAME counterfactual (same masks,
   donors, kept tokens, blocked keys); the teacher runs without autograd.
4. ``L = w_task * CE(clean logits, y) + w_dist * D(student_cf, teacher_cf)`` with ``D`` the
   feature MSE (fd) or the temperature-scaled KL of the logits (kd).

When nothing of the student's clean pass is needed before masking (random masks, or a CAM
from the teacher or its cache) and the counterfactual is a batch of refilled images, the
student sees clean and refilled images in ONE pass over the concatenated batch: the same
arithmetic as two passes (a ViT treats every image independently), with matrix products
twice as tall (ViT-B/32 on CPU: 5-12% faster at batch 8, 8% at batch 32 with two threads;
6.5% slower with a single thread at batch 32, see BENCHMARKS.md).

Every random draw comes from one ``torch.Generator`` made with
:func:`robustft.ops.masking.make_generator` (seed, rank) on the images' device; its state is
the method's extra state, so a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from robustft.errors import CheckpointError, ConfigError, DataError, ModelError
from robustft.methods.base import Method, MethodOptions, feature_loss, kd_loss
from robustft.model.cam import cam_from_forward, compute_cam
from robustft.model.classifier import ImageClassifier
from robustft.model.vit import VitOutput
from robustft.ops.cam import normalize_cam
from robustft.ops.masking import (
    Counterfactual,
    MaskingSpec,
    build_counterfactual,
    make_generator,
    min_batch_size,
    parse_masking,
)

__all__ = ["CounterfactualDistillation", "resolve_masking"]

logger = logging.getLogger(__name__)

_GENERATOR_KEY = "mask_generator_state"


def resolve_masking(method: str, options: MethodOptions, kinds: tuple[str, ...], default: str) -> MaskingSpec:
    """The masking strategy a method will use, checked against the kinds it accepts.

    Args:
        method: The method's name (for messages).
        options: Its options; ``options.masking`` None or ``""`` selects ``default``.
            ``options.donors`` applies unless the masking string names a donor rule itself.
        kinds: Accepted strategy names without value, e.g. ``("ObjMaskSingleFill", ...)``.
        default: The method's default strategy in paper notation.

    Raises:
        ConfigError: A malformed strategy, or one the method cannot use (message lists the
            accepted kinds).
    """
    raw = default if options.masking is None or options.masking == "" else options.masking
    spec = parse_masking(raw)
    if spec.name_stem not in kinds:
        raise ConfigError(f"method {method!r} cannot use masking {spec}: it accepts {', '.join(kinds)} "
                          f"(default {default}); NoFill strategies go with fd-tokendrop (RandMaskNoFill) or "
                          f"fd-attnmask (Obj/CtxMaskNoFill), refilling ones with fd-refill or kd-refill")
    if options.donors != "permutation" and spec.donors == "permutation":
        spec = dataclasses.replace(spec, donors=options.donors)
    return spec


def _check_vit(method: str, spec: MaskingSpec, model: ImageClassifier, role: str) -> None:
    if not model.is_vit:
        raise ModelError(f"method {method!r} applies {spec}, which needs a ViT image tower (patch grid, attention), "
                         f"but the {role}'s image tower is a {type(model.visual).__name__}; use a ViT model "
                         f"(e.g. ViT-B-32) or a method without masking (ft, fd, kd)")


class CounterfactualDistillation(Method):
    """Base of the masked distillation methods (see the module docstring).

    Subclasses set ``masking_kinds`` (accepted strategy names), ``default_masking`` and
    ``distill`` (``"fd"`` or ``"kd"``).

    Args:
        student, teacher, options: As for :class:`Method`; the teacher is required.
        teacher_cams: Optional teacher-CAM cache ``[N, gh, gw]`` (raw CAMs by dataset
            index; kept on the CPU, rows moved to the images' device per batch). Used with
            ``cam_source="teacher"`` and a strategy that selects patches by CAM (see
            :meth:`wants_teacher_cams`); otherwise ignored with a warning.

    Raises:
        ConfigError: A masking the method cannot use.
        ModelError: A non-ViT student or teacher, or a cache of the wrong grid.
    """

    needs_teacher = True
    accepts_teacher_cams = True
    masking_kinds: ClassVar[tuple[str, ...]] = ()
    default_masking: ClassVar[str] = ""
    distill: ClassVar[str] = "fd"

    def __init__(self, student: ImageClassifier, teacher: ImageClassifier | None, options: MethodOptions, *,
                 teacher_cams: Tensor | None = None) -> None:
        if teacher is None:
            raise ModelError(f"method {self.name!r} distils from the frozen zero-shot classifier; pass it as teacher")
        super().__init__(student, teacher, options)
        self.masking = resolve_masking(self.name, options, self.masking_kinds, self.default_masking)
        _check_vit(self.name, self.masking, student, "student")
        _check_vit(self.name, self.masking, teacher, "teacher")
        if student.grid_size != teacher.grid_size or student.patch_size != teacher.patch_size:
            raise ModelError(f"method {self.name!r}: student and teacher have different patch grids")
        self.patch = student.patch_size
        self.teacher_cams = self._checked_cache(teacher_cams)
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None

    @property
    def frozen(self) -> ImageClassifier:
        """The teacher (always present for these methods)."""
        if self.teacher is None:
            raise RuntimeError(f"{self.name}: the teacher was removed")
        return self.teacher

    @classmethod
    def wants_teacher_cams(cls, options: MethodOptions) -> bool:
        """True when the CAM comes from the teacher and the (resolved) masking selects patches by CAM."""
        spec = resolve_masking(cls.name, options, cls.masking_kinds, cls.default_masking)
        return spec.needs_cam and options.cam_source == "teacher"

    def _checked_cache(self, cams: Tensor | None) -> Tensor | None:
        if cams is None:
            return None
        if not self.wants_teacher_cams(self.options):
            # A cache is only a shortcut; one that this run cannot use changes nothing.
            logger.warning("%s: the teacher-CAM cache is not used (cam_source=%s, masking %s)", self.name,
                           self.options.cam_source, self.masking)
            return None
        grid = self.student.grid_size
        if cams.dim() != 3 or tuple(cams.shape[1:]) != grid or not cams.is_floating_point():
            raise ModelError(f"the teacher-CAM cache has shape {tuple(cams.shape)} ({cams.dtype}); this model needs "
                             f"float [N, {grid[0]}, {grid[1]}]: rebuild it for this model")
        return cams.detach().cpu()

    def min_batch_size(self) -> int:
        """2 for MultiFill and derangement donors (taken among the OTHER images), else 1."""
        return min_batch_size(self.masking)

    @property
    def cam_from_student(self) -> bool:
        """Whether this step's CAM comes from the student's clean pass."""
        return self.masking.needs_cam and self.options.cam_source == "student"

    # -- randomness
    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            if self._generator is not None:
                logger.warning("%s: the images moved to %s; mask draws restart from the seed there", self.name, device)
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
            raise CheckpointError(f"{self.name}: the checkpoint's mask-generator state does not fit a generator on "
                                  f"{generator.device} (was the run saved on another kind of device?): {exc}") from None

    def extra_state(self) -> dict[str, Tensor]:
        """``{"mask_generator_state": uint8 tensor}`` once a draw has happened (or a state is pending)."""
        if self._generator is not None:
            return {_GENERATOR_KEY: self._generator.get_state().clone()}
        if self._pending_state is not None:
            return {_GENERATOR_KEY: self._pending_state.clone()}
        return {}

    def load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore the mask generator; applied at once, or at the first step if none exists yet."""
        unknown = sorted(set(state) - {_GENERATOR_KEY})
        if unknown:
            raise CheckpointError(f"method {self.name!r} cannot restore extra state {unknown}; "
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

    def _cam(self, batch: Mapping[str, Tensor], logits: Tensor | None, clean: VitOutput | None) -> Tensor | None:
        """Raw CAM ``[B, gh, gw]`` of the ground-truth class, or None when the masking draws at random."""
        if not self.masking.needs_cam:
            return None
        images, labels, kind = batch["image"], batch["label"], self.options.cam
        if self.options.cam_source == "student":
            if logits is None or clean is None:
                raise RuntimeError(f"{self.name}: the student's CAM needs its clean pass")
            # Gradients w.r.t. the attention maps / activations of the clean pass only; its
            # graph stays alive for the loss backward.
            return cam_from_forward(logits, clean, labels, kind, retain_graph=True,
                                    grid_size=self.student.grid_size).raw
        if self.teacher_cams is not None:
            return self._cached_cams(self.teacher_cams, batch["index"], images.device)
        return compute_cam(self.frozen, images, labels, kind).raw

    def counterfactual(self, batch: Mapping[str, Tensor], logits: Tensor | None,
                       clean: VitOutput | None) -> Counterfactual:
        """The counterfactual batch of this step (draws from the method's generator)."""
        images = batch["image"]
        cam = self._cam(batch, logits, clean)
        cam_norm = normalize_cam(cam.flatten(1)) if cam is not None else None
        return build_counterfactual(images, self.masking, patch=self.patch, cam_norm=cam_norm,
                                    generator=self._generator_for(images.device))

    def _distill_term(self, cf: Counterfactual, student_cf: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """D(student(x_cf), stopgrad teacher(x_cf)) with the same masks on both sides.

        ``student_cf``: the student's (logits, features) on ``cf.images`` when a joint pass
        already computed them; otherwise the student runs here.
        """
        masks = {"keep_idx": cf.keep_idx, "key_mask": cf.key_mask}
        with torch.no_grad():
            t_feat = self.frozen.forward_features(cf.images, **masks).features
        if student_cf is not None:
            s_logits, s_feat = student_cf
        elif self.distill == "fd":  # the features alone: no head
            s_feat = self.student_call("forward_features", cf.images, **masks).features
        else:
            s_logits, _ = self.student_call("forward_with_features", cf.images, **masks)
        if self.distill == "fd":
            return feature_loss(s_feat, t_feat)
        with torch.no_grad():
            t_logits = self.frozen.forward_head(t_feat)
        return kd_loss(s_logits, t_logits, self.options.temperature)

    def _joint_step(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Counterfactual]:
        """Clean logits and the distillation term from one student pass over ``[x; x_cf]``."""
        images = batch["image"]
        n = images.shape[0]
        cf = self.counterfactual(batch, None, None)
        logits, out = self.student_call("forward_with_features", torch.cat([images, cf.images]))
        return logits[:n], self._distill_term(cf, (logits[n:], out.features[n:])), cf

    def _separate_step(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Counterfactual]:
        """Clean pass (with what the student's CAM needs), masking, then the counterfactual pass."""
        want = self.options.cam if self.cam_from_student else None
        # The student's CAM needs autograd even when the caller scores without it (validation).
        with torch.enable_grad() if want is not None and not torch.is_grad_enabled() else contextlib.nullcontext():
            logits, clean = self.student_call("forward_with_features", batch["image"], return_attn=want == "mmcam",
                                              return_ln1=want == "gradcam")
            cf = self.counterfactual(batch, logits, clean)
        return logits, self._distill_term(cf), cf

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One step; returns ``loss``, clean ``logits``, ``loss_task``, ``loss_dist``, ``mask_ratio``."""
        joint = not self.cam_from_student and self.masking.fill != "none"
        logits, loss_dist, cf = self._joint_step(batch) if joint else self._separate_step(batch)
        if not torch.is_grad_enabled():
            logits = logits.detach()
        loss_task = self.task_term(logits, batch["label"])
        loss = self.options.task_weight * loss_task + self.options.distill_weight * loss_dist
        return {"loss": loss, "logits": logits, "loss_task": loss_task.detach(), "loss_dist": loss_dist.detach(),
                "mask_ratio": cf.mask.float().mean().detach()}

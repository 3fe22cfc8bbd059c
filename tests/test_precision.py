"""bf16 autocast leaves CAM maths, distillation targets and logits in float32 (CPU autocast).

``optim.precision: bf16`` runs the training step and evaluation under
``torch.autocast(dtype=bfloat16)``, which would run every matmul in bf16. The rollout,
the Grad-CAM weighting, the final projection and the head must not follow it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from robustft.evaluation.evaluate import _autocast
from robustft.methods import MethodOptions, build_method
from robustft.model.cam import cam_from_forward
from robustft.model.classifier import ImageClassifier
from robustft.ops.cam import gradcam, mmcam
from robustft.ops.precision import float32_region

from _methods_fixtures import _one_thread, batch, zeroshot  # noqa: F401  (fixtures)


def bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _maps(seed: int = 0, layers: int = 4, length: int = 17) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    attn = [torch.rand(2, 3, length, length, generator=gen).softmax(-1).bfloat16() for _ in range(layers)]
    grads = [torch.randn(2, 3, length, length, generator=gen).bfloat16() for _ in range(layers)]
    return attn, grads


def test_float32_region_switches_autocast_off_and_is_a_no_op_outside() -> None:
    x = torch.randn(4, 4)
    with bf16_autocast():
        assert (x @ x).dtype == torch.bfloat16  # what the regions below protect against
        with float32_region(x.device):
            assert (x @ x).dtype == torch.float32
    with float32_region("cpu"):
        assert torch.equal(x @ x, x @ x)
    with float32_region(torch.device("meta")):  # no autocast on that device: nothing to switch off
        pass


def test_mmcam_rollout_under_bf16_autocast_is_the_float32_rollout() -> None:
    attn, grads = _maps()
    reference = mmcam([a.float() for a in attn], [g.float() for g in grads])
    with bf16_autocast():
        cam = mmcam(attn, grads)
    assert cam.dtype == torch.float32
    torch.testing.assert_close(cam, reference, rtol=1e-6, atol=1e-6)
    # The rollout autocast would have run (each bmm in bf16) differs by far more than that.
    relevance = torch.eye(17).expand(2, 17, 17)
    with bf16_autocast():
        for a, g in zip(attn, grads):
            relevance = relevance + torch.bmm((g.float() * a.float()).clamp(min=0).mean(1), relevance)
    assert (relevance[:, 0, 1:].float() - reference).abs().max() > 1e-4


def test_gradcam_under_bf16_autocast_is_float32() -> None:
    gen = torch.Generator().manual_seed(1)
    act, grad = torch.randn(2, 17, 64, generator=gen), torch.randn(2, 17, 64, generator=gen)
    with bf16_autocast():
        cam = gradcam(act, grad)
    assert cam.dtype == torch.float32
    torch.testing.assert_close(cam, gradcam(act, grad), rtol=1e-6, atol=1e-6)


def test_features_and_logits_are_float32_under_bf16_autocast(zeroshot: ImageClassifier, batch) -> None:  # noqa: F811
    images = batch["image"]
    with bf16_autocast():
        logits, out = zeroshot.forward_with_features(images)
        plain = zeroshot(images)
        head_only = zeroshot.forward_head(out.features)
    assert out.features.dtype == torch.float32 and logits.dtype == torch.float32 and plain.dtype == torch.float32
    # The head's float32 maths: the same logits as running it outside autocast on those features.
    assert torch.equal(head_only, zeroshot.forward_head(out.features))
    assert torch.equal(logits, head_only)
    # Only the trunk runs in bf16: the logits stay close to the float32 model's.
    torch.testing.assert_close(logits, zeroshot(images), rtol=0.05, atol=0.3)


def test_evaluation_autocast_gives_float32_logits(zeroshot: ImageClassifier, batch) -> None:  # noqa: F811
    with torch.inference_mode(), _autocast("bf16", torch.device("cpu")):
        logits = zeroshot(batch["image"])
    assert logits.dtype == torch.float32


def test_student_cam_under_bf16_autocast_is_the_float32_rollout_of_its_maps(
    zeroshot: ImageClassifier, batch  # noqa: F811
) -> None:
    images, labels = batch["image"], batch["label"]
    with bf16_autocast():
        logits, out = zeroshot.forward_with_features(images.requires_grad_(True), return_attn=True)
        maps = list(out.attn)
        grads = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), maps, retain_graph=True)
        cam = cam_from_forward(logits, out, labels, "mmcam", retain_graph=False, grid_size=zeroshot.grid_size)
    assert cam.raw.dtype == torch.float32
    reference = mmcam([m.detach().float() for m in maps], [g.float() for g in grads])
    torch.testing.assert_close(cam.raw.flatten(1), reference, rtol=1e-6, atol=1e-6)


def _record_outputs(model: ImageClassifier, seen: list) -> None:
    """Record the dtype of every tensor the model's entry points return."""

    def dtypes(out: object) -> list[torch.dtype]:
        if isinstance(out, torch.Tensor):
            return [out.dtype]
        if isinstance(out, tuple):
            return [d for item in out for d in dtypes(item)]
        return [out.features.dtype] if hasattr(out, "features") else []

    for name in ("forward", "forward_features", "forward_with_features", "forward_head"):
        real = getattr(model, name)

        def record(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            seen.extend(dtypes(out))
            return out

        setattr(model, name, record)


@pytest.mark.parametrize(("method", "masking"), [
    ("fd", None), ("kd", None), ("fd-refill", "ObjMaskSingleFill(0.3)"), ("fd-refill", "RandMaskSingleFill(0.3)"),
    ("kd-refill", None), ("fd-tokendrop", None),
])
def test_distillation_targets_are_float32_under_bf16_autocast(
    zeroshot: ImageClassifier, batch, method: str, masking: str | None  # noqa: F811
) -> None:
    teacher, seen = copy.deepcopy(zeroshot), []
    _record_outputs(teacher, seen)
    run = build_method(method, copy.deepcopy(zeroshot).train(), teacher, MethodOptions(masking=masking))
    with bf16_autocast():
        out = run(batch)
    assert seen and set(seen) == {torch.float32}  # the teacher's features / logits: the targets
    assert out["logits"].dtype == torch.float32 and torch.isfinite(out["loss"])

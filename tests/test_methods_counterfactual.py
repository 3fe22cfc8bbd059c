"""methods: the masked step (one student pass, same counterfactual on both models), loss formulas, CAM cache."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from robustft.data.folder import ImageFolderDataset
from robustft.data.transforms import build_transform
from robustft.errors import ConfigError
from robustft.methods import MethodOptions, build_method
from robustft.methods import cam_cache as cc
from robustft.methods.base import feature_loss, kd_loss
from robustft.model.cam import compute_cam
from robustft.model.classifier import ImageClassifier
from robustft.ops.cam import normalize_cam
from robustft.ops.masking import build_counterfactual, make_generator, parse_masking

from _methods_fixtures import BATCH, NUM_CLASSES, _one_thread, batch, zeroshot  # noqa: F401  (fixtures)


def _perturbed(model: ImageClassifier, seed: int = 3, scale: float = 0.05) -> ImageClassifier:
    """A copy with every weight nudged, so student and teacher differ (non-zero distillation)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


class _Recorder:
    """Wraps a classifier's entry points to record the calls a method makes."""

    def __init__(self, model: ImageClassifier) -> None:
        self.calls: list[tuple[str, torch.Tensor, dict]] = []
        self._depth = 0
        for name in ("forward_features", "forward_with_features"):
            original = getattr(model, name)

            def record(images, _name=name, _original=original, **kwargs):
                if self._depth == 0:  # outermost calls only (one entry point may use another)
                    self.calls.append((_name, images, kwargs))
                self._depth += 1
                try:
                    return _original(images, **kwargs)
                finally:
                    self._depth -= 1

            setattr(model, name, record)


# ----------------------------------------------------------------------------- loss formulas
def test_kd_loss_matches_a_hand_computation():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    temp = 2.0
    total = 0.0
    for i in range(2):
        ps = [math.exp(v / temp) for v in s[i].tolist()]
        pt = [math.exp(v / temp) for v in t[i].tolist()]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
    expected = total / 2 * temp**2
    assert float(kd_loss(s, t, temp)) == pytest.approx(expected, rel=1e-6)
    assert float(kd_loss(s, s, temp)) == pytest.approx(0.0, abs=1e-6)


def test_feature_loss_is_the_mean_over_batch_and_dims():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    b = torch.tensor([[0.0, 2.0], [1.0, 8.0]], requires_grad=True)
    loss = feature_loss(a, b)
    assert float(loss.detach()) == pytest.approx((1 + 0 + 4 + 16) / 4)
    loss.backward()
    assert b.grad is None or torch.count_nonzero(b.grad) == 0  # the teacher side is a constant
    assert torch.allclose(a.grad, 2 * (a - b).detach() / 4)


@pytest.mark.parametrize("name", ["kd", "fd"])
def test_clean_distillation_matches_its_formula(name, zeroshot, batch):
    student, teacher = _perturbed(zeroshot), copy.deepcopy(zeroshot)
    method = build_method(name, student, teacher, MethodOptions(task_weight=0.7, distill_weight=3.0, temperature=4.0))
    x, y = batch["image"], batch["label"]
    with torch.no_grad():
        out = method(batch)
        ce = F.cross_entropy(student(x), y)
        if name == "kd":
            p_t, p_s = (teacher(x) / 4.0).softmax(-1), (student(x) / 4.0).softmax(-1)
            dist = 16.0 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
        else:
            dist = ((student.forward_features(x).features - teacher.forward_features(x).features) ** 2).mean()
    assert float(out["loss_dist"]) > 1e-4
    assert float(out["loss"]) == pytest.approx(float(0.7 * ce + 3.0 * dist), rel=1e-5)
    assert torch.allclose(out["logits"], student(x).detach(), atol=1e-6)


def test_fd_runs_the_student_once_on_clean_images(zeroshot, batch):
    student = _perturbed(zeroshot)
    rec = _Recorder(student)
    build_method("fd", student, copy.deepcopy(zeroshot), MethodOptions())(batch)
    assert [c[0] for c in rec.calls] == ["forward_with_features"]


# ----------------------------------------------------------------------------- the flagship step
def _separate_pass_loss(student, teacher, batch, spec, kind, cam_from, generator, weights=(1.0, 30.0)):
    """The reference formulation: CAM on its own forward, then a clean forward, then x_cf."""
    x, y = batch["image"], batch["label"]
    cam_model = student if cam_from == "student" else teacher
    cam_norm = normalize_cam(compute_cam(cam_model, x, y, kind).raw.flatten(1)) if spec.needs_cam else None
    logits = student(x)
    cf = build_counterfactual(x, spec, patch=8, cam_norm=cam_norm, generator=generator)
    with torch.no_grad():
        target = teacher.forward_features(cf.images).features
    dist = F.mse_loss(student.forward_features(cf.images).features, target)
    return weights[0] * F.cross_entropy(logits, y) + weights[1] * dist, cf


@pytest.mark.parametrize(("kind", "cam_from", "masking"), [
    ("mmcam", "student", "ObjMaskSingleFill(0.3)"), ("gradcam", "student", "CtxMaskMultiFill(0.3)"),
    ("mmcam", "teacher", "ObjMaskSingleFill(0.3)"), ("gradcam", "student", "RandMaskMultiFill(0.5)"),
])
def test_one_pass_step_equals_the_separate_pass_formulation(kind, cam_from, masking, zeroshot, batch):
    student, teacher = _perturbed(zeroshot), copy.deepcopy(zeroshot)
    opts = MethodOptions(cam=kind, cam_source=cam_from, masking=masking, seed=5, rank=1)
    method = build_method("fd-refill", student, teacher, opts)
    out = method(batch)
    out["loss"].backward()
    one_pass = _grads(student)

    reference = copy.deepcopy(student)
    reference.zero_grad(set_to_none=True)
    loss, cf = _separate_pass_loss(reference, teacher, batch, parse_masking(masking), kind, cam_from,
                                   make_generator(5, 1))
    loss.backward()
    assert float(out["mask_ratio"]) == pytest.approx(float(cf.mask.float().mean()))
    assert 0 < float(out["mask_ratio"]) < 1
    assert float(out["loss"].detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    separate = _grads(reference)
    assert one_pass.keys() == separate.keys() and one_pass
    for name, grad in one_pass.items():
        assert torch.allclose(grad, separate[name], rtol=1e-4, atol=1e-6), name


def test_student_cam_costs_one_clean_pass(zeroshot, batch):
    """Clean logits + attention maps in one pass, then one pass on x_cf: two student passes in all."""
    student, teacher = _perturbed(zeroshot), copy.deepcopy(zeroshot)
    rec_s, rec_t = _Recorder(student), _Recorder(teacher)
    build_method("fd-refill", student, teacher, MethodOptions())(batch)
    assert [(c[0], c[2].get("return_attn")) for c in rec_s.calls] == [("forward_with_features", True),
                                                                       ("forward_features", None)]
    # Teacher and student see the same counterfactual images.
    assert len(rec_t.calls) == 1
    assert torch.equal(rec_t.calls[0][1], rec_s.calls[1][1])
    assert not torch.equal(rec_s.calls[1][1], batch["image"])


@pytest.mark.parametrize(("name", "masking", "source"), [
    ("fd-refill", "RandMaskSingleFill(0.5)", "student"), ("fd-refill", "ObjMaskSingleFill(0.3)", "teacher"),
    ("kd-refill", "CtxMaskMultiFill(0.3)", "teacher"),
])
def test_without_a_student_cam_clean_and_refilled_images_share_one_student_pass(name, masking, source, zeroshot,
                                                                                batch):
    student, teacher = _perturbed(zeroshot), copy.deepcopy(zeroshot)
    rec_s, rec_t = _Recorder(student), _Recorder(teacher)
    opts = MethodOptions(masking=masking, cam_source=source, cam="gradcam")
    out = build_method(name, student, teacher, opts)(batch)
    assert len(rec_s.calls) == 1
    (_, joint, kwargs), (_, t_images, _) = rec_s.calls[0], rec_t.calls[-1]
    assert kwargs.get("return_attn") is None and joint.shape[0] == 2 * BATCH
    assert torch.equal(joint[:BATCH], batch["image"]) and torch.equal(joint[BATCH:], t_images)
    assert out["logits"].shape == (BATCH, NUM_CLASSES)
    with torch.no_grad():
        assert torch.allclose(out["logits"], student(batch["image"]), atol=1e-5)


def test_no_grad_scoring_still_computes_the_student_cam(zeroshot, batch):
    method = build_method("fd-refill", _perturbed(zeroshot), copy.deepcopy(zeroshot), MethodOptions())
    state = None
    with torch.no_grad():
        out = method(batch)
        state = method.extra_state()
    assert torch.isfinite(out["loss"]) and not out["loss"].requires_grad and not out["logits"].requires_grad
    assert state


def test_kd_refill_distils_logits_on_the_counterfactual(zeroshot, batch):
    student, teacher = _perturbed(zeroshot), copy.deepcopy(zeroshot)
    method = build_method("kd-refill", student, teacher, MethodOptions(masking="RandMaskSingleFill(0.5)", seed=2))
    with torch.no_grad():
        out = method(batch)
        cf = build_counterfactual(batch["image"], parse_masking("RandMaskSingleFill(0.5)"), patch=8,
                                  generator=make_generator(2, 0))
        expected = kd_loss(student(cf.images), teacher(cf.images), 10.0)
    assert float(out["loss_dist"]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(("name", "masking", "field"), [
    ("fd-tokendrop", "RandMaskNoFill(0.75)", "keep_idx"), ("fd-attnmask", "ObjMaskNoFill(0.3)", "key_mask"),
    ("fd-attnmask", "CtxMaskNoFill(0.6)", "key_mask"),
])
def test_nofill_methods_pass_the_same_mask_to_both_models(name, masking, field, zeroshot, batch):
    student, teacher = _perturbed(zeroshot), copy.deepcopy(zeroshot)
    rec_s, rec_t = _Recorder(student), _Recorder(teacher)
    out = build_method(name, student, teacher, MethodOptions(masking=masking))(batch)
    (_, t_images, t_kwargs), (_, s_images, s_kwargs) = rec_t.calls[-1], rec_s.calls[-1]
    assert torch.equal(t_images, batch["image"]) and torch.equal(s_images, batch["image"])  # nothing refilled
    assert t_kwargs[field] is not None and torch.equal(t_kwargs[field], s_kwargs[field])
    other = "key_mask" if field == "keep_idx" else "keep_idx"
    assert t_kwargs[other] is None and s_kwargs[other] is None
    if field == "keep_idx":
        assert t_kwargs[field].shape == (BATCH, int(16 * 0.25))
        assert float(out["mask_ratio"]) == pytest.approx(0.75)
    else:
        assert t_kwargs[field].dtype == torch.bool and t_kwargs[field].shape == (BATCH, 16)
    # the clean pass of the student had no mask
    assert rec_s.calls[0][2].get("keep_idx") is None and rec_s.calls[0][2].get("key_mask") is None


def test_generator_is_per_rank_and_resumable(zeroshot, batch):
    def masks(rank: int, steps: int, state=None):
        method = build_method("fd-refill", copy.deepcopy(zeroshot), copy.deepcopy(zeroshot),
                              MethodOptions(masking="RandMaskSingleFill(0.5)", rank=rank))
        if state is not None:
            method.load_extra_state(state)
        ratios = []
        with torch.no_grad():
            for _ in range(steps):
                ratios.append(float(method(batch)["mask_ratio"]))
        return ratios, method.extra_state()

    rank0, _ = masks(0, 4)
    rank1, _ = masks(1, 4)
    assert rank0 != rank1
    first, state = masks(0, 2)
    resumed, _ = masks(0, 2, state)
    assert first + resumed == rank0


# ----------------------------------------------------------------------------- teacher-CAM cache
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cam-images")
    rng = np.random.default_rng(0)
    for i in range(7):
        folder = root / f"class{i % NUM_CLASSES}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _dataset(root: Path, augment: bool = False) -> ImageFolderDataset:
    classes = [f"class{k}" for k in range(NUM_CLASSES)]
    return ImageFolderDataset(root, classes, build_transform(32, train_augment=augment))


def test_cached_teacher_cam_equals_the_on_the_fly_cam(zeroshot, image_folder, tmp_path):
    teacher = copy.deepcopy(zeroshot)
    data = _dataset(image_folder)
    cams = cc.load_or_build_teacher_cam_cache(teacher, data, model_name="robustft-tiny", kind="mmcam",
                                              batch_size=3, cache_dir=tmp_path, progress=False)
    assert cams.shape == (7, 4, 4)
    images = torch.stack([data[i][0] for i in range(7)])
    labels = torch.tensor([data[i][1] for i in range(7)])
    direct = compute_cam(teacher, images, labels, "mmcam").raw
    assert torch.allclose(cams, direct, rtol=1e-5, atol=1e-7)
    assert len(list(tmp_path.glob("teacher-mmcam-*.safetensors"))) == 1

    # the second call reads the file; a different teacher or CAM kind gets its own file
    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt although a matching cache file exists")

    original, cc.build_teacher_cam_cache = cc.build_teacher_cam_cache, refuse
    try:
        again = cc.load_or_build_teacher_cam_cache(teacher, data, model_name="robustft-tiny", kind="mmcam",
                                                   cache_dir=tmp_path, progress=False)
    finally:
        cc.build_teacher_cam_cache = original
    assert torch.equal(again, cams)
    cc.load_or_build_teacher_cam_cache(_perturbed(teacher), data, model_name="robustft-tiny", kind="mmcam",
                                       cache_dir=tmp_path, progress=False)
    cc.load_or_build_teacher_cam_cache(teacher, data, model_name="robustft-tiny", kind="gradcam",
                                       cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("teacher-*.safetensors"))) == 3


def test_flagship_with_cache_equals_teacher_cam_on_the_fly(zeroshot, image_folder, tmp_path):
    data = _dataset(image_folder)
    cams = cc.load_or_build_teacher_cam_cache(copy.deepcopy(zeroshot), data, model_name="robustft-tiny",
                                              cache_dir=tmp_path, progress=False)
    order = torch.tensor([5, 0, 3, 6, 1, 2])
    batch = {"image": torch.stack([data[int(i)][0] for i in order]),
             "label": torch.tensor([data[int(i)][1] for i in order]), "index": order}
    student = _perturbed(zeroshot)
    opts = MethodOptions(cam_source="teacher", seed=9)
    cached = build_method("fd-refill", copy.deepcopy(student), copy.deepcopy(zeroshot), opts, teacher_cams=cams)
    fly = build_method("fd-refill", copy.deepcopy(student), copy.deepcopy(zeroshot), opts)
    with torch.no_grad():
        a, b = cached(batch), fly(batch)
    assert float(a["mask_ratio"]) == pytest.approx(float(b["mask_ratio"]))
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)


def test_random_transform_cannot_be_cached(zeroshot, image_folder, tmp_path):
    with pytest.raises(ConfigError, match="random.*RandomResizedCrop"):
        cc.load_or_build_teacher_cam_cache(zeroshot, _dataset(image_folder, augment=True),
                                           model_name="robustft-tiny", cache_dir=tmp_path, progress=False)


def test_cache_index_outside_the_cache_is_a_data_error(zeroshot, batch):
    from robustft.errors import DataError

    method = build_method("fd-refill", copy.deepcopy(zeroshot), copy.deepcopy(zeroshot),
                          MethodOptions(cam_source="teacher"), teacher_cams=torch.rand(3, 4, 4))
    with pytest.raises(DataError, match="rebuild"):
        method(batch)


def test_resumed_training_equals_an_uninterrupted_run(zeroshot, tmp_path):
    """Through the real loop: the mask generator is checkpointed with the weights (mid-epoch resume)."""
    from robustft.engine.trainer import TrainSettings, fit

    class Stop(Exception):
        pass

    def stop_at_3(step: int) -> None:
        if step == 3:
            raise Stop

    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(16, 3, 32, 32, generator=gen), torch.arange(16) % NUM_CLASSES
    loader = [{"image": images[i:i + 4], "label": labels[i:i + 4], "index": torch.arange(i, i + 4)}
              for i in range(0, 16, 4)]
    settings = TrainSettings(epochs=2, lr=1e-3, tensorboard=False, checkpoint_every=3)

    def method():
        return build_method("fd-refill", copy.deepcopy(zeroshot), copy.deepcopy(zeroshot),
                            MethodOptions(masking="RandMaskSingleFill(0.5)", seed=4))

    full = method()
    fit(full, list(loader), settings, run_dir=tmp_path / "full", progress=False)
    with pytest.raises(Stop):
        fit(method(), list(loader), settings, run_dir=tmp_path / "cut", progress=False, on_step_end=stop_at_3)
    resumed = method()
    fit(resumed, list(loader), settings, run_dir=tmp_path / "cut", progress=False, resume=True)
    for (name, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(full.student.head.weight, zeroshot.head.weight)

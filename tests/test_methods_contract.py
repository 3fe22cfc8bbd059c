"""methods: the contract every registered method keeps, and the errors bad input gets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustft.errors import ConfigError, ModelError
from robustft.methods import METHODS, MethodOptions, build_method, list_methods
from robustft.model.classifier import ImageClassifier

from _methods_fixtures import BATCH, NUM_CLASSES, _one_thread, batch, text_context, zeroshot  # noqa: F401


def _build(name: str, zeroshot: ImageClassifier, **options: object):
    student, teacher = copy.deepcopy(zeroshot), copy.deepcopy(zeroshot)
    return build_method(name, student, teacher, MethodOptions(**options), context=text_context()), teacher


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _loss_at(method, batch, state) -> float:
    """The loss with the generator restored to ``state`` (identical masks on every call)."""
    method.load_extra_state(state)
    with torch.no_grad():
        return float(method(batch)["loss"])


def _train_steps(method, batch, steps: int = 5, lr: float = 2e-4) -> None:
    optimizer = torch.optim.AdamW(method.param_groups(0.1), lr=lr)
    method.train()
    for _ in range(steps):
        optimizer.zero_grad()
        method(batch)["loss"].backward()
        optimizer.step()


def _stage_names() -> list[str]:
    """Every registered name that is fitted as it is (composites contribute their stages)."""
    return [n for n in METHODS.names() if METHODS.get(n).trains and n != "lp-ft"]


def test_registry_lists_every_paper_method():
    names = [n for n, _ in list_methods()]
    assert names == ["zeroshot", "lp", "ft", "lp-ft", "wise-ft", "kd", "fd", "kd-refill", "fd-refill",
                     "fd-tokendrop", "fd-attnmask", "l2sp", "flyp", "flyp-fd-refill"]
    assert all(desc and "\n" not in desc for _, desc in list_methods())


@pytest.mark.parametrize("name", METHODS.names())
def test_stages_name_registered_trainable_methods(name, zeroshot):
    method, _ = _build(name, zeroshot)
    for stage in method.stages():
        assert stage in METHODS and METHODS.get(stage).trains
    if name == "lp-ft":
        assert method.stages() == ["lp", "ft"]
    elif name == "zeroshot":
        assert method.stages() == [] and method.trains is False
    else:
        assert method.stages() == [name]
    assert METHODS.get(name).stages() == method.stages()  # a class-level answer: no instance needed


@pytest.mark.parametrize("name", _stage_names())
def test_method_contract(name, zeroshot, batch):
    method, teacher = _build(name, zeroshot)
    teacher_before = _snapshot(teacher)
    out = method(batch)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert out["logits"].shape == (BATCH, NUM_CLASSES)
    for key, value in out.items():
        if key not in ("loss", "logits"):
            assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key
    # The trainable module is the student, the teacher is never part of it.
    trainable_ids = {id(p) for p in method.trainable_module().parameters()}
    assert not any(id(p) in trainable_ids for p in teacher.parameters())

    state0 = method.extra_state()
    method(batch)  # a first draw creates the generator for masked methods
    state0 = state0 or method.extra_state()
    before = _loss_at(method, batch, state0)
    _train_steps(method, batch)
    after = _loss_at(method, batch, state0)
    assert after < before - 1e-3, (before, after)

    # The teacher is frozen and stays in eval mode whatever the method's mode.
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    method.train()
    assert method.student.training and not teacher.training
    if method.needs_teacher:
        assert method.teacher is teacher and all(not p.requires_grad for p in teacher.parameters())
    else:
        assert method.teacher is None


@pytest.mark.parametrize("name", _stage_names())
def test_state_round_trip_reproduces_loss(name, zeroshot, batch):
    method, _ = _build(name, zeroshot)
    _train_steps(method, batch, steps=2)
    weights, extra = method.trainable_module().state_dict(), method.extra_state()
    expected = float(method(batch)["loss"].detach())

    fresh, _ = _build(name, zeroshot)
    fresh.trainable_module().load_state_dict(weights)
    fresh.load_extra_state(extra)  # before the first step: applied when the generator is made
    assert float(fresh(batch)["loss"].detach()) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_lp_trains_the_head_only(zeroshot, batch):
    method, _ = _build("lp", zeroshot)
    visual_before, head_before = _snapshot(method.student.visual), _snapshot(method.student.head)
    assert {id(p) for g in method.param_groups(0.1) for p in g["params"]} == \
        {id(p) for p in method.student.head.parameters()}
    _train_steps(method, batch, steps=3)
    assert all(torch.equal(visual_before[k], v) for k, v in method.student.visual.state_dict().items())
    assert not torch.equal(head_before["weight"], method.student.head.weight)


def test_ft_after_lp_trains_the_encoder_again(zeroshot, batch):
    student = copy.deepcopy(zeroshot)
    build_method("lp", student, None)
    ft = build_method("ft", student, None)
    assert all(p.requires_grad for p in ft.trainable_module().parameters())


def test_zeroshot_does_not_train(zeroshot, batch):
    method, _ = _build("zeroshot", zeroshot)
    assert method.trains is False and method.param_groups(0.1) == []
    out = method(batch)
    assert out["logits"].shape == (BATCH, NUM_CLASSES) and not out["loss"].requires_grad
    assert torch.allclose(out["logits"], zeroshot(batch["image"]), atol=1e-6)


def test_label_smoothing_reaches_the_cross_entropy(zeroshot, batch):
    method, _ = _build("ft", zeroshot, label_smoothing=0.2)
    with torch.no_grad():
        out = method(batch)
    expected = torch.nn.functional.cross_entropy(out["logits"], batch["label"], label_smoothing=0.2)
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-6)
    plain = torch.nn.functional.cross_entropy(out["logits"], batch["label"])
    assert float(out["loss"]) != pytest.approx(float(plain), rel=1e-4)


def test_wise_ft_endpoints_and_midpoint(zeroshot, batch):
    method, _ = _build("wise-ft", zeroshot, alphas=(0.0, 0.5, 1.0))
    _train_steps(method, batch, steps=2, lr=1e-2)
    out = method.finalize(method.student, zeroshot)
    assert list(out) == [0.0, 0.5, 1.0] and len(out) == 3 and 0.25 not in out
    built = {alpha: classifier.state_dict() for alpha, classifier in out.items()}
    zs, ft = zeroshot.state_dict(), method.student.state_dict()
    assert not torch.equal(zs["head.weight"], ft["head.weight"])
    for key in zs:
        assert torch.equal(built[0.0][key], zs[key]), key
        assert torch.equal(built[1.0][key], ft[key]), key
        assert torch.allclose(built[0.5][key], (zs[key] + ft[key]) / 2, atol=1e-6), key
    assert built[1.0]["head.weight"].data_ptr() != ft["head.weight"].data_ptr()
    assert not out[0.5].training and not any(p.requires_grad for p in out[0.5].parameters())


def test_plain_methods_finalize_to_the_student(zeroshot):
    method, _ = _build("fd-refill", zeroshot)
    assert method.finalize(method.student, zeroshot) == {None: method.student}


# ----------------------------------------------------------------------------- bad input
class _ConvTower(nn.Module):
    """A non-ViT image tower (a CNN) with the same output width as the tiny ViT."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, dim, 8, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_unknown_method_lists_the_valid_ones(zeroshot):
    with pytest.raises(ConfigError, match=r"unknown method 'fd-refil'.*did you mean 'fd-refill'.*valid:"):
        _build("fd-refil", zeroshot)


@pytest.mark.parametrize(("name", "masking", "accepted"), [
    ("fd-refill", "ObjMaskNoFill(0.3)", "RandMaskSingleFill"),
    ("kd-refill", "RandMaskNoFill(0.75)", "ObjMaskMultiFill"),
    ("fd-tokendrop", "ObjMaskSingleFill(0.3)", "RandMaskNoFill"),
    ("fd-tokendrop", "ObjMaskNoFill(0.3)", "RandMaskNoFill"),
    ("fd-attnmask", "RandMaskMultiFill(0.5)", "ObjMaskNoFill, CtxMaskNoFill"),
    ("fd-attnmask", "RandMaskNoFill(0.5)", "ObjMaskNoFill, CtxMaskNoFill"),
])
def test_masking_kind_must_suit_the_method(name, masking, accepted, zeroshot):
    with pytest.raises(ConfigError, match=rf"method '{name}' cannot use masking {masking.split('(')[0]}.*{accepted}"):
        _build(name, zeroshot, masking=masking)


@pytest.mark.parametrize("masking", ["ObjMaskSingleFill(1.5)", "RandMaskSingleFill(-0.1)", "BlobMaskSingleFill"])
def test_bad_masking_values_are_config_errors(masking, zeroshot):
    with pytest.raises(ConfigError):
        _build("fd-refill", zeroshot, masking=masking)


def test_derangement_needs_a_single_fill(zeroshot):
    method, _ = _build("fd-refill", zeroshot, donors="derangement")
    assert method.masking.donors == "derangement"
    with pytest.raises(ConfigError, match="SingleFill"):
        _build("fd-refill", zeroshot, masking="ObjMaskMultiFill(0.6)", donors="derangement")


@pytest.mark.parametrize("name", ["fd-refill", "kd-refill", "fd-tokendrop", "fd-attnmask"])
def test_masking_on_a_non_vit_is_a_model_error(name, zeroshot):
    tower = _ConvTower(zeroshot.visual.output_dim)
    cnn = ImageClassifier(tower, copy.deepcopy(zeroshot.head), zeroshot.preprocess)
    assert not cnn.is_vit
    with pytest.raises(ModelError, match=rf"'{name}'.*needs a ViT.*_ConvTower"):
        build_method(name, cnn, copy.deepcopy(cnn), MethodOptions())
    build_method("fd", copy.deepcopy(cnn), copy.deepcopy(cnn), MethodOptions())  # no masking: fine


def test_distillation_needs_a_separate_teacher(zeroshot):
    student = copy.deepcopy(zeroshot)
    with pytest.raises(ModelError, match="teacher"):
        build_method("kd", student, None, MethodOptions())
    with pytest.raises(ModelError, match="copy"):
        build_method("fd", student, student, MethodOptions())


def test_methods_without_teacher_hold_none(zeroshot):
    method, _ = _build("ft", zeroshot)
    assert method.teacher is None


@pytest.mark.parametrize(("key", "value", "match"), [
    ("cam", "scorecam", "did you mean|valid"), ("cam_source", "both", "valid"), ("temperature", 0.0, "range"),
    ("label_smoothing", 1.0, "below 1"), ("alphas", (0.5, 1.5), "range"), ("task_weight", -1.0, "range"),
    ("distill_weight", float("nan"), "finite"), ("rank", -1, "non-negative"), ("alphas", (), "non-empty"),
])
def test_bad_options_are_config_errors(key, value, match):
    with pytest.raises(ConfigError, match=match):
        MethodOptions(**{key: value})


def test_which_methods_want_a_teacher_cam_cache():
    wanted = {n for n in METHODS.names() if METHODS.get(n).wants_teacher_cams(MethodOptions(cam_source="teacher"))}
    assert wanted == {"kd-refill", "fd-refill", "fd-attnmask", "flyp-fd-refill"}  # tokendrop masks at random
    assert not any(METHODS.get(n).wants_teacher_cams(MethodOptions()) for n in METHODS.names())
    rand = MethodOptions(cam_source="teacher", masking="RandMaskSingleFill(0.5)")
    assert not METHODS.get("fd-refill").wants_teacher_cams(rand)


def test_teacher_cam_cache_only_where_it_applies(zeroshot):
    cams = torch.rand(BATCH, 4, 4)
    with pytest.raises(ConfigError, match="does not use class activation maps"):
        build_method("ft", copy.deepcopy(zeroshot), None, MethodOptions(), teacher_cams=cams)
    unused = build_method("fd-refill", copy.deepcopy(zeroshot), copy.deepcopy(zeroshot), MethodOptions(),
                          teacher_cams=cams)
    assert unused.teacher_cams is None  # the CAM comes from the student: the cache is not consulted
    with pytest.raises(ModelError, match=r"\[N, 4, 4\]"):
        build_method("fd-refill", copy.deepcopy(zeroshot), copy.deepcopy(zeroshot),
                     MethodOptions(cam_source="teacher"), teacher_cams=torch.rand(BATCH, 7, 7))

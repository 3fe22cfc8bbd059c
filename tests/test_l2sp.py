"""L2-SP: the term against a hand computation, its gradient, its anchor, its weight, the CLI.

``L_l2sp = sum_p ||theta_p - theta0_p||^2`` (no 1/2) over every trainable parameter, the
head included, ``theta0`` the weights when the method was built; added as
``method.l2sp_weight * L_l2sp`` (0.01 by default, the LP-FT reference's value).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from robustft.cli import main
from robustft.methods import MethodOptions, build_method
from robustft.model import load_classifier

from _methods_fixtures import _one_thread, batch, text_context, zeroshot  # noqa: F401


def _perturb(module: torch.nn.Module, scale: float = 0.01, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def _hand_l2sp(module: torch.nn.Module, start: dict[str, torch.Tensor]) -> float:
    return sum(float(((p.detach().double() - start[k].double()) ** 2).sum()) for k, p in module.named_parameters()
               if p.requires_grad)


def test_l2sp_is_zero_at_the_start_and_a_plain_sum_of_squares_after_a_perturbation(zeroshot, batch) -> None:
    student = copy.deepcopy(zeroshot)
    start = _snapshot(student)
    method = build_method("l2sp", student, None)
    with torch.no_grad():
        assert float(method(batch)["loss_l2sp"]) == 0.0
    _perturb(student)
    with torch.no_grad():
        out = method(batch)
    expected = _hand_l2sp(student, start)
    assert expected > 0
    assert float(out["loss_l2sp"]) == pytest.approx(expected, rel=1e-5)  # no 1/2 factor
    # Every trainable parameter counts, the head included.
    assert {"head.weight", "head.bias"} <= set(method.reg_terms[0]._names)
    assert set(method.reg_terms[0]._names) == {k for k, p in student.named_parameters() if p.requires_grad}
    only_head = copy.deepcopy(zeroshot)
    with torch.no_grad():
        only_head.head.weight.add_(0.5)
    head_method = build_method("l2sp", copy.deepcopy(zeroshot), None)
    head_method.student.load_state_dict(only_head.state_dict())
    with torch.no_grad():
        value = float(head_method(batch)["loss_l2sp"])
    assert value == pytest.approx(0.25 * zeroshot.head.weight.numel(), rel=1e-5)


def test_l2sp_weight_scales_the_term_in_the_loss(zeroshot, batch) -> None:
    assert MethodOptions().l2sp_weight == 0.01
    for weight in (0.01, 0.5):
        student = copy.deepcopy(zeroshot)
        method = build_method("l2sp", student, None, MethodOptions(l2sp_weight=weight))
        _perturb(student)
        with torch.no_grad():
            out = method(batch)
        assert float(out["loss"]) == pytest.approx(float(out["loss_task"]) + weight * float(out["loss_l2sp"]),
                                                   rel=1e-6)


def test_l2sp_gradient_is_twice_the_displacement_times_the_weight(zeroshot, batch) -> None:
    student = copy.deepcopy(zeroshot)
    start = _snapshot(student)
    weight = 0.3
    # task_weight 0 leaves the L2-SP term alone in the loss.
    method = build_method("l2sp", student, None, MethodOptions(task_weight=0.0, l2sp_weight=weight))
    _perturb(student)
    method(batch)["loss"].backward()
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, 2 * (p.detach() - start[name]) * weight, rtol=1e-5, atol=1e-8, msg=name)


def test_the_anchor_is_the_student_when_the_method_was_built(zeroshot, batch) -> None:
    """A stage built after another (an LP-FT-style sequence) anchors to the weights it starts from."""
    student = copy.deepcopy(zeroshot)
    probe = build_method("lp", student, None)
    with torch.no_grad():
        probe.student.head.weight.mul_(1.5)  # as if the probe had trained the head
    probed = _snapshot(student)
    method = build_method("ce+l2sp", student, None)
    with torch.no_grad():
        assert float(method(batch)["loss_l2sp"]) == 0.0  # the probed head is the anchor, not zero-shot's
    assert all(p.requires_grad for p in student.parameters())  # the encoder trains again after the probe
    _perturb(student, seed=7)
    with torch.no_grad():
        value = float(method(batch)["loss_l2sp"])
    assert value == pytest.approx(_hand_l2sp(student, probed), rel=1e-5)
    assert value != pytest.approx(_hand_l2sp(student, _snapshot(zeroshot)), rel=1e-3)


def test_l2sp_anchors_exactly_what_the_task_trains(zeroshot, batch) -> None:
    """With FLYP the text tower trains and is anchored too; the head (rebuilt, not trained) is not."""
    context = text_context()
    method = build_method("flyp+l2sp", copy.deepcopy(zeroshot), None, context=context)
    names = set(method.reg_terms[0]._names)
    pair = method.trainable_module()
    assert names == {k for k, p in pair.named_parameters() if p.requires_grad}
    assert any(n.startswith("text.") for n in names) and "text.logit_scale" in names
    assert not any(n.startswith("student.head.") for n in names)
    start = _snapshot(pair)
    _perturb(context["text"].tower)
    with torch.no_grad():
        value = float(method(batch)["loss_l2sp"])
    assert value > 0 and value == pytest.approx(_hand_l2sp(pair, start), rel=1e-5)


def test_l2sp_trains_from_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "l2sp"
    assert main(["train", "--config", "smoke", "--out", str(out), "--no-progress", "--no-eval",
                 "--set", "data.limit_train=32", "--set", "data.holdout=8", "--set", "data.batch_size=8",
                 "--set", "data.eval_sets=[id]", "--set", "method.name=l2sp"]) == 0
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert steps and all(r["loss_l2sp"] >= 0 for r in steps) and steps[-1]["loss_l2sp"] > 0
    assert all(r["loss"] == pytest.approx(r["loss_task"] + 0.01 * r["loss_l2sp"], rel=1e-4) for r in steps)
    clf, meta = load_classifier(out)
    assert meta["extra"]["method"] == "l2sp" and meta["extra"]["config"]["method"]["l2sp_weight"] == 0.01
    assert all(torch.isfinite(v).all() for v in clf.state_dict().values())

"""benchmarks/step_cost.py works end to end on robustft-tiny (a smoke test, not a timed test)."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
REQUIRED = ("method", "masking", "cam_source", "images_per_s", "ratio_to_ft", "peak_mem_mb")


@pytest.fixture()
def step_cost(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # On sys.path (not loaded from a file spec) so that spawned memory children can import it.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("step_cost")


def test_main_times_every_case_and_writes_json_records(step_cost: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    records = step_cost.main(["--model", "robustft-tiny", "--batch", "4", "--steps", "2", "--warmup", "1",
                              "--threads", "1", "--methods", "flagship", "flagship-cached", "rand", "fd",
                              "objective", "--memory", "none", "--breakdown-steps", "1", "--eval-repeats", "1",
                              "--json", str(out)])
    by_case = {r["case"]: r for r in records}
    assert list(by_case) == ["ft", "flagship", "flagship-cached", "rand", "fd",  # ft added and first
                             "flyp", "flyp-fd-refill", "l2sp"]
    assert by_case["ft"]["ratio_to_ft"] == pytest.approx(1.0)
    for r in records:
        assert r["images_per_s"] > 0 and math.isfinite(r["ratio_to_ft"]) and r["ratio_to_ft"] > 0
        assert len(r["step_times_s"]) == 2
    assert (by_case["flagship"]["cam_source"], by_case["flagship"]["cam_cache"]) == ("student", False)
    assert (by_case["flagship-cached"]["cam_source"], by_case["flagship-cached"]["cam_cache"]) == ("teacher", True)
    assert by_case["rand"]["masking"] == "RandMaskSingleFill(0.5)" and by_case["rand"]["cam_source"] is None
    # The phase breakdown saw the real method calls: two student passes and a teacher pass for
    # the flagship, one student pass and no teacher for ft.
    flagship = by_case["flagship"]["phases_s"]
    for phase in ("student clean forward", "cam", "masking", "teacher forward", "student cf forward", "backward",
                  "optimizer"):
        assert phase in flagship
    assert "teacher forward" not in by_case["ft"]["phases_s"]
    assert "student cf forward" not in by_case["fd"]["phases_s"]
    assert "cam" not in by_case["rand"]["phases_s"] and "cam" in by_case["flagship-cached"]["phases_s"]
    # FLYP tokenizes the captions and runs the text tower after the clean student pass; with the
    # counterfactual term it also has the flagship's CAM, teacher and counterfactual passes.
    for key in ("flyp", "flyp-fd-refill"):
        for phase in ("student clean forward", "tokenize", "text tower forward", "backward"):
            assert phase in by_case[key]["phases_s"], (key, phase)
    assert "teacher forward" not in by_case["flyp"]["phases_s"] and "cam" not in by_case["flyp"]["phases_s"]
    for phase in ("cam", "masking", "teacher forward", "student cf forward"):
        assert phase in by_case["flyp-fd-refill"]["phases_s"], phase
    for key in ("ft", "fd", "l2sp", "flagship"):
        assert "text tower forward" not in by_case[key]["phases_s"], key
    assert (by_case["flyp-fd-refill"]["masking"], by_case["flyp-fd-refill"]["cam_source"]) == (
        "ObjMaskSingleFill(0.3)", "student")
    # Without the student's CAM, clean and counterfactual images share one student pass.
    for key in ("rand", "flagship-cached"):
        assert "student clean+cf forward" in by_case[key]["phases_s"], key
        assert "student cf forward" not in by_case[key]["phases_s"], key
    # Exclusive phase times (process CPU time here) add up to the step, less only the timer calls.
    for r in records:
        step = r["phases_s"]["(step)"]
        accounted = sum(v for k, v in r["phases_s"].items() if k != "(step)")
        assert all(v >= 0 for v in r["phases_s"].values())
        assert 0.7 * step <= accounted <= step * 1.001 + 1e-4, (r["case"], accounted, step)
    written = json.loads(out.read_text())
    assert isinstance(written, list) and len(written) == len(records)
    for r in written:
        assert all(key in r for key in REQUIRED)
        assert r["run"]["eval_forward"]["robustft_images_per_s"] > 0


def test_peak_memory_is_measured_in_a_fresh_child(step_cost: ModuleType) -> None:
    args = argparse.Namespace(model="robustft-tiny", batch=4, device="cpu", precision="fp32", threads=1, seed=0,
                              mem_steps=2, mem_jobs=2)
    case = step_cost.PRESETS["flagship-cached"]  # one child (a spawn costs seconds): the case with most parts
    memory = step_cost.memory_table([case], args, 32)
    assert 0 < memory[case.key]["peak_mem_mb"] < 4096
    assert "before the models were built" in memory[case.key]["mem_method"]


def test_case_parsing() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        step_cost = importlib.import_module("step_cost")
    finally:
        sys.path.remove(str(BENCHMARKS))
    case = step_cost.parse_case("fd-refill@CtxMaskSingleFill(0.5)@teacher-cache")
    assert (case.method, case.masking, case.cam_source, case.cached) == ("fd-refill", "CtxMaskSingleFill(0.5)",
                                                                         "teacher", True)
    assert step_cost.parse_case("kd").method == "kd"
    assert [c.key for c in step_cost.resolve_cases(["rand", "fd", "rand"])] == ["ft", "rand", "fd"]
    assert {c.key for c in step_cost.resolve_cases(["all"])} == set(step_cost.PRESETS)
    assert [c.key for c in step_cost.resolve_cases(["reference"])] == ["ft", "ref-fd", "ref-rand", "ref-flagship"]
    assert [c.key for c in step_cost.resolve_cases(["objective"])] == ["ft", "flyp", "flyp-fd-refill", "l2sp"]
    assert [step_cost.needs_text(step_cost.PRESETS[k]) for k in ("ft", "l2sp", "flyp", "flyp-fd-refill")] == [
        False, False, True, True]
    with pytest.raises(SystemExit):
        step_cost.parse_case("fd-refill@ObjMaskSingleFill(0.3)@nobody")
    # Cases share one student, so a method that freezes part of it is refused.
    with pytest.raises(SystemExit, match="trains only part"):
        step_cost.main(["--model", "robustft-tiny", "--batch", "2", "--steps", "1", "--threads", "1",
                        "--methods", "lp", "--memory", "none", "--eval-repeats", "0"])


def test_cases_sharing_the_student_train_what_their_method_trains(step_cost: ModuleType) -> None:
    """FLYP trains both towers but not the head (rebuilt from the text tower); ft, built on the
    same student, trains the head: each stepper sets its own trainable parameters."""
    import torch

    torch.set_num_threads(1)
    clip_model, teacher, student, tokenizer = step_cost.load_models("robustft-tiny", torch.device("cpu"), 0)
    text = step_cost.build_text_side(clip_model, tokenizer, torch.device("cpu"))
    pool = step_cost.make_pool(4, teacher.preprocess.image_size, torch.device("cpu"), 0)
    assert all(0 <= int(t) < len(text.templates) for t in pool[0]["template"])
    params = [*student.parameters(), *text.tower.parameters()]
    optimizer = step_cost.build_optimizer([{"params": params, "weight_decay": 0.1}], lr=1e-3, weight_decay=0.1)
    cases = [step_cost.PRESETS[k] for k in ("ft", "flyp")]
    steppers = step_cost.build_steppers(cases, student, teacher, None, optimizer, torch.device("cpu"), "fp32", text)
    assert isinstance(steppers["flyp"].method.trainable_module(), torch.nn.Module)
    for key, head_moves in (("flyp", False), ("ft", True), ("flyp", False)):
        head = student.head.weight.detach().clone()
        tower = text.tower.token_embedding.weight.detach().clone()
        visual = next(student.visual.parameters()).detach().clone()
        steppers[key].step(pool[0])
        assert not torch.equal(visual, next(student.visual.parameters())), key
        assert torch.equal(head, student.head.weight) != head_moves, key
        assert torch.equal(tower, text.tower.token_embedding.weight) == (key == "ft"), key


@pytest.mark.parametrize(("ref", "ours"), [("ref-fd", "fd"), ("ref-rand", "rand"), ("ref-flagship", "flagship")])
def test_reference_sequence_computes_the_same_step_as_the_method(step_cost: ModuleType, ref: str, ours: str) -> None:
    """The reference's pass sequence (separate CAM pass, two student passes) and robustft's
    one-pass step give the same loss and gradients: the benchmark compares equal work."""
    import torch

    _, teacher, student = step_cost.build_models("robustft-tiny", torch.device("cpu"), 0)
    batch = step_cost.make_pool(4, teacher.preprocess.image_size, torch.device("cpu"), 0)[0]
    grads = {}
    losses = {}
    for key in (ref, ours):
        student.zero_grad(set_to_none=True)
        method = step_cost.build_case(step_cost.PRESETS[key], student, teacher, None)
        loss = method(batch)["loss"]
        loss.backward()
        losses[key] = loss.detach()
        grads[key] = [p.grad.detach().clone() for p in student.parameters()]
    assert step_cost.PRESETS[ref].reference and not step_cost.PRESETS[ours].reference
    torch.testing.assert_close(losses[ref], losses[ours], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[ref], grads[ours]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

"""Model soups: the uniform mean, the greedy rule, `robustft soup` end to end and its refusals.

Three tiny smoke runs are trained once for the module: ``a`` and ``b`` share their held-out
split (seed 0; ``b`` another learning rate), ``c`` has seed 1 and so holds out other images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from robustft.cli import main
from robustft.errors import ConfigError
from robustft.evaluation.evaluate import EvalResult
from robustft.evaluation.soup import greedy_order, greedy_soup, uniform_soup
from robustft.model import load_classifier
from robustft.ops.weights import average_state_dicts
from robustft.reports.results import read_rows
from robustft.safeio import load_tensors

TINY = ("--set", "data.limit_train=32", "--set", "data.holdout=8", "--set", "data.batch_size=8",
        "--set", "data.eval_sets=[id]", "--set", "checkpoint.every=0")


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / "classifier.safetensors")[0]


def _edit_meta(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "best", "tensorboard"))
    meta = json.loads((dst / "classifier.json").read_text())
    edit(meta)
    (dst / "classifier.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("soup")
    out = {}
    for name, extra in (("a", ()), ("b", ("--set", "optim.lr=3e-3")), ("c", ("--set", "seed=1"))):
        out[name] = root / name
        assert main(["train", "--config", "smoke", "--out", str(out[name]), "--no-progress", "--no-eval",
                     *TINY, *extra]) == 0
    meta = json.loads((out["a"] / "classifier.json").read_text())
    (root / "world.txt").write_text("\n".join(meta["classnames"]) + "\n")
    (root / "other.txt").write_text("cat\ndog\nbird\n")
    for name, names in (("zs", "world.txt"), ("zs3", "other.txt")):
        out[name] = root / name
        assert main(["zeroshot", "--model", "robustft-tiny", "--pretrained", "none", "--classnames",
                     str(root / names), "--templates", "simple", "--out", str(out[name]), "--no-progress"]) == 0
    return out


def _soup(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["soup", *argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- the rule, on constructed ingredients
class _Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.zeros(1))
        self.register_buffer("count", torch.tensor(3))


def _ingredients(values: dict[str, float]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {"v": torch.tensor([value]), "count": torch.tensor(3)} for name, value in values.items()}


def _scorer(table: dict[float, float], calls: list[float]):
    def score(model: nn.Module) -> float:
        value = model.v.item()
        calls.append(value)
        for key, acc in table.items():
            if abs(key - value) < 1e-6:
                return acc
        raise AssertionError(f"no score planned for a soup with v = {value}")

    return score


def test_greedy_sorts_keeps_strict_improvements_only_and_ties_keep_the_given_order():
    states = _ingredients({"w": 1.0, "x": 2.0, "y": 4.0, "z": 8.0})
    # alone: w 50, x 70, y 70 (tie with x: x was given first), z 60 -> tried in the order x, y, z, w
    table = {1.0: 50.0, 2.0: 70.0, 4.0: 70.0, 8.0: 60.0,
             3.0: 72.0,  # x + y: 72 > 70, kept
             14 / 3: 72.0,  # x + y + z: 72 is not > 72, left out (strict)
             7 / 3: 73.0}  # x + y + w: 73 > 72, kept
    calls: list[float] = []
    result = greedy_soup(_Scalar(), list(states), states.__getitem__, _scorer(table, calls))
    assert [c.name for c in result.candidates] == ["x", "y", "z", "w"]
    assert [c.kept for c in result.candidates] == [True, True, False, True]
    assert [c.holdout_top1 for c in result.candidates] == [70.0, 70.0, 60.0, 50.0]
    assert [c.soup_top1 for c in result.candidates] == [70.0, 72.0, 72.0, 73.0]
    assert result.ingredients == ["x", "y", "w"] and result.holdout_top1 == 73.0
    torch.testing.assert_close(result.model.v.detach(), torch.tensor([(2.0 + 4.0 + 1.0) / 3]))
    assert result.model.count.item() == 3 and not result.model.v.requires_grad
    assert len(calls) == 4 + 3  # each alone, then each candidate soup once

    # the same tie given the other way round: y goes first
    swapped = {k: states[k] for k in ("w", "y", "x", "z")}
    again = greedy_soup(_Scalar(), list(swapped), swapped.__getitem__, _scorer(table, []))
    assert [c.name for c in again.candidates] == ["y", "x", "z", "w"]


def test_greedy_may_keep_only_the_best_run():
    states = _ingredients({"p": 1.0, "q": 3.0})
    result = greedy_soup(_Scalar(), ["p", "q"], states.__getitem__, _scorer({1.0: 40.0, 3.0: 80.0, 2.0: 79.0}, []))
    assert result.ingredients == ["q"] and result.holdout_top1 == 80.0
    assert torch.equal(result.model.v.detach(), torch.tensor([3.0]))  # the best run itself, bit for bit


def test_greedy_order_and_ingredient_checks():
    assert greedy_order(["a", "b", "c", "d"], [10.0, 30.0, 10.0, 30.0]) == [1, 3, 0, 2]
    states = _ingredients({"p": 1.0})
    with pytest.raises(ConfigError, match="at least 2"):
        uniform_soup(_Scalar(), ["p"], states.__getitem__)
    with pytest.raises(ConfigError, match="given twice"):
        greedy_soup(_Scalar(), ["p", "p"], states.__getitem__, lambda m: 0.0)


def test_uniform_soup_streams_the_exact_mean():
    gen = torch.Generator().manual_seed(0)
    states = {name: {"v": torch.randn(1, generator=gen), "count": torch.tensor(3)} for name in "abcde"}
    result = uniform_soup(_Scalar(), list(states), states.__getitem__)
    torch.testing.assert_close(result.model.v.detach(), torch.stack([s["v"] for s in states.values()]).mean(0))
    assert result.ingredients == list("abcde") and result.holdout_top1 is None


# ----------------------------------------------------------------------------- the CLI
def test_uniform_soup_of_runs_is_the_mean_of_every_weight_head_included(runs, tmp_path, capsys):
    out = tmp_path / "uniform"
    code, stdout, err = _soup(capsys, str(runs["a"]), str(runs["b"]), str(runs["c"]), "--out", str(out))
    assert code == 0, err
    assert "uniform soup of 3 runs" in stdout and "| candidate | held-out top-1 |" in stdout
    soup = _tensors(out)
    parts = [_tensors(runs[n]) for n in "abc"]
    assert set(soup) == set(parts[0]) and {"head.weight", "head.bias"} <= set(soup)
    for key, tensor in soup.items():
        if tensor.is_floating_point():
            stack = torch.stack([p[key] for p in parts]).double()
            # the exact mean up to float32 rounding of the three additions (relative to the weights' scale)
            error = (tensor.double() - stack.mean(0)).abs().max().item()
            assert error <= 4 * torch.finfo(torch.float32).eps * stack.abs().max().item(), (key, error)
        else:
            assert torch.equal(tensor, parts[0][key])
    assert not torch.equal(soup["head.weight"], parts[0]["head.weight"])
    meta = json.loads((out / "classifier.json").read_text())
    extra = meta["extra"]
    assert extra["method"] == "soup" and extra["greedy"] is False
    assert extra["ingredients"] == [str(runs[n]) for n in "abc"]
    source_config = json.loads((runs["a"] / "classifier.json").read_text())["extra"]["config"]
    assert extra["config"] == {**source_config, "name": out.name}  # rows are named after the soup
    assert extra["test_sets"] == ["id"] and "id" in extra["folders"]
    log = json.loads((out / "soup.json").read_text())
    assert [c["kept"] for c in log["candidates"]] == [True, True, True]

    # the soup evaluates like any run
    results = tmp_path / "results.jsonl"
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--out", str(results), "--no-progress"]) == 0, capsys.readouterr().err
    rows = read_rows([str(results)])
    assert [(r.dataset, r.method, r.run) for r in rows] == [("id", "soup", out.name)] and 0 <= rows[0].top1 <= 100
    classifier, _ = load_classifier(out)
    assert classifier.num_classes == len(meta["classnames"])


def test_greedy_soup_cli_sorts_and_keeps_strict_gains(runs, tmp_path, capsys, monkeypatch):
    """Held-out scores planned per model: b 80, a 60, zs 40; b + a 85 (kept); + zs 85 (a tie: left out)."""
    import robustft.pipeline.soup as soup_mod

    a, b, zs = (_tensors(runs[n]) for n in ("a", "b", "zs"))
    planned = [(b, 80.0), (a, 60.0), (zs, 40.0),
               (average_state_dicts([b, a], [0.5, 0.5]), 85.0),
               (average_state_dicts([b, a, zs], [1 / 3] * 3), 85.0)]
    seen = []

    def fake_evaluate(model, sets, **kwargs):
        assert [s.name for s in sets] == ["holdout"] and len(sets[0].dataset) == 8
        weight = model.state_dict()["head.weight"]
        for state, acc in planned:
            if torch.allclose(weight, state["head.weight"], rtol=0, atol=1e-4):
                seen.append(acc)
                return [EvalResult("holdout", acc, 100.0, 8, 0, "all classes")]
        raise AssertionError("a model the plan does not know was evaluated")

    monkeypatch.setattr(soup_mod, "evaluate", fake_evaluate)
    out = tmp_path / "greedy"
    code, stdout, err = _soup(capsys, str(runs["a"]), str(runs["b"]), str(runs["zs"]), "--greedy", "--out", str(out))
    assert code == 0, err
    assert sorted(seen) == [40.0, 60.0, 80.0, 85.0, 85.0]
    log = json.loads((out / "soup.json").read_text())
    assert [(c["run"], c["holdout_top1"], c["soup_top1"], c["kept"]) for c in log["candidates"]] == [
        (str(runs["b"]), 80.0, 80.0, True), (str(runs["a"]), 60.0, 85.0, True), (str(runs["zs"]), 40.0, 85.0, False)]
    assert log["ingredients"] == [str(runs["b"]), str(runs["a"])] and log["holdout_top1"] == 85.0
    assert log["holdout"]["seed"] == 0 and log["holdout"]["images"] == 8
    want = average_state_dicts([b, a], [0.5, 0.5])
    assert all(torch.equal(t, want[k]) for k, t in _tensors(out).items())
    assert f"| {runs['zs']} | 40.00 | 85.00 | no |" in stdout
    assert "greedy soup of 2 of 3 runs (held-out top-1 85.00%)" in stdout
    extra = json.loads((out / "classifier.json").read_text())["extra"]
    assert extra["greedy"] is True and extra["ingredients"] == log["ingredients"]
    assert [c["kept"] for c in extra["candidates"]] == [True, True, False]


def test_greedy_soup_cli_real_holdout(runs, tmp_path, capsys):
    out = tmp_path / "greedy-real"
    code, stdout, err = _soup(capsys, str(runs["a"]), str(runs["b"]), "--greedy", "--out", str(out),
                              "--batch-size", "4", "--workers", "0")
    assert code == 0, err
    log = json.loads((out / "soup.json").read_text())
    first, second = log["candidates"]
    assert first["kept"] and first["holdout_top1"] >= second["holdout_top1"]
    assert second["kept"] == (second["soup_top1"] > first["holdout_top1"])
    soup = _tensors(out)
    if second["kept"]:
        want = average_state_dicts([_tensors(Path(first["run"])), _tensors(Path(second["run"]))], [0.5, 0.5])
    else:
        want = _tensors(Path(first["run"]))
    assert all(torch.equal(t, want[k]) for k, t in soup.items())


@pytest.mark.parametrize("case, fragment", [
    ("one", "a soup averages 2 or more runs; got 1"),
    ("twice", "is given twice"),
    ("classes", "has another class list than"),
    ("arch", "is a 'ViT-B-32' model and"),
    ("keys", "weights do not fit"),
    ("seed", "held out other images than"),
    ("holdout0", "was trained with data.holdout=0"),
    ("wise", "is a WiSE-FT run and has no classifier of its own"),
    ("inside", "holds the ingredient"),
])
def test_mismatched_runs_are_refused_with_one_line_and_nothing_written(case, fragment, runs, tmp_path, capsys):
    a, b = str(runs["a"]), str(runs["b"])
    out = tmp_path / "soup"

    def edited(edit) -> str:
        return str(_edit_meta(runs["b"], tmp_path / f"b-{case}", edit))

    def wise_run() -> str:
        folder = tmp_path / "wise-run"
        shutil.copytree(runs["b"], folder / "wise" / "alpha_0.50", ignore=shutil.ignore_patterns(
            "checkpoints", "best", "tensorboard"))
        return str(folder)

    argv = {
        "one": lambda: [a],
        "twice": lambda: [a, a],
        "classes": lambda: [a, str(runs["zs3"])],
        "arch": lambda: [a, edited(lambda m: m.update(model_name="ViT-B-32"))],
        "keys": lambda: [a, edited(lambda m: m["tensors"].pop("head.bias"))],
        "seed": lambda: [a, str(runs["c"]), "--greedy"],
        "holdout0": lambda: [a, edited(lambda m: m["extra"]["config"]["data"].update(holdout=0)), "--greedy"],
        "wise": lambda: [a, wise_run()],
        "inside": lambda: [a, b],
    }[case]()
    target = runs["a"].parent if case == "inside" else out
    before = sorted(p.name for p in target.iterdir()) if target.exists() else None
    code, _, err = _soup(capsys, *argv, "--out", str(target))
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("robustft soup: error: ") and fragment in lines[-1], err
    assert "Traceback" not in err
    assert (sorted(p.name for p in target.iterdir()) if target.exists() else None) == before

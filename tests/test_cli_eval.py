"""`robustft eval`, `wise`, `report` and `datasets check` end to end from the CLI.

Evaluation runs on tiny fake trees in the official on-disk layouts (real folder names, a
few random images) and on small class-per-folder sets cut from the synthetic world.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from robustft.cli import main
from robustft.data import testing as fake
from robustft.model import load_classifier
from robustft.pipeline.data import world_paths
from robustft.reports.results import read_rows
from robustft.safeio import load_tensors

SUITE = ("imagenet", "imagenet-v2", "imagenet-r", "imagenet-sketch", "objectnet", "imagenet-a")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI, require success, return stdout."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


# ----------------------------------------------------------------------------- fake official layouts
@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("releases")
    fake.make_fake_imagenet(root, classes=4, per_class=2)
    fake.make_fake_imagenet_v2(root, classes=4, per_class=2)
    fake.make_fake_imagenet_r(root, classes=3, per_class=2)
    fake.make_fake_imagenet_sketch(root, classes=3, per_class=2)
    fake.make_fake_imagenet_a(root, classes=3, per_class=2)
    fake.make_fake_objectnet(root, classes=["banana", "chair", "squeegee"], per_class=2)
    return root


@pytest.fixture(scope="module")
def imagenet_zeroshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inet") / "zs-inet"
    assert main(["zeroshot", "--model", "robustft-tiny", "--pretrained", "none", "--classnames", "imagenet",
                 "--templates", "simple", "--out", str(out), "--no-progress"]) == 0
    return out


def test_eval_on_official_layouts(imagenet_zeroshot: Path, data_root: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results.jsonl"
    out = run(capsys, "eval", "--run", str(imagenet_zeroshot), "--dataset", "imagenet-r,objectnet",
              "--data-root", str(data_root), "--out", str(results), "--no-progress")
    rows = {r.dataset: r for r in read_rows(results)}
    assert list(rows) == ["imagenet-r", "objectnet"]
    assert rows["imagenet-r"].n == 6 and rows["imagenet-r"].protocol == "200-class subset"
    assert rows["objectnet"].n == 4  # squeegee maps to no ImageNet class: not scored
    assert "multi-label" in rows["objectnet"].protocol
    for row in rows.values():
        assert row.run == "zs-inet" and row.method == "zeroshot" and row.alpha is None
        assert 0 <= row.top1 <= row.top5 <= 100
    assert "imagenet-r" in out and str(results) in out

    again = tmp_path / "again.jsonl"
    run(capsys, "eval", "--run", str(imagenet_zeroshot), "--dataset", "imagenet-r,objectnet", "--data-root",
        str(data_root), "--out", str(again), "--batch-size", "3", "--no-progress")
    assert [(r.top1, r.top5, r.n) for r in read_rows(again)] == [(r.top1, r.top5, r.n) for r in rows.values()]


def test_eval_suite_appends_one_row_per_dataset(imagenet_zeroshot: Path, data_root: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "suite.jsonl"
    for _ in range(2):
        run(capsys, "eval", "--run", str(imagenet_zeroshot), "--suite", "imagenet-shifts", "--data-root",
            str(data_root), "--out", str(results), "--no-progress")
    rows = read_rows(results)
    assert [r.dataset for r in rows] == list(SUITE) * 2
    counts = {r.dataset: r.n for r in rows}
    assert counts == {"imagenet": 8, "imagenet-v2": 8, "imagenet-r": 6, "imagenet-sketch": 6, "objectnet": 4,
                      "imagenet-a": 6}
    assert [r.top1 for r in rows[:6]] == [r.top1 for r in rows[6:]]


def test_path_override_finds_a_release_elsewhere(imagenet_zeroshot: Path, data_root: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    moved = tmp_path / "elsewhere" / "my-imagenet-r"
    shutil.copytree(data_root / "imagenet-r", moved)
    results = tmp_path / "r.jsonl"
    run(capsys, "eval", "--run", str(imagenet_zeroshot), "--dataset", "imagenet-r", "--path",
        f"imagenet-r={moved}", "--out", str(results), "--no-progress")
    (row,) = read_rows(results)
    assert row.dataset == "imagenet-r" and row.n == 6


def test_datasets_check_marks_present_and_absent(data_root: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    partial = tmp_path / "partial"
    fake.make_fake_imagenet_r(partial, classes=3)
    fake.make_fake_objectnet(partial)
    out = run(capsys, "datasets", "check", "--root", str(partial))
    status = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:7]}
    assert out.splitlines()[0].split()[:2] == ["dataset", "status"]
    assert set(status) == set(SUITE)
    assert status["imagenet-r"] == "incomplete" and status["objectnet"] == "complete"
    for name in ("imagenet", "imagenet-v2", "imagenet-sketch", "imagenet-a"):
        assert status[name] == "missing", name
    assert "expected 200 class folders" in out  # says what is missing

    out = run(capsys, "datasets", "check", "--root", str(data_root))
    status = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:7]}
    assert "missing" not in status.values()


# ----------------------------------------------------------------------------- WiSE-FT and reports
@pytest.fixture(scope="module")
def world_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A zero-shot run, the smoke run fine-tuned from it, and two small test folders."""
    root = tmp_path_factory.mktemp("wise")
    world = world_paths()
    classes = sorted(p.name for p in world.splits["train"].iterdir() if p.is_dir())
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for split in ("id", "sketch"):
        for c in classes:
            for src in sorted((world.splits[split] / c).iterdir())[:3]:
                (root / split / c).mkdir(parents=True, exist_ok=True)
                shutil.copy(src, root / split / c / src.name)
    torch.manual_seed(0)  # the smoke run's random initial weights (seed 0)
    assert main(["zeroshot", "--model", "robustft-tiny", "--pretrained", "none", "--classnames",
                 str(root / "classes.txt"), "--templates", str(world.templates), "--out", str(root / "zs"),
                 "--no-progress"]) == 0
    assert main(["train", "--config", "smoke", "--out", str(root / "ft"), "--no-progress", "--no-eval",
                 "--set", "data.limit_train=32", "--set", "data.holdout=8"]) == 0
    return {"zs": root / "zs", "ft": root / "ft", "sets": f"id={root / 'id'},sketch={root / 'sketch'}",
            "root": root}


def test_wise_endpoints_equal_the_runs_it_mixes(world_runs: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    sets = str(world_runs["sets"])
    zs_rows, ft_rows, wise_rows = tmp_path / "zs.jsonl", tmp_path / "ft.jsonl", tmp_path / "wise.jsonl"
    run(capsys, "eval", "--run", str(world_runs["zs"]), "--dataset", sets, "--out", str(zs_rows), "--no-progress")
    run(capsys, "eval", "--run", str(world_runs["ft"]), "--dataset", sets, "--out", str(ft_rows), "--no-progress")
    out = run(capsys, "wise", "--zeroshot", str(world_runs["zs"]), "--finetuned", str(world_runs["ft"]),
              "--alphas", "0:1:0.5", "--dataset", sets, "--out", str(wise_rows), "--save", str(tmp_path / "mixed"),
              "--no-progress")
    assert "3 alphas" in out
    rows = read_rows(wise_rows)
    assert [(r.alpha, r.dataset) for r in rows] == [(a, d) for a in (0.0, 0.5, 1.0) for d in ("id", "sketch")]
    assert all(r.method == "wise-ft" for r in rows)

    def scores(rs: list) -> list[tuple[str, float, float, int]]:
        return [(r.dataset, r.top1, r.top5, r.n) for r in rs]

    assert scores(rows[:2]) == scores(read_rows(zs_rows))
    assert scores(rows[4:]) == scores(read_rows(ft_rows))

    zs, _ = load_classifier(world_runs["zs"])
    ft = load_tensors(world_runs["ft"] / "classifier.safetensors")[0]
    mixed, meta = load_classifier(tmp_path / "mixed" / "alpha_0.50")
    assert meta["extra"]["alpha"] == 0.5
    for k, v in mixed.state_dict().items():
        torch.testing.assert_close(v, 0.5 * zs.state_dict()[k] + 0.5 * ft[k], rtol=0, atol=1e-6)


def test_report_writes_tables_and_png_plots(world_runs: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    sets = str(world_runs["sets"])
    results = tmp_path / "all.jsonl"
    run(capsys, "eval", "--run", str(world_runs["zs"]), "--dataset", sets, "--out", str(results), "--no-progress")
    run(capsys, "eval", "--run", str(world_runs["ft"]), "--dataset", sets, "--out", str(results), "--no-progress")
    run(capsys, "wise", "--zeroshot", str(world_runs["zs"]), "--finetuned", str(world_runs["ft"]), "--alphas",
        "0.25,0.75", "--dataset", sets, "--out", str(tmp_path / "wise.jsonl"), "--no-progress")
    report = tmp_path / "report"
    out = run(capsys, "report", str(results), str(tmp_path / "wise.jsonl"), "--out", str(report))
    for name in ("report.md", "report.csv", "id_vs_ood.png", "shift_bars.png"):
        assert (report / name).is_file(), name
        assert str(report / name) in out
    for png in ("id_vs_ood.png", "shift_bars.png"):
        data = (report / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(report / png) as image:
            image.verify()
        with Image.open(report / png) as image:
            assert image.size[0] >= 300 and image.size[1] >= 200
    with (report / "report.csv").open() as handle:
        table = list(csv.DictReader(handle))
    methods = {row["method"] for row in table}
    assert {"zeroshot", "ft", "wise-ft"} <= methods
    markdown = (report / "report.md").read_text()
    assert "![" in markdown and "id_vs_ood.png" in markdown and "sketch" in markdown


# ----------------------------------------------------------------------------- every run folder evaluates
TINY_TRAIN = ("--set", "data.limit_train=32", "--set", "data.holdout=8", "--set", "data.eval_sets=[id]")


@pytest.fixture(scope="module")
def wise_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wise-ft run (alphas 0, 0.5, 1) evaluated at the end of training, as `train` does."""
    out = tmp_path_factory.mktemp("wiserun") / "my-wise"
    assert main(["train", "--config", "smoke", "--out", str(out), "--no-progress", *TINY_TRAIN,
                 "--set", "method.name=wise-ft", "--set", "method.alphas=[0.0, 0.5, 1.0]"]) == 0
    return out


def test_eval_of_a_wise_ft_run_takes_its_fine_tuned_end_or_a_named_alpha(
        wise_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trained = {r.run: r for r in read_rows(wise_run / "results.jsonl")}
    assert sorted(trained) == ["my-wise@0.00", "my-wise@0.50", "my-wise@1.00"]  # the folder's name, not "smoke"
    rows = tmp_path / "rows.jsonl"
    run(capsys, "eval", "--run", str(wise_run), "--out", str(rows), "--no-progress")
    run(capsys, "eval", "--run", str(wise_run), "--alpha", "0.5", "--out", str(rows), "--no-progress")
    end, half = read_rows(rows)
    assert (end.run, end.method, end.alpha, end.dataset) == ("my-wise", "wise-ft", None, "id")
    assert (half.run, half.alpha) == ("my-wise@0.50", 0.5)
    assert half.top1 == trained["my-wise@0.50"].top1  # eval --run names and scores it exactly as train did
    assert end.top1 == trained["my-wise@1.00"].top1  # the fine-tuned end is alpha 1
    fine_tuned = load_tensors(wise_run / "classifier.safetensors")[0]
    final = load_tensors(wise_run / "final.safetensors")[0]
    assert fine_tuned.keys() == final.keys() and all(torch.equal(fine_tuned[k], final[k]) for k in final)


def test_eval_with_an_unknown_alpha_lists_the_available_ones(
        wise_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = tmp_path / "rows.jsonl"
    capsys.readouterr()
    assert main(["eval", "--run", str(wise_run), "--alpha", "0.3", "--out", str(rows), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"robustft eval: error: --alpha 0.3: {wise_run} has no WiSE-FT classifier for it; "
        "available alphas: 0.00, 0.50, 1.00")
    assert not rows.exists()
    old_layout = tmp_path / "old-wise"  # a wise-ft run saved before RUN/ held the fine-tuned classifier
    shutil.copytree(wise_run, old_layout)
    for name in ("classifier.json", "classifier.safetensors"):
        (old_layout / name).unlink()
    assert main(["eval", "--run", str(old_layout), "--out", str(rows), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"robustft eval: error: {old_layout} holds WiSE-FT classifiers only (alphas 0.00, 0.50, 1.00); "
        "choose one with --alpha A")
    run(capsys, "eval", "--run", str(old_layout / "wise" / "alpha_1.00"), "--out", str(rows), "--no-progress")
    (row,) = read_rows(rows)
    assert (row.run, row.alpha) == ("old-wise@1.00", 1.0)  # pointing at the alpha folder itself names it alike


def test_rows_are_named_after_the_folder_unless_the_config_names_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    named, unnamed = tmp_path / "named", tmp_path / "unnamed"
    for out, extra in ((named, ("--set", "name=my-experiment")), (unnamed, ())):
        assert main(["train", "--config", "smoke", "--out", str(out), "--no-progress", *TINY_TRAIN, *extra]) == 0
    rows = tmp_path / "rows.jsonl"
    for out in (named, unnamed):
        run(capsys, "eval", "--run", str(out), "--out", str(rows), "--no-progress")
    assert [r.run for r in read_rows(named / "results.jsonl")] == ["my-experiment"]
    assert [r.run for r in read_rows(unnamed / "results.jsonl")] == ["unnamed"]  # not the preset's name "smoke"
    assert [r.run for r in read_rows(rows)] == ["my-experiment", "unnamed"]


# ----------------------------------------------------------------------------- reports on any results
@pytest.mark.parametrize(("dataset", "columns", "reason"), [
    ("imagenet-a", "| run | method | alpha | seeds | imagenet-a | OOD avg |", "no in-distribution set"),
    ("imagenet", "| run | method | alpha | seeds | imagenet |", "no shift sets besides imagenet"),
])
def test_report_on_shift_only_or_id_only_results(dataset: str, columns: str, reason: str, imagenet_zeroshot: Path,
                                                 data_root: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    results, report = tmp_path / "results.jsonl", tmp_path / "report"
    out = run(capsys, "eval", "--run", str(imagenet_zeroshot), "--data-root", str(data_root), "--dataset", dataset,
              "--out", str(results), "--no-progress")
    assert columns in out  # eval's own table has the columns these rows allow
    capsys.readouterr()
    assert main(["report", str(results), "--out", str(report)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "no ID-vs-OOD plot (id_vs_ood.png not written)" in captured.err and reason in captured.err
    assert sorted(p.name for p in report.iterdir()) == ["report.csv", "report.md", "shift_bars.png"]
    with Image.open(report / "shift_bars.png") as image:
        image.verify()
    markdown = (report / "report.md").read_text()
    assert next(line for line in markdown.splitlines() if line.startswith("| run |")) == columns  # only these
    assert f"No ID-vs-OOD plot: the results hold {reason}" in markdown and "id_vs_ood.png" not in markdown
    assert "No ID-vs-OOD plot" in captured.out and str(report / "shift_bars.png") in captured.out
    with (report / "report.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["run"] == imagenet_zeroshot.name and float(row[dataset]) >= 0

"""`robustft demo --quick` end to end from a cold cache (the README's main job, abridged)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from robustft.cli import main
from robustft.reports.results import read_rows


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "demo finished in" in printed and "| ft-s0 |" in printed
    rows = read_rows([out / "results.jsonl"])
    methods = {r.method for r in rows}
    assert {"zeroshot", "ft", "fd-refill", "wise-ft", "wise-ft+fd-refill"} <= methods
    datasets = {r.dataset for r in rows}
    assert {"id", "shuffled", "swapped", "sketch", "novel", "clutter"} <= datasets
    assert all(0.0 <= r.top1 <= 100.0 and r.n == 600 for r in rows)
    # WiSE endpoints reproduce the runs they interpolate.
    by = {(r.run, r.dataset): r.top1 for r in rows}
    assert by[("ft-s0@1.00", "swapped")] == pytest.approx(by[("ft-s0", "swapped")], abs=1e-6)
    assert by[("ft-s0@0.00", "swapped")] == pytest.approx(by[("zeroshot", "swapped")], abs=1e-6)
    for name in ("id_vs_ood.png", "shift_bars.png", "cam_grid.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG"
    assert "| fd-refill-obj-s0 |" in (out / "report.md").read_text()

    # More seeds in the same folder re-enter the demo and reuse the finished seed-0 runs.
    finished = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*-s0/results.jsonl")}
    assert len(finished) == 2
    assert main(["demo", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    rows = read_rows([out / "results.jsonl"])
    assert {"ft-s0", "ft-s1", "fd-refill-obj-s1", "ft-s1@0.50"} <= {r.run for r in rows}
    assert "| ft-s0 (+1) |" in capsys.readouterr().out  # the table aggregates the two seeds


def test_demo_plan_lists_registered_methods_and_nested_modes() -> None:
    from robustft.methods import METHODS
    from robustft.pipeline.demo import demo_jobs, demo_plan

    plan = demo_plan()
    assert all(r["method"] in METHODS for r in plan["runs"])
    quick, default, every = ({j.name for j in demo_jobs(q, 1, a)} for q, a in ((True, False), (False, False),
                                                                              (False, True)))
    assert quick == {"ft-s0", "fd-refill-obj-s0"} and quick < default < every
    assert {"flyp-s0", "flyp-fd-refill-s0"} <= default and "l2sp-s0" in every - default
    assert all(f"{name}-s0" in default for name in plan["wise"])
    assert [j.seed for j in demo_jobs(False, 2)].count(1) == len(default)


def test_demo_refuses_quick_with_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from robustft.cli import main

    assert main(["demo", "--quick", "--all", "--out", str(tmp_path / "d")]) == 2
    assert "--quick and --all" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()

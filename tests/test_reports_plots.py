"""Report files: Markdown, CSV and two PNG plots that PIL can open."""

from __future__ import annotations

import pytest
from PIL import Image

from robustft.errors import DataError
from robustft.reports.plots import default_id_dataset, plot_id_vs_ood, write_report
from robustft.reports.results import ResultRow, append_rows, read_rows

SHIFTS = ("imagenet-v2", "imagenet-r", "imagenet-sketch", "objectnet", "imagenet-a")


def _rows(id_name: str = "imagenet") -> list[ResultRow]:
    def rows(run, method, id_acc, ood, *, seed=0, alpha=None, setting=None):
        extra = {"setting": setting} if setting else {}
        return [ResultRow(run=run, method=method, alpha=alpha, dataset=d, top1=acc, top5=min(100.0, acc + 15),
                          n=50, n_bad=0, protocol="p", config_hash="h", git_sha="g", seed=seed,
                          time="2024-01-01T00:00:00+00:00", extra=extra)
                for d, acc in zip((id_name, *SHIFTS), (id_acc, *(ood + k for k in range(-2, 3))), strict=True)]

    out = rows("zs", "zeroshot", 63.0, 45.0)
    for seed in range(2):
        out += rows(f"ft-s{seed}", "ft", 80.0 + seed, 40.0 + seed, seed=seed, setting="ft")
        out += rows(f"camcfd-s{seed}", "camcfd", 81.0 + seed, 46.0 + seed, seed=seed, setting="cam")
    for k in range(11):
        a = k / 10
        out += rows("wise", "wise-ft", 63.0 + 17.0 * a + 4 * a * (1 - a), 45.0 - 5 * a + 8 * a * (1 - a),
                    alpha=a, setting="w")
    return out


def _check_png(path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width > 200 and image.height > 200


def test_write_report_writes_markdown_csv_and_valid_pngs(tmp_path):
    results = tmp_path / "results.jsonl"
    append_rows(results, _rows())
    files = write_report(read_rows([results]), tmp_path / "report")
    assert set(files) == {"markdown", "csv", "id_vs_ood", "shift_bars"}
    assert {p.name for p in files.values()} == {"report.md", "report.csv", "id_vs_ood.png", "shift_bars.png"}
    _check_png(files["id_vs_ood"])
    _check_png(files["shift_bars"])
    md = files["markdown"].read_text()
    assert "| camcfd-s0 (+1) | camcfd | – | 2 | 81.50 ± 0.71 |" in md
    assert "![ID vs OOD accuracy](id_vs_ood.png)" in md and str(results) in md
    csv_lines = files["csv"].read_text().splitlines()
    assert len(csv_lines) == 1 + 1 + 2 + 11  # header, zero-shot, two seeded methods, eleven alphas


def test_user_dataset_reports_default_to_the_id_dataset_named_id(tmp_path):
    rows = _rows(id_name="id")
    assert default_id_dataset(rows) == "id"
    files = write_report(rows, tmp_path)
    _check_png(files["id_vs_ood"])
    assert "| run | method | alpha | seeds | id |" in files["markdown"].read_text()
    with pytest.raises(DataError, match="in-distribution"):
        default_id_dataset([r for r in rows if r.dataset != "id"])


def test_plot_needs_a_complete_entry(tmp_path):
    rows = [r for r in _rows() if r.dataset in ("imagenet", "objectnet") and r.method == "ft"]
    rows += [ResultRow(**{**rows[0].to_dict(), "run": "x", "dataset": "imagenet-r", "extra": {"setting": "other"}})]
    with pytest.raises(DataError, match="nothing to plot"):
        plot_id_vs_ood(rows, tmp_path / "p.png", shift_datasets=["objectnet", "imagenet-r"])


def test_report_without_shift_results_writes_tables_and_bars_but_no_scatter(tmp_path, caplog):
    rows = [r for r in _rows() if r.dataset == "imagenet"]  # ID results only (e.g. a first eval)
    files = write_report(rows, tmp_path / "report")
    assert set(files) == {"markdown", "csv", "shift_bars"}
    assert not (tmp_path / "report" / "id_vs_ood.png").exists()
    _check_png(files["shift_bars"])
    md = files["markdown"].read_text()
    assert "id_vs_ood.png" not in md and "shift_bars.png" in md and "| ft-s0 (+1) | ft |" in md
    assert "no ID-vs-OOD plot" in caplog.text


def test_report_without_an_id_set_writes_tables_and_bars_of_the_shifts(tmp_path, caplog):
    rows = [r for r in _rows() if r.dataset == "imagenet-a"]  # e.g. an ImageNet-A evaluation alone
    files = write_report(rows, tmp_path / "report")
    assert set(files) == {"markdown", "csv", "shift_bars"}
    _check_png(files["shift_bars"])
    md = files["markdown"].read_text()
    assert "| run | method | alpha | seeds | imagenet-a | OOD avg |" in md
    assert "No ID-vs-OOD plot: the results hold no in-distribution set" in md
    assert "no ID-vs-OOD plot (id_vs_ood.png not written)" in caplog.text
    with pytest.raises(DataError, match="no in-distribution set"):
        plot_id_vs_ood(rows, tmp_path / "p.png", id_dataset=None)

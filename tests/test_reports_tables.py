"""Summary tables: numbers, mean ± std over seeds, effective robustness, refusal to mix class sets."""

from __future__ import annotations

import csv
import io
import statistics

import pytest

from robustft.errors import DataError
from robustft.reports.results import ResultRow
from robustft.reports.tables import summarize, summary_table, to_csv, to_markdown


def _row(run, method, dataset, top1, *, seed=0, alpha=None, setting=None, source=None, **extra) -> ResultRow:
    if setting is not None:
        extra["setting"] = setting
    return ResultRow(run=run, method=method, alpha=alpha, dataset=dataset, top1=top1, top5=min(100.0, top1 + 10),
                     n=100, n_bad=0, protocol="p", config_hash="h", git_sha="g", seed=seed,
                     time="2024-01-01T00:00:00+00:00", extra=extra, source=source)


def _odds(p: float) -> float:
    return p / (100.0 - p)


def _predicted(id_acc: float, zs_id: float = 60.0, zs_ood: float = 40.0) -> float:
    o = _odds(id_acc) * _odds(zs_ood) / _odds(zs_id)  # slope 1 in logit space through the zero-shot point
    return 100.0 * o / (1.0 + o)


FT = {0: (80.0, 45.0, 20.0), 1: (82.0, 47.0, 22.0), 2: (84.0, 49.0, 24.0)}  # seed -> imagenet, -r, -a


def _rows() -> list[ResultRow]:
    rows = [_row("zs", "zeroshot", d, v) for d, v in (("imagenet", 60.0), ("imagenet-a", 30.0), ("imagenet-r", 50.0))]
    for seed, (i, r, a) in FT.items():
        rows += [_row(f"ft-s{seed}", "ft", d, v, seed=seed, setting="S")
                 for d, v in (("imagenet", i), ("imagenet-r", r), ("imagenet-a", a))]
    rows += [_row("wise", "wise-ft", d, v, alpha=0.5, setting="W")
             for d, v in (("imagenet", 75.0), ("imagenet-r", 55.0), ("imagenet-a", 33.0))]
    return rows


def test_summary_groups_seeds_and_orders_columns():
    table = summary_table(_rows())
    assert table.columns == ("run", "method", "alpha", "seeds", "imagenet", "imagenet-r", "imagenet-a", "OOD avg",
                             "eff. robustness")
    assert [r[:4] for r in table.rows] == [("zs", "zeroshot", None, 1), ("ft-s0 (+2)", "ft", None, 3),
                                           ("wise", "wise-ft", 0.5, 1)]
    ft = table.rows[1]
    ids = [v[0] for v in FT.values()]
    oods = [(v[1] + v[2]) / 2 for v in FT.values()]
    assert ft[4].mean == pytest.approx(82.0) and ft[4].std == pytest.approx(statistics.stdev(ids)) and ft[4].count == 3
    assert ft[7].mean == pytest.approx(statistics.mean(oods)) and ft[7].std == pytest.approx(2.0)
    ers = [o - _predicted(i) for i, o in zip(ids, oods)]
    assert ft[8].mean == pytest.approx(statistics.mean(ers)) and ft[8].std == pytest.approx(statistics.stdev(ers))
    zs = table.rows[0]
    assert zs[7].mean == pytest.approx(40.0) and zs[8].mean == pytest.approx(0.0, abs=1e-9) and zs[8].std is None


def test_markdown_shows_mean_pm_std_and_signed_effective_robustness():
    text = to_markdown(summary_table(_rows()))
    lines = text.splitlines()
    assert lines[0] == ("| run | method | alpha | seeds | imagenet | imagenet-r | imagenet-a | OOD avg "
                        "| eff. robustness |")
    ft_line = next(line for line in lines if line.startswith("| ft-s0"))
    er = statistics.mean((v[1] + v[2]) / 2 - _predicted(v[0]) for v in FT.values())
    assert ft_line.startswith("| ft-s0 (+2) | ft | – | 3 | 82.00 ± 2.00 | 47.00 ± 2.00 | 22.00 ± 2.00 "
                              "| 34.50 ± 2.00 |")
    assert f"| {er:+.2f} ± " in ft_line
    wise_line = next(line for line in lines if line.startswith("| wise"))
    assert wise_line.startswith("| wise | wise-ft | 0.50 | 1 | 75.00 | 55.00 | 33.00 | 44.00 |")
    assert "line of slope 1 in logit space through the zero-shot point" in text


def test_csv_has_numbers_and_std_columns():
    reader = csv.DictReader(io.StringIO(to_csv(summary_table(_rows()))))
    assert reader.fieldnames[:6] == ["run", "method", "alpha", "seeds", "imagenet", "imagenet_std"]
    rows = {r["run"]: r for r in reader}
    assert float(rows["ft-s0 (+2)"]["imagenet"]) == pytest.approx(82.0)
    assert float(rows["ft-s0 (+2)"]["OOD avg_std"]) == pytest.approx(2.0)
    assert rows["wise"]["alpha"] == "0.5" and rows["wise"]["imagenet_std"] == ""
    assert float(rows["wise"]["eff. robustness"]) == pytest.approx(44.0 - _predicted(75.0), abs=1e-4)
    assert rows["zs"]["alpha"] == ""


def test_mixing_class_sets_for_one_dataset_names_files_and_runs():
    rows = [_row("a", "ft", "imagenet", 70.0, classnames_hash="aaa", source="one.jsonl:1"),
            _row("b", "ft", "imagenet", 71.0, classnames_hash="bbb", source="two.jsonl:4")]
    with pytest.raises(DataError, match=r"'imagenet'.*different class sets.*'aaa' from runs a in one\.jsonl.*"
                                        r"'bbb' from runs b in two\.jsonl"):
        summary_table(rows)


def test_mixing_protocols_for_one_dataset_is_refused():
    rows = [_row("a", "ft", "imagenet-r", 70.0), _row("b", "ft", "imagenet", 70.0)]
    rows.append(ResultRow(**{**rows[0].to_dict(), "run": "c", "protocol": "1000 classes"}))
    with pytest.raises(DataError, match="different protocols"):
        summary_table(rows, shift_datasets=["imagenet-r"])


def test_duplicate_rows_of_one_seed_keep_the_last():
    rows = _rows() + [_row("ft-s2", "ft", "imagenet", 90.0, seed=2, setting="S")]
    ft = summary_table(rows).rows[1]
    assert ft[3] == 3 and ft[4].mean == pytest.approx((80.0 + 82.0 + 90.0) / 3)


def test_without_zero_shot_results_effective_robustness_is_empty_or_uses_alpha_zero():
    rows = [r for r in _rows() if r.method != "zeroshot"]
    table = summary_table(rows)
    assert all(r[-1] is None for r in table.rows)
    assert "–" in to_markdown(table).splitlines()[2]
    alpha0 = [_row("w0", "wise-ft", d, v, alpha=0.0, setting="W")
              for d, v in (("imagenet", 60.0), ("imagenet-r", 50.0), ("imagenet-a", 30.0))]
    summary = summarize(rows + alpha0)
    assert summary.fit is not None and summary.fit.predict(60.0) == pytest.approx(40.0)


def test_shift_datasets_default_to_suite_order_then_others_and_must_exist():
    rows = _rows() + [_row("zs", "zeroshot", "my-shift", 10.0)]
    assert summarize(rows).shift_datasets == ["imagenet-r", "imagenet-a", "my-shift"]
    with pytest.raises(DataError, match="objectnet"):
        summary_table(rows, shift_datasets=["objectnet"])
    with pytest.raises(DataError, match="in-distribution dataset 'imagenet-v2'"):
        summary_table(rows, id_dataset="imagenet-v2")


def test_tables_have_the_columns_the_rows_allow():
    from robustft.reports.tables import guess_id_dataset

    shifts_only = [r for r in _rows() if r.dataset != "imagenet"]
    assert guess_id_dataset(r.dataset for r in shifts_only) is None
    table = summary_table(shifts_only, None)
    assert table.columns == ("run", "method", "alpha", "seeds", "imagenet-r", "imagenet-a", "OOD avg")
    ft = table.rows[1]
    assert ft[:4] == ("ft-s0 (+2)", "ft", None, 3)
    assert ft[6].mean == pytest.approx(statistics.mean((v[1] + v[2]) / 2 for v in FT.values()))
    assert "no in-distribution set" in table.notes[0] and len(table.notes) == 1  # no baseline fit without ID
    id_only = [r for r in _rows() if r.dataset == "imagenet"]
    assert guess_id_dataset(r.dataset for r in id_only) == "imagenet"
    table = summary_table(id_only, "imagenet")
    assert table.columns == ("run", "method", "alpha", "seeds", "imagenet")
    assert table.rows[1][4].mean == pytest.approx(82.0)
    assert "no shift sets" in table.notes[0]
    assert to_csv(table).splitlines()[0] == "run,method,alpha,seeds,imagenet,imagenet_std"
    with pytest.raises(DataError, match="in-distribution dataset 'imagenet' has no results"):
        summary_table(shifts_only, "imagenet")  # a named ID set must exist

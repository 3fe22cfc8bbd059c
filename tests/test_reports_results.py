"""Results rows: JSONL round trip, validation with file:line errors, hashes."""

from __future__ import annotations

import json

import pytest

from robustft.config import RunConfig, config_to_dict
from robustft.config import config_hash as run_config_hash
from robustft.errors import DataError
from robustft.evaluation.evaluate import EvalResult
from robustft.reports.results import (
    ResultRow,
    append_rows,
    classnames_hash,
    config_hash,
    read_rows,
    rows_from_results,
    setting_hash,
)


def _row(**changes) -> ResultRow:
    base = dict(run="ft-s0", method="ft", alpha=None, dataset="imagenet", top1=76.5, top5=93.25, n=50000, n_bad=0,
                protocol="1000 classes", config_hash="abc123def456", git_sha="deadbeef", seed=0,
                time="2024-01-01T00:00:00+00:00", extra={"classnames_hash": "c1"})
    base.update(changes)
    return ResultRow(**base)


def test_append_then_read_round_trips_and_records_the_source_line(tmp_path):
    path = tmp_path / "sub" / "results.jsonl"
    first = [_row(), _row(dataset="imagenet-r", top1=60.0, protocol="200-class subset")]
    append_rows(path, first)
    append_rows(path, [_row(method="wise-ft", alpha=0.5, seed=None)])
    rows = read_rows(path)
    assert rows == [*first, _row(method="wise-ft", alpha=0.5, seed=None)]
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and "source" not in json.loads(lines[0])
    assert set(json.loads(lines[0])) == {"run", "method", "alpha", "dataset", "top1", "top5", "n", "n_bad", "protocol",
                                         "config_hash", "git_sha", "seed", "time", "extra"}


def test_read_rows_names_file_and_line_of_a_malformed_row(tmp_path):
    path = tmp_path / "r.jsonl"
    append_rows(path, [_row()])
    with path.open("a") as f:
        f.write("\n{not json\n")
    with pytest.raises(DataError, match=r"r\.jsonl:3: not a JSON results row"):
        read_rows([path])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("top1", 101.0, "percentage"), ("alpha", 1.5, r"\[0, 1\]"), ("n", -1, "non-negative"),
     ("seed", "zero", "integer"), ("top1", True, "percentage")],
)
def test_read_rows_rejects_ill_typed_fields(tmp_path, field, value, message):
    data = _row().to_dict()
    data[field] = value
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(data) + "\n")
    with pytest.raises(DataError, match=rf"r\.jsonl:1: field '{field}' must be .*{message}"):
        read_rows(path)


def test_read_rows_rejects_unknown_and_missing_fields(tmp_path):
    data = _row().to_dict()
    data["accuracy"] = 1.0
    del data["git_sha"]
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(data) + "\n")
    with pytest.raises(DataError, match=r"unknown fields \['accuracy'\] / missing fields \['git_sha'\]"):
        read_rows(path)


def test_missing_results_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="results file not found"):
        read_rows(tmp_path / "nope.jsonl")


def test_append_after_an_interrupted_write_keeps_new_rows_on_their_own_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_row().to_dict()) + "\n" + '{"run": "half')  # killed mid-line
    append_rows(path, [_row(run="next")])
    with pytest.raises(DataError, match=r"r\.jsonl:2"):
        read_rows(path)
    lines = path.read_text().splitlines()
    assert json.loads(lines[2])["run"] == "next"


def test_nan_accuracy_is_refused_on_write(tmp_path):
    with pytest.raises(DataError, match="not JSON-safe"):
        append_rows(tmp_path / "r.jsonl", [_row(top1=float("nan"))])


def test_config_hash_is_the_run_config_hash_and_ignores_key_order():
    cfg = config_to_dict(RunConfig())
    assert config_hash(cfg) == run_config_hash(RunConfig())
    assert len(config_hash(cfg)) == 12
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_setting_hash_is_shared_by_seeds_but_not_by_other_settings():
    cfg = config_to_dict(RunConfig())
    seed1 = dict(cfg, seed=1, name="other")
    assert setting_hash(cfg) == setting_hash(seed1)
    assert config_hash(cfg) != config_hash(seed1)
    assert setting_hash(cfg) != setting_hash(dict(cfg, optim=dict(cfg["optim"], lr=1.0)))


def test_rows_from_results_carries_provenance_and_hashes():
    results = [EvalResult("imagenet", 70.0, 90.0, 100, 1, "1000 classes"),
               EvalResult("imagenet-a", 20.0, 40.0, 50, 0, "200-class subset")]
    cfg = config_to_dict(RunConfig())
    rows = rows_from_results(results, run="r", method="ft", config=cfg, git_sha="abc", seed=0,
                             classnames=["cat", "dog"])
    assert [(r.dataset, r.top1, r.n_bad, r.protocol) for r in rows] == [
        ("imagenet", 70.0, 1, "1000 classes"), ("imagenet-a", 20.0, 0, "200-class subset")]
    assert all(r.config_hash == config_hash(cfg) and r.git_sha == "abc" and r.seed == 0 for r in rows)
    assert rows[0].extra == {"setting": setting_hash(cfg), "classnames_hash": classnames_hash(["cat", "dog"])}
    assert classnames_hash(["cat", "dog"]) != classnames_hash(["dog", "cat"])
    assert rows[0].time.endswith("+00:00")

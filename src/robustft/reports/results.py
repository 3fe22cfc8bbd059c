"""Results rows: one JSON line per (run, alpha, dataset), appended to ``*.jsonl`` files.

Evaluation appends rows; reports read any number of such files and turn them into
tables and plots. Each row carries what is needed to tell results apart and to trace them
back: the run, method, WiSE-FT alpha, seed, config hash, git SHA and time. Every field
is documented in docs/evaluation.md ("Results rows").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustft import config as _config
from robustft.errors import ConfigError, DataError

if TYPE_CHECKING:
    from robustft.evaluation.evaluate import EvalResult

__all__ = [
    "ResultRow",
    "append_rows",
    "read_rows",
    "config_hash",
    "setting_hash",
    "classnames_hash",
    "rows_from_results",
    "now_iso",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ResultRow:
    """One accuracy result of one model on one dataset (see docs/evaluation.md).

    Attributes:
        run: Name of the evaluated run (its run folder name by default).
        method: Registered method name (``zeroshot``, ``ft``, ``wise-ft``, ...).
        alpha: WiSE-FT mixing weight in [0, 1] (0 = zero-shot weights), None otherwise.
        dataset: Evaluation set name (``imagenet``, ``imagenet-r``, a user set's name).
        top1: Top-1 accuracy, percent in [0, 100].
        top5: Top-5 accuracy, percent in [0, 100].
        n: Images scored.
        n_bad: Unreadable images skipped (not in ``n``).
        protocol: How the set was scored, e.g. ``"200-class subset"``.
        config_hash: 12 hex digits of sha256 over the run's resolved config.
        git_sha: Commit of the code that produced the row ("unknown" outside git).
        seed: The run's seed, None when not applicable.
        time: When the row was written, ISO 8601 with time zone.
        extra: Free-form JSON-safe details (``classnames_hash``, ``setting``, ...).
        source: Where the row was read from (``file:line``); never written.
    """

    run: str
    method: str
    alpha: float | None
    dataset: str
    top1: float
    top5: float
    n: int
    n_bad: int
    protocol: str
    config_hash: str
    git_sha: str
    seed: int | None
    time: str
    extra: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The row as written to JSONL (every field except ``source``)."""
        data = dataclasses.asdict(self)
        del data["source"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> ResultRow:
        """Build a row from its JSON object, checking every field.

        Raises:
            DataError: A missing, unknown or ill-typed field (the message names it).
        """
        where = f"{source}: " if source else ""
        if not isinstance(data, Mapping):
            raise DataError(f"{where}a results row must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data and n != "extra"]
        if unknown or missing:
            raise DataError(f"{where}results row has unknown fields {unknown} / missing fields {missing}; "
                            f"expected fields: {', '.join(names)}")
        for name, check, wanted in _FIELD_CHECKS:
            if not check(data[name] if name in data else {}):
                raise DataError(f"{where}field {name!r} must be {wanted}, got {data[name]!r}")
        values = {n: data[n] for n in names if n in data}
        values["alpha"] = None if data["alpha"] is None else float(data["alpha"])
        values["top1"], values["top5"] = float(data["top1"]), float(data["top5"])
        return cls(**values, source=source)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_FIELD_CHECKS = (
    ("run", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    ("method", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    ("alpha", lambda v: v is None or (_is_num(v) and 0.0 <= v <= 1.0), "null or a number in [0, 1]"),
    ("dataset", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    ("top1", lambda v: _is_num(v) and 0.0 <= v <= 100.0, "a percentage in [0, 100]"),
    ("top5", lambda v: _is_num(v) and 0.0 <= v <= 100.0, "a percentage in [0, 100]"),
    ("n", lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    ("n_bad", lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    ("protocol", lambda v: isinstance(v, str), "a string"),
    ("config_hash", lambda v: isinstance(v, str), "a string"),
    ("git_sha", lambda v: isinstance(v, str), "a string"),
    ("seed", lambda v: v is None or _is_int(v), "null or an integer"),
    ("time", lambda v: isinstance(v, str), "an ISO 8601 string"),
    ("extra", lambda v: isinstance(v, dict), "a JSON object"),
)


def now_iso() -> str:
    """The current time as ISO 8601 in UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_hash(config_dict: Mapping[str, Any]) -> str:
    """12 hex digits of sha256 over the canonical JSON of a resolved config.

    The same function as :func:`robustft.config.config_hash`, so a row's hash matches the
    hash stored with the run's checkpoints.

    Raises:
        ConfigError: The config holds a value JSON cannot represent.
    """
    try:
        return _config.config_hash(dict(config_dict))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config cannot be hashed as JSON: {exc}") from None


def setting_hash(config_dict: Mapping[str, Any]) -> str:
    """Hash of the config without ``seed`` and ``name``: equal for seeds of one setting.

    Reports average the seeds of rows that share this hash (stored as ``extra["setting"]``).
    """
    reduced = {k: v for k, v in config_dict.items() if k not in ("seed", "name")}
    return config_hash(reduced)


def classnames_hash(classnames: Sequence[str]) -> str:
    """12 hex digits of sha256 over the class names in head order (one per line)."""
    return hashlib.sha256("\n".join(classnames).encode("utf-8")).hexdigest()[:12]


def rows_from_results(
    results: Iterable[EvalResult],
    *,
    run: str,
    method: str,
    alpha: float | None = None,
    config: Mapping[str, Any] | None = None,
    git_sha: str = "unknown",
    seed: int | None = None,
    classnames: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[ResultRow]:
    """Turn evaluation results into rows (one per dataset) with the run's provenance.

    Args:
        results: :class:`robustft.evaluation.EvalResult` objects of one model.
        run: The run's name.
        method: The method's registered name.
        alpha: WiSE-FT alpha in [0, 1], None for other methods.
        config: The run's resolved config as a dict (hashed into ``config_hash`` and
            ``extra["setting"]``); None leaves both empty.
        git_sha: Commit of the code.
        seed: The run's seed.
        classnames: The head's class names; their hash lets reports refuse to mix
            results from different class sets.
        extra: More JSON-safe details to keep.
    """
    details: dict[str, Any] = dict(extra or {})
    if config is not None:
        details.setdefault("setting", setting_hash(config))
    if classnames is not None:
        details.setdefault("classnames_hash", classnames_hash(classnames))
    stamp = now_iso()
    return [
        ResultRow(
            run=run, method=method, alpha=alpha, dataset=r.dataset, top1=r.top1, top5=r.top5,
            n=r.n, n_bad=r.n_bad, protocol=r.protocol,
            config_hash=config_hash(config) if config is not None else "",
            git_sha=git_sha, seed=seed, time=stamp, extra={**details, **_measured(r)},
        )
        for r in results
    ]


def _measured(result: EvalResult) -> dict[str, Any]:
    """What an evaluation measured beyond top-1/top-5: ``metrics`` (ECE, NLL, macro-F1, worst-group),
    ``headline``, ``ece_bins``, ``groups`` and the ``reliability`` bins (only the fields a result has)."""
    metrics = getattr(result, "metrics", None)
    if not metrics:
        return {}
    out: dict[str, Any] = {"metrics": dict(metrics), "headline": result.headline, "ece_bins": result.ece_bins}
    if result.groups:
        out["groups"] = {kind: dict(values) for kind, values in result.groups.items()}
    if result.reliability is not None:
        out["reliability"] = {key: list(values) for key, values in result.reliability.items()}
    return out


def append_rows(path: PathLike, rows: Iterable[ResultRow]) -> None:
    """Append rows to a JSONL file (created with its folders if needed), one flushed line each.

    Only one process should write (the primary); a crash loses at most the line being
    written. If the file ends in a partial line, the new rows start on a fresh line so
    the damage stays confined to that one line (which :func:`read_rows` reports).

    Raises:
        DataError: A row holds a value JSON cannot represent (NaN, an object).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        try:
            lines.append(json.dumps(row.to_dict(), ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise DataError(f"results row for run {row.run!r} on {row.dataset!r} is not JSON-safe: {exc}") from None
    with path.open("a", encoding="utf-8") as handle:
        if _ends_in_partial_line(path):
            handle.write("\n")
        for line in lines:
            handle.write(line + "\n")
            handle.flush()
        os.fsync(handle.fileno())
    logger.info("appended %d result row(s) to %s", len(lines), path)


def _ends_in_partial_line(path: Path) -> bool:
    """Whether a non-empty file's last byte is not a newline (an interrupted write)."""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


def read_rows(paths: PathLike | Iterable[PathLike]) -> list[ResultRow]:
    """Read rows from one or more JSONL files, in file and line order.

    Blank lines are skipped. Each row's ``source`` is set to ``file:line``.

    Raises:
        DataError: A file is missing or unreadable, or a line is not a valid row (the
            message names ``file:line``).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows: list[ResultRow] = []
    for path in map(Path, paths):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"results file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read results file {path}: {exc}") from None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not a JSON results row ({exc.msg}); fix or delete this line") from None
            rows.append(ResultRow.from_dict(data, source=where))
    return rows

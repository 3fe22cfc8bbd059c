"""Summary tables of results rows: methods x datasets, OOD average, effective robustness.

Rows are grouped into *entries*, one per (method, alpha, setting): ``setting`` is the
hash of the run's config without its seed and name (``extra["setting"]``; the run name
when absent), so the seeds of one setting form one entry and are shown as mean ± std
(sample standard deviation) with their count. Effective robustness is measured against
the zero-shot line of :mod:`robustft.evaluation.robustness`, fitted to the zero-shot
entries' (ID top-1, OOD-average top-1) points of the same report.

Results need not hold both kinds of set: without an in-distribution set (e.g. ImageNet-A
alone) every dataset counts as a shift set and the ID column and effective robustness are
left out; without shift sets the OOD average and effective robustness are left out.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from robustft.data.suites import SUITES
from robustft.errors import DataError, choices_hint
from robustft.evaluation.robustness import RobustnessFit, effective_robustness, fit_baseline
from robustft.reports.results import ResultRow

__all__ = [
    "SUITE_ORDER",
    "ID_DATASETS",
    "ZEROSHOT_METHODS",
    "Stat",
    "Entry",
    "Summary",
    "Table",
    "check_comparable",
    "guess_id_dataset",
    "summarize",
    "summary_table",
    "to_markdown",
    "to_csv",
]

logger = logging.getLogger(__name__)

SUITE_ORDER = SUITES.get("imagenet-shifts").sets
ZEROSHOT_METHODS = ("zeroshot", "zero-shot", "zero_shot")
ID_DATASETS = ("imagenet", "id")  # the in-distribution set when none is named: ImageNet, or a user's own "id"
OOD_AVG = "OOD avg"
EFF_ROB = "eff. robustness"


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (None for one value) and count of a metric."""

    mean: float
    std: float | None
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        """The statistic of ``values``; None when there are none."""
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(mean=math.fsum(values) / len(values), std=std, count=len(values))


@dataclass
class Entry:
    """All replicates (seeds) of one (method, alpha, setting).

    Attributes:
        method, alpha, setting: The entry's key.
        runs: The run names that contributed, sorted.
        top1: Dataset -> replicate key -> top-1 (percent).
    """

    method: str
    alpha: float | None
    setting: str
    runs: list[str] = field(default_factory=list)
    top1: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))

    @property
    def label(self) -> str:
        """The run name, or the first run name and how many more runs the entry merges."""
        return self.runs[0] if len(self.runs) == 1 else f"{self.runs[0]} (+{len(self.runs) - 1})"

    @property
    def replicates(self) -> list[str]:
        """Replicate keys (``seed=<n>``, or ``run=<name>`` for rows without a seed), sorted."""
        return sorted({rep for per in self.top1.values() for rep in per})

    def points(self, id_dataset: str | None, shifts: Sequence[str]) -> dict[str, tuple[float, float]]:
        """Replicate -> (ID top-1, OOD average) for replicates that have every dataset (none without an ID set)."""
        out: dict[str, tuple[float, float]] = {}
        if id_dataset is None:
            return out
        for rep in self.replicates:
            values = [self.top1.get(d, {}).get(rep) for d in (id_dataset, *shifts)]
            if shifts and all(v is not None for v in values):
                out[rep] = (values[0], math.fsum(values[1:]) / len(shifts))
        return out

    def ood_values(self, shifts: Sequence[str]) -> list[float]:
        """The OOD average of each replicate that has every shift set."""
        out = []
        for rep in self.replicates:
            values = [self.top1.get(d, {}).get(rep) for d in shifts]
            if shifts and all(v is not None for v in values):
                out.append(math.fsum(values) / len(shifts))  # type: ignore[arg-type]
        return out


@dataclass
class Summary:
    """Grouped results plus the zero-shot baseline fit (None without zero-shot results).

    ``id_dataset`` is None when the results hold no in-distribution set.
    """

    id_dataset: str | None
    shift_datasets: list[str]
    entries: list[Entry]
    fit: RobustnessFit | None

    def ood(self, entry: Entry) -> Stat | None:
        """OOD-average top-1 over the entry's replicates that have every shift set (and the ID set, if any)."""
        if self.id_dataset is None:
            return Stat.of(entry.ood_values(self.shift_datasets))
        return Stat.of([ood for _, ood in entry.points(self.id_dataset, self.shift_datasets).values()])

    def eff_robustness(self, entry: Entry) -> Stat | None:
        """Effective robustness (points) per complete replicate; None without a baseline fit."""
        if self.fit is None:
            return None
        pts = entry.points(self.id_dataset, self.shift_datasets).values()
        return Stat.of([effective_robustness(i, o, self.fit) for i, o in pts])

    def stat(self, entry: Entry, dataset: str) -> Stat | None:
        """Top-1 on ``dataset`` over the entry's replicates."""
        return Stat.of(list(entry.top1.get(dataset, {}).values()))


def _sources(rows: Iterable[ResultRow]) -> str:
    files = sorted({(r.source or "<memory>").rsplit(":", 1)[0] for r in rows})
    runs = sorted({r.run for r in rows})
    return f"runs {', '.join(runs)} in {', '.join(files)}"


def check_comparable(rows: Sequence[ResultRow]) -> None:
    """Refuse to mix results of one dataset scored with different class sets or protocols.

    Raises:
        DataError: Naming the dataset, the differing class-set hashes or protocols, and the
            runs and files each comes from.
    """
    for key, what in (("classnames_hash", "class sets"), ("protocol", "protocols")):
        seen: dict[str, dict[str, list[ResultRow]]] = defaultdict(lambda: defaultdict(list))
        for row in rows:
            value = row.protocol if key == "protocol" else row.extra.get(key)
            if value is not None:
                seen[row.dataset][str(value)].append(row)
        for dataset, groups in seen.items():
            if len(groups) > 1:
                parts = "; ".join(f"{value!r} from {_sources(rs)}" for value, rs in sorted(groups.items()))
                raise DataError(
                    f"results for dataset {dataset!r} come from different {what} and cannot be compared: "
                    f"{parts}; report results of one class set/protocol together"
                )


def guess_id_dataset(datasets: Iterable[str]) -> str | None:
    """The in-distribution set among ``datasets``: ``imagenet``, else ``id``, else None (no ID set)."""
    present = set(datasets)
    return next((d for d in ID_DATASETS if d in present), None)


def _default_shifts(datasets: Iterable[str], id_dataset: str | None) -> list[str]:
    present = set(datasets) - {id_dataset}
    known = [d for d in SUITE_ORDER if d in present]
    return known + sorted(present - set(known))


def _group(rows: Sequence[ResultRow]) -> list[Entry]:
    entries: dict[tuple[str, float | None, str], Entry] = {}
    for row in rows:
        setting = str(row.extra.get("setting", row.run))
        entry = entries.setdefault((row.method, row.alpha, setting), Entry(row.method, row.alpha, setting))
        if row.run not in entry.runs:
            entry.runs.append(row.run)
        rep = f"seed={row.seed}" if row.seed is not None else f"run={row.run}"
        if rep in entry.top1[row.dataset]:
            # Re-evaluations append again; the row read last wins.
            logger.warning("duplicate result for %s %s on %s (%s); keeping %s",
                           row.method, rep, row.dataset, row.run, row.source or "the last one")
        entry.top1[row.dataset][rep] = row.top1
    for entry in entries.values():
        entry.runs.sort()
    zs_first = sorted(entries.values(), key=lambda e: (e.method not in ZEROSHOT_METHODS, e.method, e.label,
                                                       -1.0 if e.alpha is None else e.alpha))
    return zs_first


def _fit(entries: Sequence[Entry], id_dataset: str | None, shifts: Sequence[str]) -> RobustnessFit | None:
    if id_dataset is None or not shifts:
        return None  # effective robustness needs an ID set and shift sets
    zeroshot = [e for e in entries if e.method in ZEROSHOT_METHODS]
    if not zeroshot:  # a WiSE-FT curve's alpha = 0 point is the zero-shot model
        zeroshot = [e for e in entries if e.alpha == 0.0]
    points = [p for e in zeroshot for p in e.points(id_dataset, shifts).values()]
    if not points:
        logger.info("no zero-shot result with all datasets: effective robustness is not reported")
        return None
    return fit_baseline([p[0] for p in points], [p[1] for p in points])


def summarize(
    rows: Sequence[ResultRow],
    id_dataset: str | None = "imagenet",
    shift_datasets: Sequence[str] | None = None,
) -> Summary:
    """Group rows into entries and fit the zero-shot baseline (shared by tables and plots).

    ``id_dataset`` None: the rows hold no in-distribution set, and every dataset (or each
    of ``shift_datasets``) is a shift set.

    Raises:
        DataError: No rows, ``id_dataset`` absent, or incomparable class sets/protocols.
    """
    if not rows:
        raise DataError("no results rows to report")
    check_comparable(rows)
    datasets = {r.dataset for r in rows}
    if id_dataset is not None and id_dataset not in datasets:
        raise DataError(f"in-distribution dataset {id_dataset!r} has no results; {choices_hint(id_dataset, datasets)}")
    shifts = list(shift_datasets) if shift_datasets is not None else _default_shifts(datasets, id_dataset)
    missing = [d for d in shifts if d not in datasets]
    if missing:
        raise DataError(f"shift dataset(s) {missing} have no results; datasets present: {sorted(datasets)}")
    entries = _group(rows)
    return Summary(id_dataset, shifts, entries, _fit(entries, id_dataset, shifts))


@dataclass(frozen=True)
class Table:
    """A table independent of its rendering: columns, rows of cells, notes shown under it.

    The first ``key_columns`` columns identify an entry (``str``, ``int`` or ``float``
    cells, None when empty); the others hold :class:`Stat` cells in percent (None: no value).
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[str | int | float | Stat | None, ...], ...]
    notes: tuple[str, ...] = ()
    key_columns: int = 4


def summary_table(
    rows: Sequence[ResultRow],
    id_dataset: str | None = "imagenet",
    shift_datasets: Sequence[str] | None = None,
) -> Table:
    """One row per (run, method, alpha) entry: ID, each shift, OOD average, effective robustness.

    Only the columns the rows allow: no ID column without an ID set, no OOD average without
    shift sets, no effective robustness without both.

    Args:
        rows: Results rows, e.g. from :func:`robustft.reports.results.read_rows`.
        id_dataset: The in-distribution dataset; None when the rows hold none (see
            :func:`guess_id_dataset`).
        shift_datasets: The shift datasets averaged into "OOD avg"; None means every other
            dataset present (the ImageNet suite in its usual order first).

    Raises:
        DataError: See :func:`summarize`.
    """
    summary = summarize(rows, id_dataset, shift_datasets)
    shifts = summary.shift_datasets
    sets = ([id_dataset] if id_dataset is not None else []) + list(shifts)
    with_ood, with_eff = bool(shifts), bool(shifts) and id_dataset is not None
    columns = ("run", "method", "alpha", "seeds", *sets, *([OOD_AVG] if with_ood else []),
               *([EFF_ROB] if with_eff else []))
    body = []
    for e in summary.entries:
        cells = [summary.stat(e, d) for d in sets]
        cells += [summary.ood(e)] if with_ood else []
        cells += [summary.eff_robustness(e)] if with_eff else []
        body.append((e.label, e.method, e.alpha, len(e.replicates), *cells))
    if id_dataset is None:
        where = ("no in-distribution set in these results (imagenet or id; name one with --id-dataset), so no "
                 f"effective robustness; {OOD_AVG} = mean of {', '.join(shifts)}")
    elif shifts:
        where = f"in-distribution: {id_dataset}; {OOD_AVG} = mean of {', '.join(shifts)}"
    else:
        where = f"in-distribution: {id_dataset}; no shift sets in these results, so no {OOD_AVG} or {EFF_ROB}"
    notes = [f"Top-1 accuracy in %; {where}; mean ± sample std over seeds where seeds > 1."]
    if summary.fit is not None:
        notes.append(f"{EFF_ROB}: OOD avg minus the zero-shot baseline's prediction, in points; "
                     f"baseline: {summary.fit.describe()}.")
    return Table(columns=columns, rows=tuple(body), notes=tuple(notes), key_columns=4)


def _fmt(cell: str | int | float | Stat | None, signed: bool = False) -> str:
    if cell is None:
        return "–"
    if isinstance(cell, Stat):
        mean = f"{cell.mean:+.2f}" if signed else f"{cell.mean:.2f}"
        return mean if cell.std is None else f"{mean} ± {cell.std:.2f}"
    if isinstance(cell, float):
        return f"{cell:.2f}"
    return str(cell)


def to_markdown(table: Table) -> str:
    """The table as GitHub Markdown (numbers to 2 decimals), notes below it."""
    lines = ["| " + " | ".join(table.columns) + " |",
             "|" + "|".join(":---" if i < 2 else "---:" for i in range(len(table.columns))) + "|"]
    for row in table.rows:
        cells = [_fmt(c, signed=table.columns[i] == EFF_ROB) for i, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"{note}  " for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def to_csv(table: Table) -> str:
    """The table as CSV; each metric column is followed by ``<column>_std`` (empty for one seed)."""
    stat_cols = set(range(table.key_columns, len(table.columns)))
    header: list[str] = []
    for i, name in enumerate(table.columns):
        header += [name, f"{name}_std"] if i in stat_cols else [name]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        cells: list[str] = []
        for i, cell in enumerate(row):
            if i in stat_cols:
                stat = cell if isinstance(cell, Stat) else None
                cells += ["" if stat is None else f"{stat.mean:.4f}",
                          "" if stat is None or stat.std is None else f"{stat.std:.4f}"]
            else:
                cells.append("" if cell is None else (f"{cell:g}" if isinstance(cell, float) else str(cell)))
        writer.writerow(cells)
    return out.getvalue()

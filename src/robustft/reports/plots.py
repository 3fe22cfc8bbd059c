"""PNG plots of results rows and the one-call report writer (Markdown, CSV, plots).

Figures are drawn on matplotlib ``Figure`` objects directly (the Agg renderer, no pyplot
and no display), so reports work on headless machines and never touch global state.
Each plot has a title, axis labels with units and a legend, so it reads without the table.
A report draws the plots its results allow: no ID-vs-OOD scatter without an in-distribution
set, shift sets, or an entry evaluated on all of them (the log and ``report.md`` say why).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from robustft.errors import DataError
from robustft.reports.results import ResultRow
from robustft.reports.tables import (
    OOD_AVG,
    Entry,
    Summary,
    guess_id_dataset,
    summarize,
    summary_table,
    to_csv,
    to_markdown,
)

__all__ = ["plot_id_vs_ood", "plot_shift_bars", "write_report", "default_id_dataset"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
_DPI = 120


def _names(summary: Summary) -> dict[int, str]:
    """Legend name of each entry: its method, plus the run when a method has several entries."""
    per_method = defaultdict(set)
    for e in summary.entries:
        if e.alpha is None:
            per_method[e.method].add(e.setting)
    return {id(e): e.method if len(per_method[e.method]) <= 1 else f"{e.method} ({e.label})" for e in summary.entries}


def _curves(summary: Summary) -> dict[tuple[str, str], list[Entry]]:
    """WiSE-FT curves: entries with an alpha, by (method, setting), sorted by alpha."""
    curves: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for e in summary.entries:
        if e.alpha is not None:
            curves[(e.method, e.setting)].append(e)
    return {k: sorted(v, key=lambda e: e.alpha) for k, v in curves.items()}


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    logger.info("wrote %s", path)
    return path


def _draw_references(ax: Axes, summary: Summary, lo: float, hi: float) -> None:
    """The y = x line and the zero-shot baseline fit across the plotted ID range."""
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="0.55", linewidth=1, label="y = x (no drop under shift)")
    if summary.fit is not None:
        xs = [lo + (hi - lo) * i / 100 for i in range(101)]
        ax.plot(xs, [summary.fit.predict(x) for x in xs], linestyle=":", color="0.2", linewidth=1.5,
                label="zero-shot baseline fit (logit-linear)")


def _draw_points(ax: Axes, summary: Summary, entries: Sequence[Entry], names: dict[int, str]) -> list[float]:
    """One marker per non-WiSE entry (mean over seeds, one-std error bars); returns the plotted values."""
    values: list[float] = []
    for i, e in enumerate(entries):
        x, y = summary.stat(e, summary.id_dataset), summary.ood(e)
        if x is None or y is None:
            logger.warning("%s has no complete set of shift results; left out of the ID-vs-OOD plot", e.label)
            continue
        ax.errorbar(x.mean, y.mean, xerr=x.std, yerr=y.std, marker=_MARKERS[i % len(_MARKERS)], markersize=9,
                    linestyle="none", capsize=3, label=names[id(e)], zorder=3)
        values += [x.mean, y.mean]
    return values


def _draw_curves(ax: Axes, summary: Summary, curves: dict[tuple[str, str], list[Entry]]) -> list[float]:
    """WiSE-FT curves through their alpha points, alpha labelled at both ends; returns the plotted values."""
    values: list[float] = []
    for (method, _setting), curve in curves.items():
        pts = [(a.alpha, summary.stat(a, summary.id_dataset), summary.ood(a)) for a in curve]
        pts = [(alpha, x.mean, y.mean) for alpha, x, y in pts if x is not None and y is not None]
        if not pts:
            continue
        label = f"{method} ({curve[0].label})" if len(curves) > 1 else f"{method} (α sweep)"
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker=".", markersize=8, linewidth=1.8, label=label)
        for alpha, x, y in (pts[0], pts[-1]) if len(pts) > 1 else pts[:1]:
            ax.annotate(f"α={alpha:g}", (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
        values += [v for p in pts for v in p[1:]]
    return values


def plot_id_vs_ood(
    rows: Sequence[ResultRow],
    path: PathLike,
    *,
    id_dataset: str | None = "imagenet",
    shift_datasets: Sequence[str] | None = None,
) -> Path:
    """Scatter ID top-1 against OOD-average top-1, one marker per method, WiSE-FT curves as lines.

    Points are the mean over seeds, with error bars (one std) when there are several.
    WiSE-FT entries of one setting are joined in alpha order and labelled with alpha at
    both ends. A dashed y = x line and the zero-shot baseline fit give the references.

    Returns:
        ``path``, written as PNG.

    Raises:
        DataError: See :func:`robustft.reports.tables.summarize`; or there is no ID set
            (``id_dataset`` None), no shift set, or no entry with results on the ID set and
            every shift set.
    """
    summary = summarize(rows, id_dataset, shift_datasets)
    if id_dataset is None:
        raise DataError("the results hold no in-distribution set (imagenet or id; name one with --id-dataset), "
                        "so there is no ID accuracy to plot")
    if not summary.shift_datasets:
        raise DataError(f"the results hold no shift sets besides {id_dataset}, so there is no OOD accuracy to plot")
    curves = _curves(summary)
    in_curve = {id(e) for c in curves.values() for e in c}
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.add_subplot()
    values = _draw_points(ax, summary, [e for e in summary.entries if id(e) not in in_curve], _names(summary))
    values += _draw_curves(ax, summary, curves)
    if not values:
        raise DataError("no entry has results on the ID dataset and every shift dataset; nothing to plot")
    pad = max(2.0, 0.08 * (max(values) - min(values)))
    lo, hi = max(0.0, min(values) - pad), min(100.0, max(values) + pad)
    _draw_references(ax, summary, lo, hi)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)  # equal ranges keep y = x on the diagonal
    ax.set_xlabel(f"ID top-1 accuracy on {id_dataset} (%)")
    ax.set_ylabel(f"OOD top-1 accuracy, mean of {len(summary.shift_datasets)} shift sets (%)")
    ax.set_title("In-distribution vs out-of-distribution accuracy\n(" + ", ".join(summary.shift_datasets) + ")",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def _bar_entries(summary: Summary) -> list[Entry]:
    """Entries shown as bars: every non-WiSE entry, and each WiSE-FT curve at alpha nearest 0.5."""
    chosen = [e for e in summary.entries if e.alpha is None]
    for curve in _curves(summary).values():
        chosen.append(min(curve, key=lambda e: (abs(e.alpha - 0.5), e.alpha)))
    return chosen


def plot_shift_bars(
    rows: Sequence[ResultRow],
    path: PathLike,
    *,
    id_dataset: str | None = "imagenet",
    shift_datasets: Sequence[str] | None = None,
) -> Path:
    """Grouped bars: for the ID set, each shift set and the OOD average, one bar per method.

    WiSE-FT curves are shown at their alpha nearest 0.5 (the usual default). Error bars
    are one std over seeds where there are several. With ``id_dataset`` None (no ID set)
    the groups are the shift sets and their average.

    Returns:
        ``path``, written as PNG.
    """
    summary = summarize(rows, id_dataset, shift_datasets)
    names = _names(summary)
    entries = _bar_entries(summary)
    groups = ([id_dataset] if id_dataset is not None else []) + [*summary.shift_datasets]
    groups += [OOD_AVG] if summary.shift_datasets else []
    width = 0.8 / max(1, len(entries))
    fig = Figure(figsize=(max(7.0, 1.1 * len(groups) * max(1, len(entries)) * 0.45 + 2), 5.0))
    ax = fig.add_subplot()
    for j, e in enumerate(entries):
        stats = [summary.ood(e) if g == OOD_AVG else summary.stat(e, g) for g in groups]
        xs = [i + (j - (len(entries) - 1) / 2) * width for i in range(len(groups))]
        heights = [s.mean if s else 0.0 for s in stats]
        errs = [s.std if s and s.std is not None else 0.0 for s in stats]
        label = names[id(e)] if e.alpha is None else f"{e.method} (α={e.alpha:g})"
        ax.bar(xs, heights, width=width, yerr=errs if any(errs) else None, capsize=2, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g}\n(ID)" if g == id_dataset else g for g in groups], fontsize=9)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Top-1 accuracy per evaluation set and method")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, max(1, len(entries))), loc="upper right")
    return _save(fig, path)


def default_id_dataset(rows: Sequence[ResultRow]) -> str:
    """``imagenet`` when present, else ``id`` (the user-dataset convention).

    Raises:
        DataError: Neither is present (pass the in-distribution dataset explicitly).
    """
    present = {r.dataset for r in rows}
    found = guess_id_dataset(present)
    if found is not None:
        return found
    raise DataError(f"cannot tell the in-distribution dataset among {sorted(present)}; name it explicitly")


def write_report(
    rows: Sequence[ResultRow],
    out_dir: PathLike,
    *,
    id_dataset: str | None = None,
    shift_datasets: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv``, ``id_vs_ood.png`` and ``shift_bars.png`` to ``out_dir``.

    Args:
        rows: Results rows.
        out_dir: Output folder (created if missing).
        id_dataset: The in-distribution dataset; None picks ``imagenet`` or ``id`` when
            present, else the rows have no ID set (every dataset is a shift set).
        shift_datasets: Shift datasets of the OOD average; None means all others present.

    Returns:
        ``{"markdown", "csv", "id_vs_ood", "shift_bars"}`` -> the written files; without
        an ID set or shift results (no shift set, or no entry evaluated on all of them)
        there is no ``id_vs_ood`` plot, and the log and ``report.md`` say why.

    Raises:
        DataError: No rows, incomparable results, or a missing ID/shift dataset.
    """
    if id_dataset is None:
        id_dataset = guess_id_dataset(r.dataset for r in rows)
    out = Path(out_dir)
    table = summary_table(rows, id_dataset, shift_datasets)  # refuses incomparable rows before anything is written
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    skipped: list[str] = []
    try:
        files["id_vs_ood"] = plot_id_vs_ood(rows, out / "id_vs_ood.png", id_dataset=id_dataset,
                                            shift_datasets=shift_datasets)
    except DataError as exc:  # the rows were checked above: this only means no ID or shift results to plot
        logger.warning("no ID-vs-OOD plot (id_vs_ood.png not written): %s", exc)
        skipped.append(f"No ID-vs-OOD plot: {exc}.")
    files["shift_bars"] = plot_shift_bars(rows, out / "shift_bars.png", id_dataset=id_dataset,
                                          shift_datasets=shift_datasets)
    sources = sorted({(r.source or "<memory>").rsplit(":", 1)[0] for r in rows})
    images = (["![ID vs OOD accuracy](id_vs_ood.png)", ""] if "id_vs_ood" in files else []) + [
        "![Accuracy per evaluation set](shift_bars.png)", ""]
    text = "\n".join([
        "# Results", "", to_markdown(table), *(line for note in skipped for line in (note, "")), *images,
        f"Sources: {', '.join(sources)} ({len(rows)} rows).", "",
    ])
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(text, encoding="utf-8")
    files["csv"] = out / "report.csv"
    files["csv"].write_text(to_csv(table), encoding="utf-8")
    logger.info("report written to %s", out)
    return files

"""Reports: results rows (JSONL), summary tables (Markdown, CSV) and plots (PNG).

Typical use::

    rows = read_rows(["results.jsonl"])
    write_report(rows, "report/")        # report.md, report.csv, id_vs_ood.png, shift_bars.png

Names are imported lazily (PEP 562), so reading and writing rows does not import matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ResultRow",
    "Table",
    "append_rows",
    "classnames_hash",
    "config_hash",
    "plot_id_vs_ood",
    "plot_shift_bars",
    "read_rows",
    "rows_from_results",
    "summary_table",
    "to_csv",
    "to_markdown",
    "write_report",
]

_HOME = {
    "ResultRow": "results",
    "append_rows": "results",
    "classnames_hash": "results",
    "config_hash": "results",
    "read_rows": "results",
    "rows_from_results": "results",
    "Table": "tables",
    "summary_table": "tables",
    "to_csv": "tables",
    "to_markdown": "tables",
    "plot_id_vs_ood": "plots",
    "plot_shift_bars": "plots",
    "write_report": "plots",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

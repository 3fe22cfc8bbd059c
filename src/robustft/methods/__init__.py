"""methods layer of robustft: methods as compositions of one objective layer.

A method is a task objective (``task_*.py``), zero or more regularisers (``reg_*.py``) and
optional weight-space steps (``wise_ft.py``), composed in :mod:`.objective`; the named
methods are in :mod:`.catalogue`, and ``TASK+REG[+REG...][+wise]`` names compose on demand.
Importing this package imports every public module in it, so a new term registers itself;
look methods up with :func:`build_method` / :func:`list_methods`.
"""

from __future__ import annotations

import importlib
import pkgutil

from robustft.methods.base import METHODS, Method, MethodOptions, build_method, list_methods, register_method

__all__ = ["METHODS", "Method", "MethodOptions", "build_method", "list_methods", "register_method"]

# Imported in this order: the objective layer, its task objectives and regularisers, then
# the catalogue of named methods (the order `robustft methods` lists them in); any other
# public module of the package is imported after them.
_ORDER = ("zeroshot", "objective", "task_ce", "task_contrastive", "reg_distill", "reg_counterfactual", "reg_l2sp",
          "wise_ft", "catalogue")
_NOT_METHODS = {"base", "cam_cache"}
for _name in (*_ORDER, *sorted(i.name for i in pkgutil.iter_modules(__path__))):
    if not _name.startswith("_") and _name not in _NOT_METHODS:
        importlib.import_module(f"{__name__}.{_name}")

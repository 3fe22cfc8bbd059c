"""methods layer of robustft: one file per method, registered by name.

Importing this package imports every public module in it, so a new method file registers
itself; look methods up with :func:`build_method` / :func:`list_methods`.
"""

from __future__ import annotations

import importlib
import pkgutil

from robustft.methods.base import METHODS, Method, MethodOptions, build_method, list_methods, register_method

__all__ = ["METHODS", "Method", "MethodOptions", "build_method", "list_methods", "register_method"]

# Imported in this order, which is the order `robustft methods` lists them in; any other
# public module of the package is imported after them.
_ORDER = ("zeroshot", "lp", "ft", "lp_ft", "wise_ft", "kd", "fd", "kd_refill", "fd_refill", "fd_tokendrop",
          "fd_attnmask")
_NOT_METHODS = {"base", "cam_cache"}

for _name in (*_ORDER, *sorted(i.name for i in pkgutil.iter_modules(__path__))):
    if not _name.startswith("_") and _name not in _NOT_METHODS:
        importlib.import_module(f"{__name__}.{_name}")

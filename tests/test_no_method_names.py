"""No module outside the methods layer names a training method (the objective layer's contract).

The pipeline and the engine ask a method class what it needs (``requirements()``, ``stages()``,
``probe``, ``interpolates``, ``sync_head()``) instead of branching on its name, and the demo
reads its run list from ``pipeline/demo_runs.yaml``. This test reads every module's string
literals (by parsing it, so docstrings and comments that merely mention a method do not
count) and fails on one equal to the name of a method that trains.

Exempt: ``config.py``, whose default ``method.name`` is a value like the presets' YAML, and
the zero-shot classifier's name, which does not train and is also the name of a command, a
run kind and a cache folder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import robustft
from robustft.methods import METHODS

SRC = Path(robustft.__file__).parent
EXEMPT_FILES = {SRC / "config.py"}


def _training_method_names() -> set[str]:
    return {name for name in METHODS.names() if METHODS.get(name).trains}


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_no_module_outside_the_methods_layer_names_a_training_method() -> None:
    names = _training_method_names()
    assert {"ft", "lp", "lp-ft", "wise-ft", "fd-refill", "flyp", "l2sp"} <= names  # the scan looks for real names
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if (SRC / "methods") in path.parents or path in EXEMPT_FILES:
            continue
        offenders += [f"{path.relative_to(SRC)}:{line}: {value!r}" for line, value in _literals(path) if value in names]
    assert not offenders, "method names outside robustft.methods:\n" + "\n".join(offenders)


def test_the_scan_finds_a_method_name_where_there_is_one(tmp_path: Path) -> None:
    module = tmp_path / "branchy.py"
    module.write_text('"""Mentions fd-refill in prose only."""\n\nif name == "wise-ft":\n    pass\n')
    found = [value for _, value in _literals(module) if value in _training_method_names()]
    assert found == ["wise-ft"]

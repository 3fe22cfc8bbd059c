"""Prompt templates and class names for zero-shot heads, by name or from a text file.

Template sets: ``"openai_imagenet"`` (the 80 ImageNet templates published with CLIP, as
format strings such as ``"a photo of a {}."``), ``"simple"`` (``["a photo of a {}."]``),
or a path to a UTF-8 text file with one template per line, each containing ``{}`` once.

Class-name sets: ``"imagenet"`` (CLIP's curated names of the 1000 ImageNet classes, in
class-index order), or a path to a UTF-8 text file with one name per line (line i is
class i). The built-in ImageNet list is CLIP's and keeps its two repeated names
("missile", "sunglasses"); user lists must have unique, non-empty names.

The built-in lists come from ``open_clip.zero_shot_metadata``; they are turned into
plain strings here so that they can be saved with a run and printed.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip

from robustft.errors import ConfigError, choices_hint
from robustft.registry import Registry

__all__ = [
    "TEMPLATE_SETS",
    "CLASSNAME_SETS",
    "load_templates",
    "load_classnames",
    "check_templates",
    "check_classnames",
]

TEMPLATE_SETS: Registry[Callable[[], list[str]]] = Registry("template set", ConfigError)
CLASSNAME_SETS: Registry[Callable[[], list[str]]] = Registry("class-name set", ConfigError)

Spec = str | os.PathLike[str] | Sequence[str]


@TEMPLATE_SETS.register("openai_imagenet")
def _openai_imagenet_templates() -> list[str]:
    # open_clip stores them as lambdas; calling one with "{}" yields its format string.
    return [template("{}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES]


@TEMPLATE_SETS.register("simple")
def _simple_templates() -> list[str]:
    return ["a photo of a {}."]


@CLASSNAME_SETS.register("imagenet")
def _imagenet_classnames() -> list[str]:
    return list(open_clip.IMAGENET_CLASSNAMES)


def load_templates(spec: Spec) -> list[str]:
    """Resolve a template set: a registered name, a text file, or a list of templates.

    Returns:
        Format strings, each with exactly one ``{}``.

    Raises:
        ConfigError: Unknown name (with valid names), unreadable file, or a template
            without exactly one ``{}`` (naming its line).
    """
    if not isinstance(spec, (str, os.PathLike)):
        templates = list(spec)
        check_templates(templates, source="the template list")
        return templates
    name = os.fspath(spec)
    if name in TEMPLATE_SETS:
        return TEMPLATE_SETS.get(name)()
    lines = _read_lines(name, kind="template set", registry=TEMPLATE_SETS)
    numbered = [(i, line.strip()) for i, line in enumerate(lines, start=1) if line.strip()]
    for lineno, template in numbered:
        problem = _template_problem(template)
        if problem:
            raise ConfigError(f"{name}, line {lineno}: template {template!r} {problem}")
    if not numbered:
        raise ConfigError(f"template file {name} has no templates (one per line, each with one '{{}}')")
    return [template for _, template in numbered]


def load_classnames(spec: Spec) -> list[str]:
    """Resolve class names: a registered name, a text file (line i = class i), or a list.

    Raises:
        ConfigError: Unknown name, unreadable file, or empty / duplicate names (named).
    """
    if not isinstance(spec, (str, os.PathLike)):
        names = [str(n) for n in spec]
        check_classnames(names, source="the class-name list")
        return names
    name = os.fspath(spec)
    if name in CLASSNAME_SETS:
        return CLASSNAME_SETS.get(name)()
    lines = [line.strip() for line in _read_lines(name, kind="class-name set", registry=CLASSNAME_SETS)]
    while lines and not lines[-1]:
        lines.pop()  # trailing blank lines only; a blank line inside would shift class indices
    check_classnames(lines, source=name)
    return lines


def check_templates(templates: Sequence[str], source: str = "templates") -> None:
    """Raise ConfigError unless ``templates`` is a non-empty list of one-``{}`` format strings."""
    if len(templates) == 0:
        raise ConfigError(f"{source} is empty; give at least one template such as 'a photo of a {{}}.'")
    for i, template in enumerate(templates):
        problem = _template_problem(template) if isinstance(template, str) else "is not a string"
        if problem:
            raise ConfigError(f"{source}, entry {i}: template {template!r} {problem}")


def check_classnames(names: Sequence[str], source: str = "class names") -> None:
    """Raise ConfigError if ``names`` is empty or has empty or repeated entries (all named)."""
    if len(names) == 0:
        raise ConfigError(f"{source} has no class names (one per line)")
    empty = [i + 1 for i, n in enumerate(names) if not n.strip()]
    if empty:
        raise ConfigError(f"{source}: empty class name at line(s) {empty[:20]}")
    repeated = sorted(n for n, count in Counter(names).items() if count > 1)
    if repeated:
        raise ConfigError(f"{source}: duplicate class names {repeated[:20]}; each class needs a distinct name")


def _template_problem(template: str) -> str | None:
    if template.count("{}") != 1:
        return f"must contain '{{}}' exactly once (found {template.count('{}')})"
    rest = template.replace("{}", "")
    if "{" in rest or "}" in rest:
        return "has braces other than the one '{}' placeholder"
    return None


def _read_lines(path_str: str, *, kind: str, registry: Registry[Callable[[], list[str]]]) -> list[str]:
    path = Path(path_str).expanduser()
    if not path.is_file():
        hint = choices_hint(path_str, registry.names())
        raise ConfigError(f"unknown {kind} {path_str!r}: not a file; {hint} (or a path to a text file)")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {kind} file {path}: {exc}") from None

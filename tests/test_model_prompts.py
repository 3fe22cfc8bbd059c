"""Template sets and class-name sets: built-ins, user files, and their validation."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest

from robustft.errors import ConfigError
from robustft.model import load_classnames, load_templates


def test_openai_imagenet_templates_match_open_clip() -> None:
    templates = load_templates("openai_imagenet")
    assert len(templates) == 80
    assert all(t.count("{}") == 1 for t in templates)
    for template, reference in zip(templates, open_clip.OPENAI_IMAGENET_TEMPLATES):
        assert template.format("golden retriever") == reference("golden retriever")


def test_simple_templates() -> None:
    assert load_templates("simple") == ["a photo of a {}."]


def test_imagenet_classnames_are_clip_names_in_order() -> None:
    names = load_classnames("imagenet")
    assert len(names) == 1000
    assert names == list(open_clip.IMAGENET_CLASSNAMES)
    assert names[0] == "tench"


def test_template_file(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\n\n  itap of the {}.  \nart of a {}\n", encoding="utf-8")
    assert load_templates(path) == ["a photo of a {}.", "itap of the {}.", "art of a {}"]
    assert load_templates(str(path)) == load_templates(path)


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [("a photo", "exactly once"), ("{} and {}", "exactly once"), ("a {} {x}", "braces")],
)
def test_template_file_errors_name_the_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = tmp_path / "t.txt"
    path.write_text(f"a photo of a {{}}.\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2") as info:
        load_templates(path)
    assert reason in str(info.value) and repr(bad_line) in str(info.value)


def test_empty_template_file(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no templates"):
        load_templates(path)


def test_template_list_is_validated() -> None:
    assert load_templates(["x {}"]) == ["x {}"]
    with pytest.raises(ConfigError, match="entry 1"):
        load_templates(["x {}", "no placeholder"])
    with pytest.raises(ConfigError, match="empty"):
        load_templates([])


def test_unknown_set_name_suggests_registered_names() -> None:
    with pytest.raises(ConfigError, match="openai_imagenet"):
        load_templates("openai_imagenett")
    with pytest.raises(ConfigError, match="imagenet"):
        load_classnames("imagenett")


def test_classname_file(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("cat\n  dog \nbig bird\n\n\n", encoding="utf-8")
    assert load_classnames(path) == ["cat", "dog", "big bird"]


def test_classname_file_duplicates_are_named(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("cat\ndog\ncat\nbird\ndog\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="duplicate") as info:
        load_classnames(path)
    assert "'cat'" in str(info.value) and "'dog'" in str(info.value)


def test_classname_file_blank_line_inside_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("cat\n\ndog\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line\(s\) \[2\]"):
        load_classnames(path)


def test_empty_classname_file(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="no class names"):
        load_classnames(path)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match="c.txt"):
        load_classnames(path)


def test_classname_list_is_validated() -> None:
    assert load_classnames(("a", "b")) == ["a", "b"]
    with pytest.raises(ConfigError, match="'a'"):
        load_classnames(["a", "b", "a"])
    with pytest.raises(ConfigError, match="empty class name"):
        load_classnames(["a", " "])

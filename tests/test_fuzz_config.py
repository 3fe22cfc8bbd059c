"""Property-based fuzzing of the config layer: bad input only ever raises ConfigError.

Whatever text a user passes to ``--set``, whatever key/value list the CLI collects, and
whatever nested mapping a YAML preset holds, robustft either builds a valid
:class:`RunConfig` or raises :class:`robustft.errors.ConfigError` with a one-line-able
message: never a TypeError, KeyError, RecursionError or a bare ValueError from deep inside.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustft.config import RunConfig, build_config, config_from_dict, config_to_dict, parse_override
from robustft.errors import ConfigError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Real dotted keys, so that a good share of the examples get past the key check and
# exercise the value checks (types, ranges, choices) too.
_KEYS: list[str] = []


def _collect(cls: type, prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            _collect(hints[f.name], f"{prefix}{f.name}.")
        else:
            _KEYS.append(prefix + f.name)


_collect(RunConfig, "")

_key_part = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="=\n"), max_size=12)
keys = st.one_of(
    st.sampled_from(_KEYS),
    st.sampled_from(_KEYS),
    st.lists(_key_part, min_size=1, max_size=4).map(".".join),
    st.sampled_from(_KEYS).map(lambda k: k + ".x"),
    st.integers(2, 3000).map(lambda n: ".".join(["optim"] * n)),  # deep keys must not exhaust the stack
)


def _yaml_float(x: float) -> str:
    return ".nan" if math.isnan(x) else (".inf" if x > 0 else "-.inf") if math.isinf(x) else repr(x)


yaml_values = st.one_of(
    st.sampled_from(["1e-5", "-1", "0", "1.5", "nan", "inf", "-.inf", "true", "null", "~", "[1, 2]", "{a: 1}",
                     ".nan", ".inf", "1e999", "1e300", "-1e300", "9223372036854775808", "[", "{", "'", '"',
                     "!!python/object:os.system", "&a [*a]", "0x1F", "1_000", "12:30", "2020-13-45", "!!int x",
                     "ObjMaskSingleFill(0.3)", "fd-refill", "cpu", "[id, 'x']", "- a", "a: b: c", "%", "@"]),
    st.text(max_size=30),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(_yaml_float),
)

# Values at the edges of every field's type and range, paired with real keys.
EDGES = [".nan", ".inf", "-.inf", "1e999", "1e300", "-1e-300", "-1", "0", "1", "2", "0.5", "1.5", "1e-5", "true",
         "null", "''", "x", "[]", "[1]", "{}", "9223372036854775808", "-9223372036854775809", "1.0e20", "9" * 400,
         "&a [*a]", "&a {x: *a}"]
typed = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_KEYS), st.sampled_from(EDGES))
overrides = st.one_of(typed, st.builds(lambda k, v: f"{k}={v}", keys, yaml_values), st.text(max_size=40))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    st.sampled_from(["ft", "fd-refill", "cpu", "onecycle", "mmcam", "ObjMaskSingleFill(0.3)", "auto"]),
)
dict_keys = st.one_of(st.sampled_from([k.split(".")[-1] for k in _KEYS] + ["model", "optim", "data", "method"]),
                      st.text(max_size=8), st.integers(), st.none(), st.booleans())
nested = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(dict_keys, children, max_size=4),
    max_leaves=20,
)
sections = st.fixed_dictionaries(
    {}, optional={name: nested for name in ("model", "head", "data", "method", "optim", "checkpoint", "eval",
                                            "seed", "name", "device", "dist_timeout_s")},
)


def _check_fields(node: Any, prefix: str = "") -> None:
    """Every value of a built config respects what its field declares (type, range, choices)."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            _check_fields(value, key + ".")
            continue
        if isinstance(value, float):
            assert math.isfinite(value), f"{key} = {value!r} was accepted"
        if value is None:  # an optional field left unset ("use another field's value")
            assert type(None) in typing.get_args(hints[f.name]), f"{key} = None was accepted"
            continue
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        assert lo is None or value >= lo, f"{key} = {value!r} < {lo}"
        assert hi is None or value <= hi, f"{key} = {value!r} > {hi}"
        choices = f.metadata.get("choices")
        assert not choices or value in choices, f"{key} = {value!r} not in {choices}"


def _valid(cfg: RunConfig) -> None:
    """A built config round-trips and keeps every range its fields declare."""
    assert isinstance(cfg, RunConfig)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    _check_fields(cfg)


@FUZZ
@given(st.text(max_size=60))
def test_parse_override_on_any_text(text: str) -> None:
    try:
        out = parse_override(text)
    except ConfigError:
        return
    assert isinstance(out, dict) and len(out) == 1


@FUZZ
@given(overrides)
def test_parse_override_on_key_value_text(text: str) -> None:
    try:
        parse_override(text)
    except ConfigError:
        pass


@FUZZ
@given(st.lists(overrides, max_size=5))
def test_build_config_on_any_overrides(items: list[str]) -> None:
    try:
        cfg = build_config(None, items)
    except ConfigError:
        return
    _valid(cfg)


@FUZZ
@given(st.one_of(sections, nested))
def test_config_from_dict_on_any_nesting(data: object) -> None:
    try:
        cfg = config_from_dict(data)  # type: ignore[arg-type]
    except ConfigError:
        return
    _valid(cfg)


preset_texts = st.one_of(
    st.text(max_size=80),
    st.one_of(sections, nested).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.lists(st.builds(lambda k, v: f"{k}: {v}", dict_keys.map(str), st.sampled_from(EDGES)), max_size=4).map(
        "\n".join),
    st.sampled_from(["base: smoke\noptim: {lr: .nan}", "base: [1]", "base: 3", "base: nonexistent", "&a [*a]",
                     "a: &a {b: *a}", "optim: &o {lr: 1}\nmodel: *o", "!!python/object/apply:os.system [ls]"]),
)


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzzed-presets")


@FUZZ
@given(text=preset_texts)
def test_preset_files_of_any_text(preset_dir: Path, text: str) -> None:
    path = preset_dir / "fuzzed.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = build_config(str(path))
    except ConfigError:
        return
    _valid(cfg)


def test_known_keys_were_found() -> None:
    # Guards the fuzzers' key list: they must hit real keys of every section.
    assert {"optim.lr", "method.masking", "data.batch_size", "seed", "checkpoint.every"} <= set(_KEYS)


@pytest.mark.parametrize("override", [
    "optim.lr=.nan", "optim.epochs=.inf", "dist_timeout_s=.inf", "method.alphas=[.nan]", "optim.lr=" + "9" * 400,
    "seed=1e300", "seed=9223372036854775808", "optim.lr=2020-13-45", ".".join(["optim"] * 3000) + "=1",
])
def test_found_by_the_fuzzers(override: str) -> None:
    # Each of these once crashed or was accepted (NaN passes every range check); keep them out.
    with pytest.raises(ConfigError):
        build_config(None, [override, override])


def test_self_referring_yaml_alias_in_a_preset(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("data: &d {paths: *d}\n")
    with pytest.raises(ConfigError, match="refers to the value that contains it"):
        build_config(str(path))

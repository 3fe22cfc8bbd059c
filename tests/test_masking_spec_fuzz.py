"""Fuzz parse_masking: any input yields a MaskingSpec or a ConfigError, never anything else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from robustft.errors import ConfigError
from robustft.ops.masking import MASKING_NAMES, MaskingSpec, parse_masking

_SETTINGS = settings(max_examples=300, deadline=None)

# text that is often close to valid, so the parser's deeper branches get exercised
_near_valid = st.builds(
    lambda name, case, inner, pad: pad + (name.lower() if case else name) + inner + pad,
    st.sampled_from(MASKING_NAMES + ("ObjMask", "Fill", "")),
    st.booleans(),
    st.one_of(st.just(""), st.text(max_size=12).map(lambda s: f"({s})"),
              st.floats(allow_nan=True, allow_infinity=True).map(lambda v: f"({v})"),
              st.floats(0, 1).map(lambda v: f"({v}, derangement)")),
    st.sampled_from(["", " ", "\t", "\n"]),
)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                     st.sampled_from(["obj", "ctx", "rand", "none", "single", "multi", "derangement", "permutation"]),
                     st.lists(st.integers(), max_size=2))
_dicts = st.dictionaries(st.one_of(st.sampled_from(["region", "fill", "value", "donors"]), st.text(max_size=6),
                                   st.integers()), _scalars, max_size=5)


def _parse_or_config_error(spec: object) -> MaskingSpec | None:
    try:
        result = parse_masking(spec)  # type: ignore[arg-type]
    except ConfigError as err:
        assert "\n" not in str(err)
        return None
    assert isinstance(result, MaskingSpec) and 0.0 <= result.value <= 1.0
    return result


@_SETTINGS
@given(st.one_of(st.text(), _near_valid))
def test_text_gives_spec_or_config_error(text):
    _parse_or_config_error(text)


@_SETTINGS
@given(st.one_of(_dicts, _scalars))
def test_dicts_and_other_objects_give_spec_or_config_error(obj):
    _parse_or_config_error(obj)


@_SETTINGS
@given(st.sampled_from(["rand", "obj", "ctx"]), st.sampled_from(["none", "single", "multi"]),
       st.floats(0, 1), st.sampled_from(["permutation", "derangement"]))
def test_spec_round_trips_through_str_and_dict(region, fill, value, donors):
    if fill != "single":
        donors = "permutation"
    spec = MaskingSpec(region, fill, value, donors)
    assert parse_masking(str(spec)) == spec
    assert parse_masking(spec.as_dict()) == spec
    assert parse_masking(spec.name).value == spec.value

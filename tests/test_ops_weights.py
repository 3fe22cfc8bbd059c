"""ops.weights: WiSE-FT weight interpolation and alpha parsing."""

from __future__ import annotations

import pytest
import torch

from robustft.errors import CheckpointError, ConfigError
from robustft.ops.weights import assert_compatible, interpolate_state_dicts, parse_alphas


def _pair() -> tuple[dict, dict]:
    theta0 = {"w": torch.tensor([[0.0, 2.0], [4.0, -1.0]]), "b": torch.tensor([1.0]),
              "steps": torch.tensor(7), "h": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    theta1 = {"w": torch.tensor([[2.0, 2.0], [0.0, 3.0]]), "b": torch.tensor([3.0]),
              "steps": torch.tensor(7), "h": torch.tensor([3.0, 6.0], dtype=torch.bfloat16)}
    return theta0, theta1


def test_alpha_ends_are_exact_and_midpoint_by_hand():
    theta0, theta1 = _pair()
    for key, tensor in interpolate_state_dicts(theta0, theta1, 0.0).items():
        assert torch.equal(tensor, theta0[key])
    for key, tensor in interpolate_state_dicts(theta0, theta1, 1).items():
        assert torch.equal(tensor, theta1[key])
    mid = interpolate_state_dicts(theta0, theta1, 0.5)
    # (0+2)/2, (2+2)/2, (4+0)/2, (-1+3)/2
    assert torch.equal(mid["w"], torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    assert torch.equal(mid["b"], torch.tensor([2.0]))
    assert torch.equal(mid["h"], torch.tensor([2.0, 4.0], dtype=torch.bfloat16))
    assert mid["steps"].item() == 7 and mid["steps"].dtype == torch.int64
    # 0.25 -> 0.75 * theta0 + 0.25 * theta1
    torch.testing.assert_close(interpolate_state_dicts(theta0, theta1, 0.25)["w"],
                               torch.tensor([[0.5, 2.0], [3.0, 0.0]]))


def test_result_owns_its_memory_and_has_no_graph():
    theta0 = {"w": torch.zeros(3, requires_grad=True)}
    theta1 = {"w": torch.ones(3)}
    out = interpolate_state_dicts(theta0, theta1, 0.0)
    assert not out["w"].requires_grad
    out["w"].add_(5.0)
    assert theta0["w"].sum().item() == 0.0
    assert list(interpolate_state_dicts({"b": torch.ones(1), "a": torch.ones(1)},
                                        {"a": torch.ones(1), "b": torch.ones(1)}, 0.5)) == ["b", "a"]


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_alpha_outside_unit_interval_is_a_config_error(alpha):
    theta0, theta1 = _pair()
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        interpolate_state_dicts(theta0, theta1, alpha)


def test_incompatible_dicts_give_a_key_and_shape_diff():
    theta0 = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1), "i": torch.zeros(2, dtype=torch.long)}
    theta1 = {"a": torch.zeros(2), "b": torch.zeros(4), "d": torch.zeros(1), "i": torch.zeros(2)}
    with pytest.raises(CheckpointError) as info:
        assert_compatible(theta0, theta1)
    message = str(info.value)
    assert "\n" not in message
    assert "missing in theta1: c" in message
    assert "extra in theta1: d" in message
    assert "b (3,) vs (4,)" in message
    assert "i (torch.int64 vs torch.float32)" in message
    with pytest.raises(CheckpointError):
        interpolate_state_dicts(theta0, theta1, 0.5)
    assert_compatible(theta0, dict(theta0))  # identical: no error


def test_differing_integer_buffers_cannot_be_interpolated():
    theta0, theta1 = _pair()
    theta1["steps"] = torch.tensor(8)
    with pytest.raises(CheckpointError, match="steps"):
        interpolate_state_dicts(theta0, theta1, 0.5)


@pytest.mark.parametrize("text, expected", [
    ("0.5", [0.5]),
    (" 0, 0.5 ,1 ", [0.0, 0.5, 1.0]),
    ("0:1:0.1", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
    ("0:1:0.25", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("0:1:0.3", [0.0, 0.3, 0.6, 0.9]),  # 1.2 > stop: stop not reached, not added
    ("0.2:0.2:0.1", [0.2]),
    ("0 : 0.9 : 0.3", [0.0, 0.3, 0.6, 0.9]),  # 0.9 reached within float noise
])
def test_parse_alphas_forms(text, expected):
    assert parse_alphas(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("0,1.5,-0.2", "1.5, -0.2 outside"),
    ("0:2:0.5", "1.5, 2 outside"),
    ("0:1:0", "step must be > 0"),
    ("1:0:0.1", "below start"),
    ("0:1", "start:stop:step"),
    ("a,b", "not a number"),
    ("0,,1", "not a number"),
    ("", "empty"),
    ("nan", "not finite"),
    ("0:1:1e-12", "more than"),
])
def test_parse_alphas_errors(text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("+", r"\+")):
        parse_alphas(text)

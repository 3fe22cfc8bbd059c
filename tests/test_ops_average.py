"""ops.weights: the one weighted mean of state dicts (model soups, WiSE-FT) and blend_into."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustft.errors import CheckpointError, ConfigError
from robustft.ops.weights import average_state_dicts, blend_into, interpolate_state_dicts


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 3, generator=gen), "h": torch.randn(5, generator=gen).to(torch.bfloat16),
             "steps": torch.tensor(7)} for _ in range(n)]


def test_three_way_mean_by_hand_and_exact_ends():
    a = {"w": torch.tensor([0.0, 3.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(2)}
    c = {"w": torch.tensor([6.0, 6.0]), "n": torch.tensor(2)}
    mean = average_state_dicts([a, b, c], [1 / 3, 1 / 3, 1 / 3])
    torch.testing.assert_close(mean["w"], torch.tensor([3.0, 3.0]))
    assert mean["n"].item() == 2 and mean["n"].dtype == torch.int64
    states = _states(3)
    for i in range(3):
        one_hot = [1.0 if j == i else 0.0 for j in range(3)]
        for key, tensor in average_state_dicts(states, one_hot).items():
            assert torch.equal(tensor, states[i][key]) and tensor.dtype == states[0][key].dtype
    for key, tensor in average_state_dicts(states[:2], [1, 0]).items():
        assert torch.equal(tensor, states[0][key])
    for key, tensor in average_state_dicts(states[:1], [1.0]).items():
        assert torch.equal(tensor, states[0][key])


def test_inf_in_a_zero_weight_state_does_not_leak():
    a, b, c = ({"w": torch.tensor([1.0, 2.0])} for _ in range(3))
    c = {"w": torch.tensor([float("inf"), 0.0])}
    assert torch.equal(average_state_dicts([a, b, c], [0.5, 0.5, 0.0])["w"], torch.tensor([1.0, 2.0]))


def test_two_points_are_wise_ft_lerp_bit_for_bit():
    theta0, theta1 = _states(2, seed=4)
    for alpha in (0.0, 0.1, 0.3, 0.5, 0.75, 1.0):
        mixed = average_state_dicts([theta0, theta1], [1 - alpha, alpha])
        wise = interpolate_state_dicts(theta0, theta1, alpha)
        for key in ("w", "h"):
            assert torch.equal(mixed[key], torch.lerp(theta0[key], theta1[key], alpha))
            assert torch.equal(wise[key], mixed[key])


def test_low_precision_means_accumulate_in_float32():
    states = _states(5, seed=1)
    mean = average_state_dicts(states, [0.2] * 5)
    want = sum(0.2 * s["h"].float() for s in states).to(torch.bfloat16)
    assert mean["h"].dtype == torch.bfloat16 and torch.equal(mean["h"], want)
    torch.testing.assert_close(mean["w"], torch.stack([s["w"] for s in states]).mean(0))


def test_result_is_detached_and_owns_its_memory():
    states = [{"w": torch.zeros(3, requires_grad=True)}, {"w": torch.ones(3)}, {"w": torch.ones(3)}]
    for n in (1, 2, 3):
        out = average_state_dicts(states[:n], [1.0 / n] * n)
        assert not out["w"].requires_grad
        out["w"].add_(5.0)
        assert states[0]["w"].sum().item() == 0.0


@pytest.mark.parametrize("weights, fragment", [
    ([0.5, 0.5], "2 weights for 3"),
    ([0.5, 0.6, -0.1], "outside the valid range"),
    ([0.3, 0.3, 0.3], "sum to 0.9, not 1"),
    ([True, 0.0, 0.0], "outside the valid range"),
])
def test_bad_weights_are_config_errors(weights, fragment):
    with pytest.raises(ConfigError, match=fragment):
        average_state_dicts(_states(3), weights)
    with pytest.raises(ConfigError, match="no state dicts"):
        average_state_dicts([], [])


def test_incompatible_or_differing_integer_entries_are_refused_by_index():
    states = _states(3)
    states[2]["w"] = torch.zeros(4, 4)
    with pytest.raises(CheckpointError, match=r"state dict 2.*w \(4, 3\) vs \(4, 4\)"):
        average_state_dicts(states, [0.2, 0.3, 0.5])
    states = _states(3)
    states[1]["steps"] = torch.tensor(8)
    with pytest.raises(CheckpointError, match="steps"):
        average_state_dicts(states, [0.2, 0.3, 0.5])


def test_blend_into_builds_a_new_frozen_module_and_leaves_the_template():
    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    others = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2)]
    before = {k: v.clone() for k, v in template.state_dict().items()}
    states = [template.state_dict(), *(m.state_dict() for m in others)]
    blended = blend_into(template, states, [0.5, 0.25, 0.25])
    assert blended is not template and not blended.training
    assert not any(p.requires_grad for p in blended.parameters())
    assert template.training and all(p.requires_grad for p in template.parameters())
    assert all(torch.equal(before[k], v) for k, v in template.state_dict().items())
    want = 0.5 * states[0]["0.weight"] + 0.25 * states[1]["0.weight"] + 0.25 * states[2]["0.weight"]
    torch.testing.assert_close(blended.state_dict()["0.weight"], want)
    with pytest.raises(CheckpointError, match="the blend is not from the same architecture as the template module"):
        blend_into(nn.Linear(3, 5), states, [0.5, 0.25, 0.25])

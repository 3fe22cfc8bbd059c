"""The one-cycle schedule against hand-computed values, the alternatives, and the AdamW builder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from robustft.engine import build_optimizer, build_scheduler, default_param_groups
from robustft.errors import ConfigError

PEAK = 3e-5


def _optimizer(lr: float = PEAK) -> torch.optim.AdamW:
    model = nn.Linear(3, 2)
    return build_optimizer(default_param_groups(model, 0.1), lr=lr, weight_decay=0.1)


def _trace(name: str, total: int, warmup: float) -> list[tuple[float, float]]:
    """(lr, beta1) in force for each optimizer step 0..total-1."""
    opt = _optimizer()
    sched = build_scheduler(opt, name, total, warmup)
    out = []
    for _ in range(total):
        group = opt.param_groups[0]
        out.append((group["lr"], group["betas"][0]))
        opt.step()
        sched.step()
    return out


def test_onecycle_matches_hand_computed_values() -> None:
    # total 100, pct_start 0.02: warm-up ends at step 0.02*100 - 1 = 1, the cycle at step 99.
    trace = _trace("onecycle", 100, 0.02)
    start, low = PEAK / 25, PEAK / 25 / 1e4
    assert trace[0][0] == pytest.approx(start, rel=1e-12) and trace[0][1] == pytest.approx(0.95)
    assert trace[1][0] == pytest.approx(PEAK, rel=1e-12) and trace[1][1] == pytest.approx(0.85)
    # Mid-decay, step 50: pct = (50 - 1) / (99 - 1) = 0.5 -> halfway on the cosine.
    assert trace[50][0] == pytest.approx((PEAK + low) / 2, rel=1e-9)
    assert trace[50][1] == pytest.approx(0.90, rel=1e-9)
    # Step 25: pct = 24 / 98, lr = low + (PEAK - low) * (1 + cos(pi * pct)) / 2.
    pct = 24 / 98
    assert trace[25][0] == pytest.approx(low + (PEAK - low) * (1 + math.cos(math.pi * pct)) / 2, rel=1e-9)
    assert trace[99][0] == pytest.approx(low, rel=1e-9) and trace[99][1] == pytest.approx(0.95)


def test_onecycle_is_pytorch_onecyclelr_with_its_defaults() -> None:
    opt = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=PEAK)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=PEAK, total_steps=40, pct_start=0.1)
    expected = []
    for _ in range(40):
        expected.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        ref.step()
    assert _trace("onecycle", 40, 0.1) == expected


def test_cosine_and_constant_warm_up_linearly() -> None:
    cosine = [lr for lr, _ in _trace("cosine", 20, 0.2)]  # 4 warm-up steps
    assert cosine[:4] == pytest.approx([PEAK * k / 4 for k in (1, 2, 3, 4)])
    assert cosine[4] == pytest.approx(PEAK)
    assert cosine[12] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert all(a >= b for a, b in zip(cosine[4:], cosine[5:])) and cosine[-1] < PEAK * 0.01
    constant = [lr for lr, _ in _trace("constant", 10, 0.2)]
    assert constant == pytest.approx([PEAK / 2, PEAK] + [PEAK] * 8)


@pytest.mark.parametrize("name", ["onecycle", "cosine", "constant"])
def test_state_is_json_safe_and_resumes_exactly(name: str) -> None:
    opt = _optimizer()
    sched = build_scheduler(opt, name, 30, 0.1)
    for _ in range(7):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    groups = json.loads(json.dumps(opt.state_dict()["param_groups"]))
    fresh_opt = _optimizer()
    fresh = build_scheduler(fresh_opt, name, 30, 0.1)
    for group, saved in zip(fresh_opt.param_groups, groups):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"})
    fresh.load_state_dict(state)
    for _ in range(5):
        opt.step(), fresh_opt.step()
        sched.step(), fresh.step()
        assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_unknown_schedule_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"'cosin'.*did you mean 'cosine'.*valid: constant, cosine, onecycle"):
        build_scheduler(_optimizer(), "cosin", 10)
    with pytest.raises(ConfigError, match="warm-up fraction"):
        build_scheduler(_optimizer(), "onecycle", 10, 1.5)
    with pytest.raises(ConfigError, match="at least one optimizer step"):
        build_scheduler(_optimizer(), "onecycle", 0)


def test_default_param_groups_decay_every_trainable_parameter() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    groups = default_param_groups(model, 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model[1:].parameters()}  # norms and biases too
    opt = build_optimizer(groups, lr=1e-3, weight_decay=0.0)
    assert opt.param_groups[0]["weight_decay"] == 0.1  # the group's own value wins
    with pytest.raises(ConfigError, match="no trainable parameters"):
        default_param_groups(nn.Linear(2, 2).requires_grad_(False), 0.1)


@pytest.mark.parametrize(("kw", "message"), [({"lr": 0.0}, "learning rate"), ({"weight_decay": -1.0}, "weight decay"),
                                             ({"betas": (0.9, 1.0)}, "betas")])
def test_build_optimizer_rejects_bad_values(kw: dict, message: str) -> None:
    args = {"lr": 1e-3, "weight_decay": 0.1} | kw
    with pytest.raises(ConfigError, match=message):
        build_optimizer(default_param_groups(nn.Linear(2, 2), 0.1), **args)


def test_build_optimizer_uses_the_fused_kernel_and_matches_the_per_tensor_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 5))
    twin = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 5))
    twin.load_state_dict(model.state_dict())
    groups = ({"params": (p for p in model.parameters()), "weight_decay": 0.1},)  # a generator is fine
    fused = build_optimizer(groups, lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.param_groups[0]["fused"] is True and len(fused.param_groups[0]["params"]) == 6
    x = torch.randn(8, 16)
    for step in range(10):
        for opt, net in ((fused, model), (loop, twin)):
            opt.param_groups[0]["betas"] = (0.95 - 0.01 * step, 0.999)  # as the one-cycle schedule does
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The state round-trips through a state dict into a fresh optimizer.
    fresh = build_optimizer(default_param_groups(model, 0.1), lr=1e-2, weight_decay=0.1)
    fresh.load_state_dict(fused.state_dict())
    assert float(fresh.state[fresh.param_groups[0]["params"][0]]["step"]) == 10.0


def test_fused_kernel_is_only_asked_for_where_it_exists() -> None:
    from robustft.engine.optim import fused_supported

    assert fused_supported([torch.zeros(2, requires_grad=True)])
    assert not fused_supported([torch.zeros(2, dtype=torch.float64, device="meta")])
    assert not fused_supported([torch.zeros(2), torch.zeros(2, device="meta")])


def test_onecycle_refuses_a_single_warmup_step_and_survives_a_fraction_of_one_step() -> None:
    params = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ConfigError, match="warmup_steps >= 2"):
        build_scheduler(torch.optim.AdamW(params, lr=1.0), "onecycle", 10, 0.0, warmup_steps=1)
    optimizer = torch.optim.AdamW(params, lr=1.0)
    scheduler = build_scheduler(optimizer, "onecycle", 50, 0.02)  # 0.02 * 50 = one step: used to divide by zero
    for _ in range(50):
        optimizer.step()
        scheduler.step()

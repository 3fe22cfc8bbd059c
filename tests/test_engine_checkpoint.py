"""Checkpoints: round trip, atomic writes, pruning, fallback past corrupt ones, safe loading."""

from __future__ import annotations

import ast
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robustft.engine.checkpoint as ckpt_mod
from robustft.engine import (
    check_writable,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    load_module_state,
    save_checkpoint,
)
from robustft.engine.checkpoint import flatten_optimizer_state
from robustft.engine.state import capture_rng_state, decode_tensor, encode_tensor, restore_rng_state, to_jsonable
from robustft.errors import CheckpointError


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _save(run: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, keep: int = 3) -> Path:
    return save_checkpoint(run, step, model.state_dict(), opt.state_dict(), {"epoch": 0, "note": step}, keep_last=keep)


def test_round_trip_restores_model_optimizer_and_state(tmp_path: Path) -> None:
    model, opt = _trained()
    path = _save(tmp_path, 7, model, opt)
    assert path.name == "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000007"
    loaded = load_checkpoint(path)
    assert loaded.step == 7 and loaded.state["note"] == 7
    twin = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    load_module_state(twin, loaded.model)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(loaded.optimizer)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_optimizer_tensors_are_named_by_parameter_index() -> None:
    _, opt = _trained()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step", "state.3.exp_avg"} <= set(tensors)
    json.dumps(meta)  # the rest is plain JSON
    assert meta["param_groups"][0]["params"] == [0, 1, 2, 3]


def test_keeps_the_last_k(tmp_path: Path) -> None:
    model, opt = _trained()
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, model, opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]


def test_failed_write_keeps_the_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _trained()
    good = _save(tmp_path, 1, model, opt, keep=1)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real = ckpt_mod.save_tensors
    calls = []

    def disk_full(path, tensors, metadata=None):  # the second file of the checkpoint fails
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt_mod, "save_tensors", disk_full)
    with pytest.raises(CheckpointError, match=r"No space left.*kept step_00000001"):
        _save(tmp_path, 2, model, opt, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_resaving_a_step_replaces_it_whole(tmp_path: Path) -> None:
    model, opt = _trained()
    _save(tmp_path, 3, model, opt)
    (tmp_path / "checkpoints" / "step_00000003" / "state.json").write_text("{broken")
    _save(tmp_path, 3, model, opt)
    assert load_checkpoint(tmp_path / "checkpoints" / "step_00000003").step == 3


@pytest.mark.parametrize("damage", ["truncate-model", "bad-json", "pickle-optimizer", "wrong-step"])
def test_load_latest_falls_back_past_a_corrupt_newest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    model, opt = _trained()
    _save(tmp_path, 1, model, opt)
    newest = _save(tmp_path, 2, model, opt)
    if damage == "truncate-model":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "bad-json":
        (newest / "state.json").write_text('{"format": "robustft-train-checkpoint", "step": ')
    elif damage == "pickle-optimizer":
        (newest / "optimizer.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle header
    else:
        state = json.loads((newest / "state.json").read_text())
        (newest / "state.json").write_text(json.dumps({**state, "step": 9}))
    with caplog.at_level(logging.WARNING):
        loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.step == 1
    assert "step_00000002" in caplog.text and "falling back" in caplog.text


def test_load_latest_without_or_with_only_bad_checkpoints(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None
    model, opt = _trained()
    only = _save(tmp_path, 1, model, opt)
    (only / "state.json").write_text("[]")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_latest(tmp_path)


def test_check_writable(tmp_path: Path) -> None:
    check_writable(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints").is_dir() and not list((tmp_path / "run" / "checkpoints").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoints to .*file/run/checkpoints"):
        check_writable(tmp_path / "file" / "run")
    with pytest.raises(CheckpointError, match="GiB free but one checkpoint needs"):
        check_writable(tmp_path / "run", need_bytes=2**62)


def test_load_module_state_lists_every_mismatch() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"] = torch.zeros(2, 4)
    state["1.bias"] = state["1.bias"].double()
    del state["1.weight"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_module_state(model, state, source="ckpt")
    message = str(info.value)
    for part in ("missing 1.weight", "unexpected extra", "0.weight: (2, 4)", "1.bias: (3,) torch.float64"):
        assert part in message


def test_tensor_encoding_round_trips_every_dtype() -> None:
    for t in (torch.arange(6, dtype=torch.uint8), torch.randn(2, 3).bfloat16(), torch.tensor(3.5), torch.zeros(0),
              torch.tensor([True, False])):
        back = decode_tensor(json.loads(json.dumps(encode_tensor(t))))
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    with pytest.raises(TypeError, match="cannot store"):
        to_jsonable({"f": print})
    with pytest.raises(CheckpointError, match="malformed"):
        decode_tensor({"__tensor__": "float32", "shape": [3], "base64": "!!"})


def test_rng_state_round_trip_reproduces_draws() -> None:
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    state = json.loads(json.dumps(capture_rng_state()))
    first = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    restore_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_engine_never_unpickles() -> None:
    for path in Path(ckpt_mod.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) not in {("torch", "load"), ("pickle", "load"), ("pickle", "loads")}
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(m.split(".")[0] in ("pickle", "dill", "cloudpickle") for m in modules), path


def test_stale_temporaries_are_removed_and_a_moved_aside_best_is_restored(tmp_path: Path) -> None:
    from robustft.engine.checkpoint import remove_stale_temporaries, save_best

    model, _ = _trained()
    save_best(tmp_path, model.state_dict(), {"step": 1})
    (tmp_path / "checkpoints" / ".tmp-step_00000009-123").mkdir(parents=True)
    # A writer died between "best -> .old-best-77" and ".tmp-best-77 -> best".
    (tmp_path / "best").rename(tmp_path / ".old-best-77")
    (tmp_path / ".tmp-best-77").mkdir()
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoints"]
    assert not list((tmp_path / "checkpoints").iterdir())
    assert json.loads((tmp_path / "best" / "meta.json").read_text())["step"] == 1


def test_refuse_existing_checkpoints_names_the_newest_and_changes_nothing(tmp_path: Path) -> None:
    ckpt_mod.refuse_existing_checkpoints(tmp_path / "new")  # no folder, no checkpoints: fine
    assert not (tmp_path / "new").exists()
    model, opt = _trained()
    for step in (2, 4):
        _save(tmp_path, step, model, opt)
    before = sorted(p.name for p in list_checkpoints(tmp_path))
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(newest step_00000004\); pass --resume"):
        ckpt_mod.refuse_existing_checkpoints(tmp_path)
    assert sorted(p.name for p in list_checkpoints(tmp_path)) == before

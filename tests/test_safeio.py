"""robustft.safeio: atomic writes, safetensors and JSON with clear errors on bad files."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from robustft.errors import CheckpointError
from robustft.safeio import (
    atomic_write_bytes,
    atomic_write_text,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)


def _tensors() -> dict[str, torch.Tensor]:
    base = torch.randn(4, 3)
    return {
        "w": base,
        "tied": base,  # shares memory with "w": safetensors alone would refuse this
        "row": base[1],
        "idx": torch.arange(5),
        "half": torch.randn(2, 2).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
    }


def test_tensors_round_trip_with_metadata(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "sub" / "t.safetensors"
    save_tensors(path, tensors, {"kind": "test", "n": "6"})
    loaded, meta = load_tensors(path)
    assert meta == {"kind": "test", "n": "6"}
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="n"):
        save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(1)}, {"n": 3})  # type: ignore[dict-item]


def test_load_without_metadata_gives_empty_dict(tmp_path: Path) -> None:
    save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(2)})
    _, meta = load_tensors(tmp_path / "t.safetensors")
    assert meta == {}


def _torch_save_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"a": torch.ones(2)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated-half"),
        pytest.param(lambda raw: raw[:6], id="truncated-header"),
        pytest.param(lambda raw: raw[:-4], id="truncated-data"),
        pytest.param(lambda raw: os.urandom(200), id="garbage"),
        pytest.param(lambda raw: pickle.dumps({"a": [1, 2, 3]}), id="pickle"),
        pytest.param(lambda raw: _torch_save_bytes(), id="torch-save"),
        pytest.param(lambda raw: b"", id="empty"),
    ],
)
def test_bad_tensor_files_raise_checkpoint_error(tmp_path: Path, corrupt) -> None:
    good = tmp_path / "good.safetensors"
    save_tensors(good, {"a": torch.randn(16, 16), "b": torch.arange(10)})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_tensors(bad)


def test_missing_tensor_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothere.safetensors"):
        load_tensors(tmp_path / "nothere.safetensors")


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_failed_write_keeps_old_file_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_json_round_trip(tmp_path: Path) -> None:
    obj = {"b": [1, 2.5, None], "a": {"name": "ViT-B-32", "ünïcode": True}}
    write_json(tmp_path / "d" / "x.json", obj)
    assert read_json(tmp_path / "d" / "x.json") == obj


def test_json_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"a": float("nan")})
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("content", [b'{"a": 1', b"\xff\xfe\x00garbage", b""])
def test_bad_json_raises_checkpoint_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="x.json"):
        read_json(path)


def test_missing_json_names_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing.json"):
        read_json(tmp_path / "missing.json")

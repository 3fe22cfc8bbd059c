"""JSON-safe training state: tensors, random-number-generator states, provenance.

A checkpoint's ``state.json`` must hold everything that is not a model or optimizer
tensor, without pickle. Small tensors (generator states, a method's extra state) are
stored as ``{"__tensor__": dtype, "shape": [...], "base64": ...}``; the global random
states of torch, CUDA, NumPy and Python's ``random`` are captured per process so that a
resumed run draws exactly the numbers the uninterrupted run would have drawn. Every
checkpoint also records the versions and git commit it was written by.
"""

from __future__ import annotations

import base64
import math
import platform
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustft.provenance import git_sha
from robustft.errors import CheckpointError

__all__ = [
    "encode_tensor",
    "decode_tensor",
    "to_jsonable",
    "from_jsonable",
    "capture_rng_state",
    "restore_rng_state",
    "provenance",
]

_TAG = "__tensor__"


def encode_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """Encode any tensor (any dtype, any shape, moved to CPU) as a JSON-safe dict."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {
        _TAG: str(flat.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "base64": base64.b64encode(raw).decode("ascii"),
    }


def decode_tensor(obj: Mapping[str, Any]) -> torch.Tensor:
    """Inverse of :func:`encode_tensor`; raises CheckpointError on a malformed entry."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"malformed tensor entry in checkpoint state: {type(obj).__name__}")
    try:
        dtype = getattr(torch, str(obj[_TAG]))
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{obj[_TAG]!r} is not a torch dtype")
        raw = bytearray(base64.b64decode(obj["base64"], validate=True))
        shape = [int(d) for d in obj["shape"]]
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(shape).clone()
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"malformed tensor entry in checkpoint state: {exc}") from None


def to_jsonable(obj: Any) -> Any:
    """Recursively turn tensors, tuples and NumPy scalars into JSON-safe values (NaN/inf -> None).

    Raises:
        TypeError: ``obj`` holds something with no JSON form (a function, a module); a
            programming error in whoever produced the state.
    """
    if isinstance(obj, torch.Tensor):
        return encode_tensor(obj)
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN/inf; a missing metric reads back as None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint's JSON state: {obj!r}")


def from_jsonable(obj: Any) -> Any:
    """Recursively decode the tensors :func:`to_jsonable` encoded (tuples come back as lists)."""
    if isinstance(obj, Mapping):
        if _TAG in obj:
            return decode_tensor(obj)
        return {key: from_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(value) for value in obj]
    return obj


def capture_rng_state() -> dict[str, Any]:
    """This process's global random states (torch CPU, current CUDA device, NumPy, Python), JSON-safe."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": encode_tensor(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = encode_tensor(torch.cuda.get_rng_state())
    return state


def _as_tensor(obj: Any) -> torch.Tensor:
    return obj if isinstance(obj, torch.Tensor) else decode_tensor(obj)


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the global random states from :func:`capture_rng_state`'s output (encoded or decoded)."""
    try:
        torch.set_rng_state(_as_tensor(state["torch"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"malformed random-number state in checkpoint: {exc}") from None
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_as_tensor(state["cuda"]))


def provenance() -> dict[str, Any]:
    """Versions and git SHA recorded in every checkpoint."""
    try:
        from importlib.metadata import version

        robustft_version = version("robustft")
    except Exception:  # noqa: BLE001 - metadata is optional (source checkouts)
        robustft_version = None
    return {
        "versions": {"robustft": robustft_version, "torch": torch.__version__, "python": platform.python_version()},
        "git_sha": git_sha(),
    }

"""The typed config tree of one run, and how it is built.

A run's config is built in three layers: the dataclass defaults below, then a YAML preset
(a name shipped in ``robustft/configs/`` or a path; a preset may name a ``base`` preset it
extends), then command-line overrides such as ``--set optim.lr=1e-5``. Unknown keys and
values of the wrong type or outside their valid range are :class:`ConfigError`\\ s naming
the key and the nearest valid one. The resolved tree is written to the run folder and
embedded in every checkpoint and results row, so a run can be reproduced from it.

Only the composition root (``pipeline.py``) and the CLI see :class:`RunConfig`; library
functions take explicit arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from robustft.errors import ConfigError, choices_hint

__all__ = [
    "ModelConfig",
    "HeadConfig",
    "DataConfig",
    "MethodConfig",
    "OptimConfig",
    "CheckpointConfig",
    "EvalConfig",
    "RunConfig",
    "build_config",
    "config_from_dict",
    "config_to_dict",
    "config_hash",
    "dump_config",
    "list_presets",
    "load_preset",
    "parse_override",
]


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


def _ranged(default: float | None, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"min": lo, "max": hi})


def _area_range(value: list[float]) -> str | None:
    """Why ``value`` is not a crop-area range ``[low, high]`` with 0 < low <= high <= 1 (None: it is)."""
    if len(value) == 2 and 0.0 < value[0] <= value[1] <= 1.0:
        return None
    return f"{value!r} is not an area range; valid: [low, high] with 0 < low <= high <= 1, e.g. [0.9, 1.0]"


@dataclass
class ModelConfig:
    """Which CLIP model to start from."""

    name: str = "ViT-B-32"  # any open_clip architecture, or robustft-tiny / robustft-demo
    pretrained: str = "openai"  # open_clip tag, weights file, "none" (random), or "world" (demo CLIP)
    cache_dir: str | None = None  # open_clip / Hugging Face cache folder (None: their default)


@dataclass
class HeadConfig:
    """The zero-shot head: class names x prompt templates."""

    classnames: str = "auto"  # "auto" (from the data), "imagenet", or a text file, one name per line
    templates: str = "auto"  # "auto" (from the data), "openai_imagenet", "simple" or a text file


@dataclass
class DataConfig:
    """Training data, held-out validation split and evaluation sets."""

    train: str = "imagenet"  # "imagenet", "folder" (ImageFolder at train_dir) or "synthetic"
    root: str = "data"  # data root holding the official releases (see the README's Datasets section)
    train_dir: str | None = None  # ImageFolder of training images when train = folder
    val_dir: str | None = None  # ImageFolder of in-distribution test images (folder data)
    # Training images held out (stratified, seeded) to choose the best epoch; -1: 10,240 for
    # ImageNet (the paper), 5% of the training images otherwise; 0: keep the last epoch.
    holdout: int = _ranged(-1, -1)
    # Test sets evaluated after training. "auto": ImageNet + its five shifts for ImageNet,
    # "id" + every ood_folders entry for folder data, "id" + every shift for synthetic data.
    eval_sets: list[str] = field(default_factory=lambda: ["auto"])
    ood_folders: dict[str, str] = field(default_factory=dict)  # extra shifted test sets: name -> ImageFolder
    paths: dict[str, str] = field(default_factory=dict)  # per-dataset path overrides: name -> folder
    batch_size: int = _ranged(512, 1)  # global training batch, over all processes
    eval_batch_size: int = _ranged(256, 1)  # per process
    workers: int = _ranged(8, 0)  # data-loading worker processes per training process
    train_augment: bool = False  # the paper uses none: resize + center crop for train and eval
    # With train_augment: RandomResizedCrop's area range (FLYP: [0.9, 1.0]) and whether to flip
    # horizontally at random (FLYP: false). Both are ignored without train_augment.
    augment_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0], metadata={"check": _area_range})
    augment_flip: bool = True
    max_bad_fraction: float = _ranged(0.001, 0.0, 1.0)  # unreadable images tolerated before stopping
    limit_train: int = _ranged(0, 0)  # use only the first N training images (0: all); for smoke runs


@dataclass
class MethodConfig:
    """The fine-tuning method and its options (each method reads the ones it uses)."""

    name: str = "ft"  # see `robustft methods`
    task_weight: float = _ranged(1.0, 0.0)  # weight of the cross-entropy on clean images
    distill_weight: float = _ranged(30.0, 0.0)  # weight of the distillation term
    temperature: float = _ranged(10.0, 1e-6)  # KD temperature (kd methods)
    masking: str = ""  # paper notation, e.g. "ObjMaskSingleFill(0.3)"; "": the method's default
    cam: str = _choice("mmcam", "mmcam", "gradcam")
    cam_source: str = _choice("student", "student", "teacher")
    donors: str = _choice("permutation", "permutation", "derangement")
    label_smoothing: float = _ranged(0.0, 0.0, 1.0)
    alphas: list[float] = field(default_factory=lambda: [0.5])  # WiSE-FT mixing weights
    l2sp_weight: float = _ranged(0.01, 0.0)  # L2-SP: weight of the squared distance to the starting weights
    multi_positive: bool = False  # contrastive (FLYP): same-class captions are positives, not negatives
    # WiSE-FT: which fine-tuned weights are interpolated: "last" (the reference's) or "best" (held-out)
    wise_endpoint: str = _choice("last", "last", "best")
    lp_epochs: int = _ranged(1, 0)  # LP-FT: epochs of the linear-probe stage
    lp_lr: float = _ranged(1e-3, 0.0)  # LP and LP-FT's probe stage: learning rate of the probe
    lp_weight_decay: float | None = _ranged(None, 0.0)  # weight decay of the probe; None: optim.weight_decay


@dataclass
class OptimConfig:
    """Optimiser and schedule (the paper's recipe by default)."""

    lr: float = _ranged(3e-5, 0.0)
    weight_decay: float = _ranged(0.1, 0.0)
    epochs: float = _ranged(10.0, 0.0)
    schedule: str = _choice("onecycle", "onecycle", "cosine", "constant")
    warmup: float = _ranged(0.02, 0.0, 1.0)  # fraction of all steps
    # > 0: warm-up steps, replacing the warmup fraction (FLYP: 500); for onecycle they set
    # pct_start = warmup_steps / total steps, for cosine and constant the linear warm-up's length
    warmup_steps: int = _ranged(0, 0)
    clip_grad_norm: float = _ranged(1.0, 0.0)  # 0 disables clipping
    accum_steps: int = _ranged(1, 1)
    precision: str = _choice("fp32", "fp32", "bf16")
    tf32: bool = True  # on CUDA: float32 matmuls and convolutions use TF32 tensor cores (false: full float32)


@dataclass
class CheckpointConfig:
    """How often to save and how many checkpoints to keep."""

    every: int = _ranged(0, 0)  # optimizer steps between checkpoints (0: end of each epoch only)
    keep: int = _ranged(3, 1)


@dataclass
class EvalConfig:
    """Evaluation after training."""

    enabled: bool = True
    top5: bool = True
    ece_bins: int = _ranged(15, 1)  # equal-width confidence bins of the calibration error (CaRot/TRACER: 10)


@dataclass
class RunConfig:
    """Everything that defines one run."""

    name: str = "run"
    seed: int = 0
    device: str = _choice("auto", "auto", "cpu", "cuda")
    dist_timeout_s: float = _ranged(1800.0, 1.0)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------
# dict <-> dataclass with type checks


_INT_LIMIT = 2**63


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `--set method.alphas=0.5` means a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping name -> {_type_name(val_tp)}, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if not -_INT_LIMIT <= value < _INT_LIMIT:  # seeds and counts must fit torch's int64
            raise ConfigError(f"{key}: {_short(value)} is too large; valid: a 64-bit integer")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = float(value) if isinstance(value, float) or abs(value) < _INT_LIMIT else math.inf
        if not math.isfinite(number):  # NaN passes every range check and inf overflows step counts
            raise ConfigError(f"{key}: expected a finite number, got {_short(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported value {value!r}")


def _check_metadata(value: Any, f: dataclasses.Field, key: str) -> None:
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: invalid value {value!r}; {choices_hint(str(value), choices)}")
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{key}: {value!r} is out of range; valid: {bounds}")
    check = f.metadata.get("check")
    problem = check(value) if check is not None else None
    if problem:
        raise ConfigError(f"{key}: {problem}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = [prefix + name for name in fields]
            raise ConfigError(f"unknown config key {prefix + str(key)!r}; {choices_hint(prefix + str(key), full)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.")
        else:
            value = _coerce(data[name], tp, prefix + name)
            if value is not None:
                _check_metadata(value, f, prefix + name)
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from a (possibly partial) nested dict, checking every key."""
    return _build(RunConfig, data, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain nested dicts/lists (JSON- and YAML-safe)."""
    return dataclasses.asdict(cfg)


def config_hash(cfg: RunConfig | dict[str, Any]) -> str:
    """A short, stable hash of the resolved config (12 hex digits)."""
    data = cfg if isinstance(cfg, dict) else config_to_dict(cfg)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------
# presets and overrides


def _preset_dir() -> Any:
    return resources.files("robustft") / "configs"


def list_presets() -> list[str]:
    """Names of the presets shipped with robustft."""
    return sorted(p.name[: -len(".yaml")] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


_MAX_DEPTH = 32  # config trees are 3 levels deep; anything far deeper is a mistake or an attack
_MAX_NODES = 100_000


def _safe_load(text: str, source: str) -> Any:
    """``yaml.safe_load`` that raises only ConfigError (bad syntax, bad tagged values, alias bombs)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as err:
        # PyYAML's constructors raise these for values such as "2020-13-45" or "!!int x".
        raise ConfigError(f"{source}: not valid YAML ({type(err).__name__}: {str(err)[:80]})") from None
    _check_tree(data, source)
    return data


def _check_tree(data: Any, source: str) -> None:
    """Refuse self-referring aliases (``&a [*a]``), absurd nesting and alias-expanded giants."""
    budget = [_MAX_NODES]

    def walk(node: Any, depth: int, path: frozenset[int]) -> None:
        if not isinstance(node, (dict, list)):
            return
        if id(node) in path:
            raise ConfigError(f"{source}: a YAML alias refers to the value that contains it; write the value out")
        budget[0] -= 1
        if depth > _MAX_DEPTH or budget[0] < 0:
            raise ConfigError(f"{source}: nested too deeply or too large for a config (YAML aliases?)")
        for child in node.values() if isinstance(node, dict) else node:
            walk(child, depth + 1, path | {id(node)})

    walk(data, 0, frozenset())


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    data = _safe_load(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config file must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_preset(preset: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a preset (shipped name or YAML path) into a nested dict, following ``base``."""
    path = Path(preset)
    if preset.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {preset!r} does not exist; give an existing YAML file or a preset name "
                              "(`robustft presets` lists them)")
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"config file {preset!r} cannot be read ({err.strerror})") from None
    else:
        names = list_presets()
        if preset not in names:
            raise ConfigError(f"unknown preset {preset!r}; {choices_hint(preset, names)}")
        text = (_preset_dir() / f"{preset}.yaml").read_text()
    if preset in _seen:
        raise ConfigError(f"preset {preset!r} extends itself through 'base': {' -> '.join(_seen + (preset,))}")
    data = _read_yaml(text, preset)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{preset}: 'base' must name a preset, got {base!r}")
    return _merge(load_preset(base, _seen + (preset,)), data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``"optim.lr=1e-5"`` into ``{"optim": {"lr": 1e-05}}`` (value parsed as YAML)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. optim.lr=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or len(parts) > _MAX_DEPTH or any(not p.strip() or p != p.strip() for p in parts):
        raise ConfigError(f"override {_short(text)}: bad key {_short(key)}; expected dotted names like optim.lr")
    try:
        value = _safe_load(raw, f"override {text!r}") if raw.strip() else ""
    except ConfigError:
        value = raw  # unparsable as YAML: keep the text; type checks follow
    if isinstance(value, str):
        value = _yaml_number(value)
    out: dict[str, Any] = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _yaml_number(value: str) -> Any:
    # YAML 1.1 reads "1e-5" as a string (no dot); users mean a number.
    try:
        return float(value) if any(c in value for c in ".eE") and value.strip() else value
    except ValueError:
        return value


def build_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then ``preset`` (name or YAML path), then ``key=value`` overrides."""
    data: dict[str, Any] = load_preset(preset) if preset else {}
    config_from_dict(data)  # report bad preset keys against the preset, before overrides
    for text in overrides:
        data = _merge(data, parse_override(text))
    return config_from_dict(data)

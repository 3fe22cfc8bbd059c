"""Loading CLIP models through open_clip, offline, with actionable errors.

:func:`load_clip` accepts any open_clip architecture name and one of three weight sources:

- ``"none"``: random initialisation (tests, smoke runs, or before loading a checkpoint);
- a path to a weights file: ``.safetensors`` is preferred; an open_clip / HF ``.bin``,
  ``.pt`` or ``.pth`` state dict is read by open_clip with ``torch.load(weights_only=True)``
  (TorchScript archives such as OpenAI's original ``ViT-B-32.pt`` are refused; use the
  ``openai`` tag, which resolves to a plain state dict, or convert the file);
- an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...), read from the
  local Hugging Face or open_clip cache only. Nothing is ever downloaded: missing weights
  fail within seconds with a message naming the file to obtain and where to put it.

Importing this module registers robustft's own tiny architecture, ``robustft-tiny``
(32 px images, 8 px patches, 2 layers of width 32), used by tests and smoke runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

from robustft.errors import ModelError, choices_hint
from robustft.model.transforms import PreprocessCfg

__all__ = ["ClipBundle", "load_clip", "list_architectures", "TINY_ARCH"]

logger = logging.getLogger(__name__)

TINY_ARCH = "robustft-tiny"
_CONFIG_DIR = Path(__file__).parent / "_configs"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HF_WEIGHTS = "open_clip_pytorch_model.bin"
_HF_SAFE_WEIGHTS = "open_clip_model.safetensors"


def _register_configs() -> None:
    # add_model_config rescans every config file; do it once per process.
    if TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


_register_configs()


@dataclass
class ClipBundle:
    """A loaded CLIP model and what is needed to use it.

    Attributes:
        model: The open_clip model (``open_clip.CLIP`` or ``CustomTextCLIP``), on ``device``.
        tokenizer: Maps a list of strings to a LongTensor [N, context_length].
        preprocess: Input size and normalisation the weights expect.
        name: The open_clip architecture name, e.g. "ViT-B-32".
        pretrained: The weight source as given: "none", a tag, or a file path.
    """

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    preprocess: PreprocessCfg
    name: str
    pretrained: str


def list_architectures() -> list[str]:
    """Every architecture name :func:`load_clip` accepts (open_clip's plus robustft-tiny)."""
    return list(open_clip.list_models())


def load_clip(
    name: str,
    pretrained: str = "none",
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    quick_gelu: bool | None = None,
) -> ClipBundle:
    """Build an open_clip model and load its weights without touching the network.

    Args:
        name: open_clip architecture, e.g. "ViT-B-32" ("ViT-B/32" is accepted too).
        pretrained: "none", a path to a weights file, or a pretrained tag of ``name``.
        device: Where to put the model.
        cache_dir: Folder that open_clip would download into (``--cache-dir`` of open_clip);
            searched for tag weights before the default Hugging Face cache.
        quick_gelu: Force the QuickGELU activation on (True) or off (False). None: the
            architecture's default, switched on when a tag was trained with it. OpenAI
            weights given as a file need True (or the "-quickgelu" architecture).

    Returns:
        The model in eval mode, its tokenizer and its :class:`PreprocessCfg`.

    Raises:
        ModelError: Unknown architecture (with close matches), unknown tag (with the valid
            tags), or a weights file that is missing, unreadable or does not fit ``name``.
    """
    arch = _resolve_arch(name)
    source = (pretrained or "none").strip()
    kwargs: dict[str, Any] = {}
    weights_file: str | None = None
    if source.lower() != "none":
        weights_file, kwargs = _resolve_weights(arch, source, cache_dir)
    if quick_gelu is not None:
        kwargs["quick_gelu"] = bool(quick_gelu)  # a model kwarg: overrides config and tag
    model = _create(arch, weights_file, device, cache_dir, kwargs)
    tokenizer = _tokenizer(arch, cache_dir)
    model.eval()
    preprocess = _preprocess_of(model, arch)
    # Random init is how saved classifiers are rebuilt before their tensors load: not news.
    log = logger.debug if weights_file is None else logger.info
    log("loaded %s (weights: %s) on %s", arch, weights_file or source, device)
    return ClipBundle(model=model, tokenizer=tokenizer, preprocess=preprocess, name=arch, pretrained=source)


@functools.lru_cache(maxsize=8)
def _tokenizer(arch: str, cache_dir: str | None) -> Callable[..., torch.Tensor]:
    """The architecture's tokenizer; cached because reading the BPE vocabulary is slow."""
    with _offline(), _quiet_open_clip():
        try:
            return open_clip.get_tokenizer(arch, cache_dir=cache_dir)
        except Exception as exc:  # HF tokenizers need files we may not have offline
            raise ModelError(f"cannot build the tokenizer of {arch!r} offline: {exc}") from exc


def _resolve_arch(name: str) -> str:
    """Map a user-given architecture name to open_clip's spelling or fail with suggestions."""
    cleaned = name.strip().replace("/", "-")
    models = open_clip.list_models()
    if cleaned not in models:
        raise ModelError(f"unknown model architecture {name!r}; {choices_hint(cleaned, models, limit=12)}")
    return cleaned


def _resolve_weights(arch: str, source: str, cache_dir: str | None) -> tuple[str, dict[str, Any]]:
    """Return ``(weights file, extra create_model kwargs)`` for a path or a tag."""
    path = Path(source).expanduser()
    looks_like_path = path.exists() or os.sep in source or source.endswith(_WEIGHT_SUFFIXES)
    if looks_like_path:
        if not path.is_file():
            raise ModelError(f"weights file not found: {path} (pretrained={source!r}); give an existing file")
        if not os.access(path, os.R_OK):
            raise ModelError(f"weights file is not readable: {path}")
        return str(path), {}
    tags = list_pretrained_tags_by_model(arch)
    cfg = get_pretrained_cfg(arch, source)
    if not cfg:
        if not tags:
            raise ModelError(
                f"{arch!r} has no open_clip pretrained tags (got {source!r}); "
                "use 'none' or a path to a weights file"
            )
        raise ModelError(
            f"unknown pretrained tag {source!r} for {arch!r}; {choices_hint(source, tags)}; "
            "or give a path to a weights file"
        )
    weights = _find_cached_tag_file(arch, source, cfg, cache_dir)
    preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    # A tag trained with QuickGELU must run with it, or its features are silently wrong.
    return weights, {"force_quick_gelu": bool(cfg.get("quick_gelu", False)), "force_preprocess_cfg": preprocess}


def _find_cached_tag_file(arch: str, tag: str, cfg: dict[str, Any], cache_dir: str | None) -> str:
    """Locate a tag's weights in the local caches; never download."""
    if cfg.get("file"):
        return str(cfg["file"])
    wanted: list[str] = []
    hub = cfg.get("hf_hub", "")
    if hub:
        # open_clip's convention: "org/repo/" means the default file, "org/repo/file" a named one.
        repo, filename = os.path.split(hub)
        filename = filename or _HF_WEIGHTS
        names = [_HF_SAFE_WEIGHTS] if filename == _HF_WEIGHTS else []
        if filename.endswith((".bin", ".pth")):
            names.append(filename[:-4] + ".safetensors")
        names.append(filename)
        for fname in dict.fromkeys(names):
            found = _hf_cached(repo, fname, cache_dir)
            if found:
                return found
        files = " or ".join(repr(n) for n in dict.fromkeys(names))
        wanted.append(f"Hugging Face repo {repo!r}, file {files} (e.g. `hf download {repo} {names[0]}`)")
    url = cfg.get("url", "")
    # Only tags without a Hugging Face copy fall back to open_clip's URL cache: the OpenAI
    # URLs serve TorchScript archives, which cannot be read without unpickling code.
    if url and not hub:
        folder = Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()
        target = folder / os.path.basename(url)
        if target.is_file():
            return str(target)
        wanted.append(f"{url} saved as {target}")
    raise ModelError(
        f"weights for {arch!r} pretrained={tag!r} are not in the local cache and robustft never downloads. "
        f"Obtain one of: {'; or '.join(wanted)}. Hugging Face cache: {_hf_cache_root(cache_dir)}. "
        "Alternatively pass the file itself: --pretrained /path/to/file.safetensors"
    )


def _hf_cache_root(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def _hf_cached(repo: str, filename: str, cache_dir: str | None) -> str | None:
    """Path of ``repo/filename`` in the Hugging Face cache, or None; no network access."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id=repo, filename=filename, cache_dir=cache_dir)
    return found if isinstance(found, str) and os.path.isfile(found) else None


def _create(
    arch: str, weights_file: str | None, device: str | torch.device, cache_dir: str | None, kwargs: dict[str, Any]
) -> torch.nn.Module:
    """Instantiate ``arch`` and load ``weights_file`` (None: random init)."""
    try:
        with _offline(), _quiet_open_clip():
            return open_clip.create_model(
                arch,
                pretrained=weights_file,
                device=device,
                cache_dir=cache_dir,
                pretrained_image=False,
                pretrained_text=False,
                weights_only=True,
                **kwargs,
            )
    except ModelError:
        raise
    except Exception as exc:
        if weights_file is None:
            raise ModelError(f"cannot build architecture {arch!r}: {exc}") from exc
        hint = _weights_hint(weights_file, exc)
        raise ModelError(f"cannot load weights {weights_file} into {arch!r}: {hint}") from exc


def _weights_hint(weights_file: str, exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "TorchScript" in str(exc):
        return (
            "TorchScript archives (OpenAI's original .pt files) cannot be read safely; use the "
            "matching open_clip tag (e.g. --pretrained openai) or convert the file to safetensors"
        )
    if "Weights only load failed" in str(exc) or type(exc).__name__ == "UnpicklingError":
        return (
            "the file holds pickled Python objects besides tensors (a full training checkpoint?), and "
            "robustft never unpickles arbitrary objects; save only the model's state_dict (torch.save or "
            "safetensors) and pass that file"
        )
    if "size mismatch" in str(exc) or "Missing key" in str(exc) or "Unexpected key" in str(exc):
        return f"the file does not fit this architecture (is it for another model?): {text}"
    return text


def _preprocess_of(model: torch.nn.Module, arch: str) -> PreprocessCfg:
    """Read the final preprocessing config that open_clip attached to ``model``."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ModelError(f"{arch!r} expects non-square {tuple(size)} inputs; robustft supports square inputs only")
        size = size[0]
    return PreprocessCfg(
        image_size=int(size),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
    )


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Make huggingface_hub fail fast instead of reaching for the network."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    try:
        from huggingface_hub import constants
    except ImportError:
        pass
    # huggingface_hub reads the variable once at import; its module constant is what counts.
    saved_const = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_const
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # open_clip warns on the root logger for every random init, which is our intent.
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    root = logging.getLogger()
    flt = _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)

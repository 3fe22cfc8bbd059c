"""The demo's synthetic distribution-shift world.

Each image shows one labelled object whose COLOUR is the class, drawn over a bold greyscale
background texture. Everything else is a nuisance factor: the background texture, its grey
levels (contrast) and tint, and the object's shape, position, size, opacity and rendering
style (filled or outline sketch). Pretraining pairs are uniform over all factor
combinations, so a model pretrained on them has no reason to tie a colour to a background.
The fine-tuning set plants a spurious correlation instead: class k sits on "its own"
texture k with probability ``rho``, and its objects are small and faint, so the texture is
the easier cue. The shifted test sets then break that shortcut in the ways the ImageNet
shifts do (see ``SPLIT_DOCS``).

Everything is vectorised numpy and deterministic from a seed (no global random state).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from robustft.data.synthetic_render import PLAIN, SHAPES, TEXTURES, ObjectLayer, SceneFactors, render
from robustft.errors import ConfigError, DataError, choices_hint

logger = logging.getLogger(__name__)

__all__ = [
    "WORLD_VERSION", "PRETRAINING_FIELDS", "PALETTE", "SHAPES", "TEXTURES", "SPLITS", "SHIFTS", "SPLIT_DOCS", "TEMPLATES",
    "WorldConfig", "ObjectLayer", "SceneFactors", "SplitData", "WorldPaths",
    "render", "make_pretraining_pairs", "sample_split", "make_split", "write_world", "default_cache_dir",
]

WORLD_VERSION = 1
"""Bumped whenever the pixels or captions generated for a given config change (part of every cache key)."""

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.15), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10), "purple": (0.60, 0.15, 0.85), "orange": (1.00, 0.55, 0.00),
    "cyan": (0.00, 0.80, 0.85), "pink": (1.00, 0.45, 0.75),
}
"""Object colours (RGB in [0, 1]) that can serve as classes."""


SPLITS = ("train", "id", "shuffled", "swapped", "sketch", "novel", "clutter")
SHIFTS = SPLITS[2:]
SPLIT_DOCS: dict[str, str] = {
    "train": "fine-tuning set: small faint objects; class k on its own texture k with probability rho",
    "id": "ID test set: same distribution as train",
    "shuffled": "~ImageNet-V2: textures uniform over the class textures, independent of the class",
    "swapped": "~ImageNet-A: always the texture of ANOTHER class (adversarial to the shortcut)",
    "sketch": "~ImageNet-Sketch: the object drawn as a coloured outline, textures shuffled",
    "novel": "~ImageNet-R: textures that no class owns (never seen in fine-tuning)",
    "clutter": "~ObjectNet: shuffled textures plus 2-4 achromatic distractor objects",
}
TEMPLATES = (
    "a {} object.", "a photo of a {} object.", "a {} shape.", "a drawing of a {} shape.",
    "a small {} object.", "something {}.",
)
"""Zero-shot prompt templates; each holds exactly one ``{}`` for the class name."""

Range = tuple[float, float]

PRETRAINING_FIELDS = (
    "image_size", "classes", "textures", "shapes", "pretrain_radius", "pretrain_opacity", "pretrain_sketch_frac",
    "pretrain_plain_frac", "colour_jitter", "tint_max", "period", "line_width",
)
"""The ``WorldConfig`` fields that decide the pretraining pairs (a pretrained model's cache key)."""


@dataclass(frozen=True)
class WorldConfig:
    """Every knob of the world. Pixel-identical output for equal configs and ``WORLD_VERSION``.

    Attributes:
        image_size: Height and width of every image, in pixels.
        classes: Class names, keys of ``PALETTE``; the class is the object's colour.
        textures: Background textures, names from ``TEXTURES``. The first ``len(classes)``
            are the classes' own textures (in class order); the rest never appear in the
            fine-tuning set and make up the ``novel`` shift.
        shapes: Object shapes (names from ``SHAPES``), a nuisance factor.
        rho: Probability that a fine-tuning image of class k has texture k.
        pretrain_radius, finetune_radius: Object radius ranges in pixels.
        pretrain_opacity, finetune_opacity: Object opacity ranges in [0, 1].
        pretrain_sketch_frac: Fraction of pretraining objects drawn as outlines.
        pretrain_plain_frac: Fraction of pretraining backgrounds without texture.
        colour_jitter: Std of the per-channel jitter added to each object's colour.
        tint_max: Largest background tint (0 = pure grey backgrounds).
        period: Texture period range in pixels.
        line_width: Outline stroke width range in pixels.
        distractors: Inclusive range of distractor objects per ``clutter`` image.
        n_train: Size of the ``train`` split; n_test: size of every test split.
        seed: Seed of every split written by ``write_world``.
    """

    image_size: int = 64
    classes: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    textures: tuple[str, ...] = TEXTURES
    shapes: tuple[str, ...] = SHAPES
    rho: float = 0.98
    pretrain_radius: Range = (4.0, 24.0)
    pretrain_opacity: Range = (0.45, 1.0)
    finetune_radius: Range = (3.5, 5.0)
    finetune_opacity: Range = (0.25, 0.4)
    pretrain_sketch_frac: float = 0.1
    pretrain_plain_frac: float = 0.1
    colour_jitter: float = 0.04
    tint_max: float = 0.08
    period: Range = (6.0, 12.0)
    line_width: Range = (1.2, 2.0)
    distractors: tuple[int, int] = (2, 4)
    n_train: int = 2000
    n_test: int = 600
    seed: int = 0

    def __post_init__(self) -> None:
        for name, group, known in (("class", self.classes, PALETTE), ("texture", self.textures, TEXTURES),
                                   ("shape", self.shapes, SHAPES)):
            for item in group:
                if item not in known:
                    raise ConfigError(f"unknown {name} {item!r}; {choices_hint(item, known)}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes must be >= 2 distinct colours, got {self.classes}")
        if len(self.textures) <= len(self.classes):
            raise ConfigError(f"need more textures ({len(self.textures)}) than classes ({len(self.classes)}): "
                              "the extra ones form the 'novel' shift")
        if not 0.0 <= self.rho <= 1.0:
            raise ConfigError(f"rho must lie in [0, 1], got {self.rho}")
        if self.image_size < 16 or min(self.n_train, self.n_test) < 1:
            raise ConfigError("image_size must be >= 16 and split sizes >= 1")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the config."""
        return dataclasses.asdict(self)

    def key(self, fields: tuple[str, ...] | None = None) -> str:
        """Short hash of ``WORLD_VERSION`` and the config (or only ``fields`` of it): a cache folder name."""
        values = self.to_dict() if fields is None else {k: getattr(self, k) for k in fields}
        blob = json.dumps({"version": WORLD_VERSION, **values}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SplitData:
    """A generated split: images uint8 [N, H, W, 3], labels int64 [N] and their factors."""

    images: np.ndarray
    labels: np.ndarray
    factors: SceneFactors


@dataclass(frozen=True)
class WorldPaths:
    """Where ``write_world`` put things. ``splits[name]`` is an ImageFolder root."""

    root: Path
    splits: dict[str, Path] = field(default_factory=dict)
    classnames: Path = Path()
    templates: Path = Path()
    world_json: Path = Path()


# --------------------------------------------------------------------------- sampling

def _uniform(rng: np.random.Generator, rng_range: Range, n: int) -> np.ndarray:
    return rng.uniform(rng_range[0], rng_range[1], n).astype(np.float32)


def _background(cfg: WorldConfig, rng: np.random.Generator, texture: np.ndarray) -> SceneFactors:
    n = len(texture)
    lo, hi = rng.uniform(0.0, 0.35, n), rng.uniform(0.6, 1.0, n)
    swap = rng.random(n) < 0.5  # dark-on-light or light-on-dark
    levels = np.stack([np.where(swap, hi, lo), np.where(swap, lo, hi)], 1)
    plain = texture == PLAIN
    levels[plain] = rng.uniform(0.15, 0.9, (int(plain.sum()), 1))  # plain: one grey level
    tint = 1 - rng.uniform(0, cfg.tint_max, (n, 3))
    tint /= tint.max(1, keepdims=True)
    return SceneFactors(texture=texture.astype(np.int64), period=_uniform(rng, cfg.period, n),
                        phase=rng.random((n, 2)).astype(np.float32), levels=levels.astype(np.float32),
                        tint=tint.astype(np.float32), noise_seed=rng.integers(0, 2**31, n, dtype=np.int64).astype(np.uint32))


def _object(cfg: WorldConfig, rng: np.random.Generator, rgb: np.ndarray, radius: Range, opacity: Range,
            outline: np.ndarray) -> ObjectLayer:
    n, s = len(rgb), cfg.image_size
    shape_ids = np.array([SHAPES.index(name) for name in cfg.shapes])
    r = _uniform(rng, radius, n)
    margin = np.minimum(r, s / 2 - 1)  # keep the centre far enough inside for the object to show
    cx, cy = (margin + rng.random((2, n)) * (s - 2 * margin)).astype(np.float32)
    return ObjectLayer(shape=rng.choice(shape_ids, n), cx=cx, cy=cy, radius=r, rgb=rgb.astype(np.float32),
                       opacity=_uniform(rng, opacity, n), outline=outline,
                       line_width=_uniform(rng, cfg.line_width, n))


def _class_rgb(cfg: WorldConfig, rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    base = np.array([PALETTE[c] for c in cfg.classes], np.float32)[colour]
    return np.clip(base + rng.normal(0, cfg.colour_jitter, base.shape), 0, 1)


def _texture_ids(cfg: WorldConfig, names: tuple[str, ...]) -> np.ndarray:
    return np.array([TEXTURES.index(t) for t in names])


def make_pretraining_pairs(cfg: WorldConfig, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Image-caption pairs uniform over colour x shape x texture (plus plain backgrounds and sketches).

    Returns:
        images uint8 [N, H, W, 3] and N captions such as "a red star on a dotted background"
        or "a sketch of a red star on a plain background"; each names the class colour.
    """
    rng = np.random.default_rng([seed, 1])
    colour = rng.integers(0, len(cfg.classes), n)
    texture = rng.choice(_texture_ids(cfg, cfg.textures), n)
    texture[rng.random(n) < cfg.pretrain_plain_frac] = PLAIN
    outline = rng.random(n) < cfg.pretrain_sketch_frac
    bg = _background(cfg, rng, texture)
    obj = _object(cfg, rng, _class_rgb(cfg, rng, colour), cfg.pretrain_radius, cfg.pretrain_opacity, outline)
    factors = dataclasses.replace(bg, layers=(obj,))
    # Always the article "a" (also before "orange"): no word but the colour name tells the class.
    captions = [("a sketch of " if o else "") + f"a {cfg.classes[c]} {SHAPES[s]} on a "
                f"{'plain' if t == PLAIN else TEXTURES[t]} background"
                for c, s, t, o in zip(colour, obj.shape, texture, outline)]
    return render(factors, cfg.image_size), captions


def _split_textures(cfg: WorldConfig, split: str, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, c = len(labels), len(cfg.classes)
    own = _texture_ids(cfg, cfg.textures[:c])
    if split in ("train", "id"):
        other = (labels + rng.integers(1, c, n)) % c
        return own[np.where(rng.random(n) < cfg.rho, labels, other)]
    if split == "swapped":
        return own[(labels + rng.integers(1, c, n)) % c]
    if split == "novel":
        return rng.choice(_texture_ids(cfg, cfg.textures[c:]), n)
    return own[rng.integers(0, c, n)]  # shuffled, sketch, clutter


def _distractors(cfg: WorldConfig, rng: np.random.Generator, n: int) -> list[ObjectLayer]:
    lo, hi = cfg.distractors
    count = rng.integers(lo, hi + 1, n)
    layers = []
    for j in range(hi):
        grey = np.repeat(rng.random((n, 1)), 3, 1)  # achromatic, so the class stays unambiguous
        layer = _object(cfg, rng, grey, (cfg.finetune_radius[0], 2 * cfg.finetune_radius[1]), (0.5, 1.0),
                        np.zeros(n, bool))
        layers.append(dataclasses.replace(layer, shape=np.where(j < count, layer.shape, -1)))
    return layers


def sample_split(cfg: WorldConfig, split: str, n: int | None = None,
                 seed: int | None = None) -> tuple[np.ndarray, SceneFactors]:
    """Draw the labels and factors of a split without rendering (see :func:`make_split`).

    Returns:
        Balanced labels int64 [N] (indices into ``cfg.classes``) and the scene factors.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; {choices_hint(split, SPLITS)}")
    n = (cfg.n_train if split == "train" else cfg.n_test) if n is None else n
    # The split name is part of the seed, so every split draws its own images.
    rng = np.random.default_rng([cfg.seed if seed is None else seed, zlib.crc32(split.encode()), 2])
    labels = rng.permutation(np.arange(n) % len(cfg.classes)).astype(np.int64)
    bg = _background(cfg, rng, _split_textures(cfg, split, labels, rng))
    layers = _distractors(cfg, rng, n) if split == "clutter" else []
    outline = np.full(n, split == "sketch")
    layers.append(_object(cfg, rng, _class_rgb(cfg, rng, labels), cfg.finetune_radius, cfg.finetune_opacity, outline))
    return labels, dataclasses.replace(bg, layers=tuple(layers))


def make_split(cfg: WorldConfig, split: str, n: int | None = None, seed: int | None = None) -> SplitData:
    """Generate one fine-tuning or test split.

    Args:
        cfg: The world.
        split: One of ``SPLITS`` (see ``SPLIT_DOCS``).
        n: Number of images; defaults to ``cfg.n_train`` for train, else ``cfg.n_test``.
        seed: Defaults to ``cfg.seed``; combined with the split name, so splits differ.

    Returns:
        Images uint8 [N, H, W, 3], balanced labels int64 [N] (indices into ``cfg.classes``)
        and the factors they were drawn from.
    """
    labels, factors = sample_split(cfg, split, n, seed)
    return SplitData(images=render(factors, cfg.image_size), labels=labels, factors=factors)


# --------------------------------------------------------------------------- on disk

def default_cache_dir() -> Path:
    """``$ROBUSTFT_CACHE`` if set, else ``~/.cache/robustft``."""
    return Path(os.environ.get("ROBUSTFT_CACHE") or Path.home() / ".cache" / "robustft")


def _world_meta(cfg: WorldConfig) -> dict:
    return {"version": WORLD_VERSION, "key": cfg.key(), "config": cfg.to_dict(), "splits": SPLIT_DOCS,
            "classnames": sorted(cfg.classes)}


def write_world(cfg: WorldConfig, out_dir: str | Path | None = None) -> WorldPaths:
    """Write every split as an ImageFolder tree ``out_dir/<split>/<classname>/<i>.png``.

    Also writes ``classnames.txt``, ``templates.txt`` and ``world.json``. Skips the work
    when ``out_dir`` already holds this config and ``WORLD_VERSION``. The world is built in
    a temporary sibling folder and renamed into place, so a reader (or a concurrent writer)
    never sees half a world.

    Args:
        cfg: The world.
        out_dir: Target folder; defaults to ``default_cache_dir()/worlds/<cfg.key()>``.

    Raises:
        DataError: ``out_dir`` holds files but no ``world.json`` (it is not a world folder).
    """
    root = Path(out_dir) if out_dir is not None else default_cache_dir() / "worlds" / cfg.key()
    paths = WorldPaths(root=root, splits={s: root / s for s in SPLITS}, classnames=root / "classnames.txt",
                       templates=root / "templates.txt", world_json=root / "world.json")
    meta = json.loads(json.dumps(_world_meta(cfg)))  # as it reads back from disk (tuples become lists)
    if _holds(paths.world_json, meta):
        logger.info("world %s already at %s", cfg.key(), root)
        return paths
    if root.is_dir() and any(root.iterdir()) and not paths.world_json.is_file():
        raise DataError(f"{root} is not empty and holds no world.json; choose an empty or new folder")
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for split in SPLITS:
        data = make_split(cfg, split)
        for c in cfg.classes:
            (tmp / split / c).mkdir(parents=True)
        for i, (img, y) in enumerate(zip(data.images, data.labels)):
            Image.fromarray(img).save(tmp / split / cfg.classes[y] / f"{i:05d}.png", compress_level=1)
    # In label order: training and evaluation number the classes by their sorted folder names.
    (tmp / "classnames.txt").write_text("\n".join(sorted(cfg.classes)) + "\n")
    (tmp / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (tmp / "world.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if root.is_dir():  # an older world (checked above) or an empty folder: replace it
        shutil.rmtree(root)
    try:
        tmp.rename(root)
    except OSError:
        if not _holds(paths.world_json, meta):  # not another process finishing the same world first
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote world %s to %s", cfg.key(), root)
    return paths


def _holds(world_json: Path, meta: dict) -> bool:
    try:
        return json.loads(world_json.read_text()) == meta
    except (OSError, ValueError):
        return False

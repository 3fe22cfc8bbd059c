"""Rendering of the synthetic world: factor arrays in, uint8 images out (vectorised numpy).

:func:`render` draws N images from their :class:`SceneFactors`: a greyscale background
texture with grey levels and tint, then each :class:`ObjectLayer` (a filled or outlined
shape, alpha-blended). Sampling the factors and writing splits live in
:mod:`robustft.data.synthetic`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

__all__ = ["SHAPES", "TEXTURES", "PLAIN", "ObjectLayer", "SceneFactors", "render"]

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon", "ellipse", "crescent")
TEXTURES = ("striped", "checkered", "dotted", "grid", "wavy", "zigzag", "diagonal", "ringed", "speckled", "brick")
PLAIN = -1
"""Texture index of a plain (untextured) background."""

@dataclass(frozen=True)
class ObjectLayer:
    """One object per image, as arrays over the batch of N images.

    Attributes:
        shape: int [N], index into ``SHAPES``; -1 = no object in this image.
        cx, cy: float [N], centre in pixels. radius: float [N], pixels.
        rgb: float [N, 3] in [0, 1]. opacity: float [N] in [0, 1].
        outline: bool [N], True draws only the outline. line_width: float [N], pixels.
    """

    shape: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    rgb: np.ndarray
    opacity: np.ndarray
    outline: np.ndarray
    line_width: np.ndarray


@dataclass(frozen=True)
class SceneFactors:
    """Everything ``render`` needs for N images.

    Attributes:
        texture: int [N], index into ``TEXTURES``, or ``PLAIN`` (-1).
        period: float [N], texture period in pixels. phase: float [N, 2] in [0, 1).
        levels: float [N, 2], the texture's two grey levels in [0, 1] (their gap = contrast).
        tint: float [N, 3], multiplies the grey background (1 = no tint).
        noise_seed: uint32 [N], per-image seed of the ``speckled`` texture.
        layers: Objects painted in order; the labelled object is the last one.
    """

    texture: np.ndarray
    period: np.ndarray
    phase: np.ndarray
    levels: np.ndarray
    tint: np.ndarray
    noise_seed: np.ndarray
    layers: tuple[ObjectLayer, ...] = ()


# --------------------------------------------------------------------------- rendering

def _wave(t: np.ndarray) -> np.ndarray:
    """Bold square-ish wave in [0, 1] with ~1 px soft edges; ``t`` in cycles."""
    return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * t), 0.0, 1.0)


def _speckle(x: np.ndarray, y: np.ndarray, p: np.ndarray, seed: np.ndarray) -> np.ndarray:
    # Integer hash of the cell index: exact on every platform, unlike a float sin-hash.
    cell = np.maximum(p / 2, 2.0)
    ix = np.floor(x / cell).astype(np.int64) & 0xFFFF
    iy = np.floor(y / cell).astype(np.int64) & 0xFFFF
    h = (ix * 73856093) ^ (iy * 19349663) ^ (seed.astype(np.int64) * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h >> 16) & 1).astype(np.float32)


def _texture(k: int, x: np.ndarray, y: np.ndarray, p: np.ndarray, ph: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Pattern in [0, 1] of texture ``k``; x, y [1, H, W] pixels, per-image params [n, 1, 1]."""
    a, b = ph[..., 0], ph[..., 1]
    fx, fy = x / p + a, y / p + b
    name = TEXTURES[k]
    if name == "striped":
        return _wave(fy)
    if name == "checkered":
        return np.clip(0.5 + 2 * np.sin(2 * np.pi * fx) * np.sin(2 * np.pi * fy), 0, 1)
    if name in ("dotted", "grid"):
        dx, dy = (fx % 1 - 0.5) * p, (fy % 1 - 0.5) * p
        if name == "dotted":
            return np.clip(0.28 * p - np.sqrt(dx**2 + dy**2) + 0.5, 0, 1)
        return np.clip(1.5 - np.minimum(np.abs(dx), np.abs(dy)), 0, 1)
    if name == "wavy":
        return _wave(fy + 0.25 * np.sin(2 * np.pi * fx))
    if name == "zigzag":
        return _wave(fy + 0.6 * np.abs(fx % 1 - 0.5))
    if name == "diagonal":
        return _wave((x + y) / (p * 1.41) + a)
    if name == "ringed":
        cx, cy = a * x.shape[-1], b * x.shape[-2]
        return _wave(np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / p)
    if name == "speckled":
        return _speckle(x, y, p, seed)
    row = np.floor(fy * 2)  # brick: mortar lines between rows, joints offset every other row
    joint = np.abs((fx + 0.5 * (row % 2)) % 1 - 0.5) * p
    return np.clip(1.5 - np.minimum(np.abs((fy * 2) % 1 - 0.5) * p / 2, joint), 0, 1)


def _sdf(k: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (inside > 0) of shape ``k`` in units of the radius."""
    name, d = SHAPES[k], np.sqrt(u**2 + v**2)
    au, av = np.abs(u), np.abs(v)
    if name == "circle":
        return 1 - d
    if name == "square":
        return 0.85 - np.maximum(au, av)
    if name == "triangle":
        return np.minimum(0.55 - v, 0.55 - (0.866 * au - 0.5 * v))
    if name == "diamond":
        return (1.15 - au - av) * 0.707
    if name == "cross":
        return np.maximum(np.minimum(0.38 - au, 1 - av), np.minimum(0.38 - av, 1 - au))
    if name == "ring":
        return 0.3 - np.abs(d - 0.7)
    if name == "star":
        return (0.6 + 0.4 * np.cos(5 * np.arctan2(u, -v)) - d) * 0.6
    if name == "hexagon":
        return 0.9 - np.maximum(av, 0.866 * au + 0.5 * av)
    if name == "ellipse":
        return (1 - np.sqrt(u**2 + (v / 0.55) ** 2)) * 0.55
    return np.minimum(1 - d, np.sqrt((u - 0.5) ** 2 + (v + 0.1) ** 2) - 0.75)  # crescent


def _paint(img: np.ndarray, layer: ObjectLayer) -> None:
    """Alpha-composite one object layer onto ``img`` float [N, H, W, 3] in [0, 255] (+0.5), in place."""
    n, s = img.shape[:2]
    # Work in a window around each object: small objects then cost a small fraction of the image.
    w = int(np.ceil(2 * (1.2 * layer.radius.max(initial=0) + layer.line_width.max(initial=0)) + 2))
    w = s if w > s // 2 else w  # large objects: the whole image, with plain slicing
    ox = np.clip(np.floor(layer.cx).astype(np.int64) - w // 2, 0, s - w)
    oy = np.clip(np.floor(layer.cy).astype(np.int64) - w // 2, 0, s - w)
    steps = np.arange(w)
    x = (ox[:, None, None] + steps[None, None, :]).astype(np.float32) + np.float32(0.5)  # [n, 1, w]
    y = (oy[:, None, None] + steps[None, :, None]).astype(np.float32) + np.float32(0.5)  # [n, w, 1]
    alpha = np.zeros((n, w, w), np.float32)
    for k in np.unique(layer.shape[layer.shape >= 0]):
        idx = np.nonzero(layer.shape == k)[0]
        r = layer.radius[idx, None, None]
        dist = _sdf(int(k), (x[idx] - layer.cx[idx, None, None]) / r, (y[idx] - layer.cy[idx, None, None]) / r) * r
        cover = np.clip(dist + 0.5, 0, 1)  # ~1 px antialiased edge
        half = layer.line_width[idx, None, None] / 2
        alpha[idx] = np.where(layer.outline[idx, None, None], np.clip(half + 0.5 - np.abs(dist), 0, 1), cover)
    alpha = (alpha * layer.opacity[:, None, None])[..., None]
    if w == s:
        img *= 1 - alpha
        img += layer.rgb[:, None, None, :] * (alpha * 255)
        return
    rows = (oy[:, None] + steps[None, :])[:, :, None]  # [n, w, 1]
    cols = (ox[:, None] + steps[None, :])[:, None, :]  # [n, 1, w]
    batch = np.arange(n)[:, None, None]
    img[batch, rows, cols] = img[batch, rows, cols] * (1 - alpha) + layer.rgb[:, None, None, :] * (alpha * 255)


def _take(factors: SceneFactors, sl: slice) -> SceneFactors:
    layers = tuple(ObjectLayer(**{f.name: getattr(layer, f.name)[sl] for f in dataclasses.fields(ObjectLayer)})
                   for layer in factors.layers)
    fields = {f.name: getattr(factors, f.name)[sl] for f in dataclasses.fields(SceneFactors) if f.name != "layers"}
    return SceneFactors(**fields, layers=layers)


def _render_chunk(factors: SceneFactors, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    n, s = len(factors.texture), x.shape[-1]
    pattern = np.ones((n, s, s), np.float32)
    for k in np.unique(factors.texture[factors.texture >= 0]):
        idx = np.nonzero(factors.texture == k)[0]
        pattern[idx] = _texture(int(k), x, y, factors.period[idx, None, None],
                                factors.phase[idx, None, None, :], factors.noise_seed[idx, None, None])
    # Work in 0..255 units so that the uint8 conversion at the end is one clip and one cast.
    lo, hi = factors.levels[:, 0, None], factors.levels[:, 1, None]
    scale, offset = (hi - lo) * factors.tint * 255, lo * factors.tint * 255 + 0.5
    img = pattern[..., None] * scale[:, None, None, :] + offset[:, None, None, :]
    for layer in factors.layers:
        _paint(img, layer)
    return np.clip(img, 0, 255).astype(np.uint8)


def render(factors: SceneFactors, image_size: int) -> np.ndarray:
    """Draw N images from their factors.

    Args:
        factors: Per-image factors (arrays over N).
        image_size: Height and width in pixels.

    Returns:
        uint8 [N, H, W, 3] RGB images.
    """
    n = len(factors.texture)
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + np.float32(0.5)
    out = np.empty((n, image_size, image_size, 3), np.uint8)
    chunk = max(1, 2**17 // image_size**2)  # small chunks keep the float arrays in cache
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        out[sl] = _render_chunk(_take(factors, sl), xs[None], ys[None])
    return out

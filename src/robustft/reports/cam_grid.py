"""A PNG grid of CAMs and counterfactual images: image | CAM overlay | masked patches | counterfactual."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_cam_grid"]


def _hwc(image: np.ndarray) -> np.ndarray:
    return np.clip(np.transpose(image, (1, 2, 0)), 0.0, 1.0)


def _upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    gh, gw = grid.shape
    return np.kron(grid, np.ones((size[0] // gh, size[1] // gw)))


def plot_cam_grid(arrays: Mapping[str, np.ndarray], path: str | Path, max_rows: int = 8) -> Path:
    """Draw up to ``max_rows`` images from a ``robustft cam`` export (see pipeline/cam.py).

    Columns: the image with its class; the normalised CAM over it; the masked patches
    (dimmed elsewhere); the counterfactual image the distillation sees.
    """
    images, cams, masks = arrays["images"], arrays["cam"], arrays["mask"]
    cf, labels, names = arrays["counterfactual"], arrays["labels"], arrays["classnames"]
    rows = min(max_rows, len(images))
    fig = Figure(figsize=(8.0, 2.1 * rows + 0.6), dpi=100)
    axes = fig.subplots(rows, 4, squeeze=False)
    titles = ("image", f"CAM ({arrays['cam_kind']})", f"masked ({float(masks.mean()):.0%})", "counterfactual")
    for r in range(rows):
        img = _hwc(images[r])
        size = img.shape[:2]
        heat = _upsample(cams[r], size)
        mask = _upsample(masks[r].astype(float), size)[..., None]
        panels = (img, None, img * (0.25 + 0.75 * mask), _hwc(cf[r]))
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(img if c == 1 else panels[c], interpolation="nearest")
            if c == 1:
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="nearest")
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        axes[r][0].set_ylabel(str(names[int(labels[r])]), fontsize=9)
    fig.suptitle(f"Class activation maps and counterfactual images: {arrays['masking']}", fontsize=11)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out

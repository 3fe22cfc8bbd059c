"""Regenerate the ImageNet class tables shipped in ``src/robustft/data/_info/``.

Run once by a maintainer (``python tools/make_info_files.py``) and commit the outputs; the
package reads the ``.txt`` files at run time and never imports timm or this script.

Sources (factual lists, not code):
- WNIDs in the standard sorted order, the ImageNet-R / ImageNet-A 200-class subsets and the
  WordNet lemmas: timm's ``timm/data/_info`` tables.
- Prompt-friendly class names: ``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES`` (the
  names CLIP's zero-shot ImageNet evaluation uses), in the same WNID order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import open_clip.zero_shot_metadata as ocm
import timm.data

OUT = Path(__file__).resolve().parents[1] / "src" / "robustft" / "data" / "_info"


def _read(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _write(name: str, lines: list[str], out: Path) -> None:
    (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out / name} ({len(lines)} lines)")


def _subset(timm_info: Path, wnids: list[str], prefix: str) -> list[str]:
    """Return a subset's WNIDs, checking timm's synset list against its index list."""
    subset = _read(timm_info / f"{prefix}_synsets.txt")
    indices = [int(i) for i in _read(timm_info / f"{prefix}_indices.txt")]
    if [wnids[i] for i in indices] != subset or len(subset) != 200:
        raise SystemExit(f"{prefix}: timm's synset and index lists disagree")
    return sorted(subset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    timm_info = Path(timm.data.__file__).parent / "_info"

    wnids = _read(timm_info / "imagenet_synsets.txt")
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise SystemExit("timm's imagenet_synsets.txt is not 1000 sorted WNIDs")
    names = list(ocm.IMAGENET_CLASSNAMES)
    if len(names) != 1000:
        raise SystemExit("open_clip's IMAGENET_CLASSNAMES does not have 1000 entries")
    lemma_of = dict(line.split("\t", 1) for line in _read(timm_info / "imagenet_synset_to_lemma.txt"))

    _write("imagenet_wnids.txt", wnids, out)
    _write("imagenet_classnames.txt", names, out)
    _write("imagenet_lemmas.txt", [lemma_of[w] for w in wnids], out)
    _write("imagenet_r_wnids.txt", _subset(timm_info, wnids, "imagenet_r"), out)
    _write("imagenet_a_wnids.txt", _subset(timm_info, wnids, "imagenet_a"), out)


if __name__ == "__main__":
    main()

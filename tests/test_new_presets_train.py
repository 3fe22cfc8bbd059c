"""The FLYP, FLYP + counterfactual FD and L2-SP presets train on a user folder and on the demo world.

Each run starts from the shipped ImageNet preset and swaps only what this machine cannot
have (the model for a tiny random-weight CLIP, the data, the batch and the length), so the
method, its schedule, augmentation and weights come from the preset itself.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from robustft.cli import main
from robustft.config import build_config
from robustft.data import testing as fake
from robustft.reports.results import read_rows

PRESETS = ["paper-vit-b32-flyp", "paper-vit-b32-flyp-fd-refill", "paper-vit-b32-l2sp"]
TINY = ["model.name=robustft-tiny", "model.pretrained=none", "device=cpu", "data.batch_size=8",
        "data.eval_batch_size=32", "data.workers=0", "optim.epochs=1", "optim.warmup_steps=2", "checkpoint.every=0",
        "head.classnames=auto", "head.templates=simple", "data.eval_sets=[id]"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("user-folder")
    classes = ["cat", "dog", "bird"]
    return (fake.make_image_folder(root / "train", classes, per_class=8, size=32),
            fake.make_image_folder(root / "test", classes, per_class=3, size=32, seed=1))


def _train(preset: str, out: Path, sets: list[str]) -> None:
    args = [x for s in (*TINY, *sets) for x in ("--set", s)]
    with redirect_stdout(io.StringIO()):
        assert main(["train", "--config", preset, "--out", str(out), "--no-progress", *args]) == 0


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_on_a_user_folder(preset: str, folders: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = folders
    _train(preset, tmp_path / "run", ["data.train=folder", f"data.train_dir={train}", f"data.val_dir={test}",
                                      "data.holdout=0"])
    rows = read_rows([tmp_path / "run" / "results.jsonl"])
    assert [(r.dataset, r.method) for r in rows] == [("id", build_config(preset).method.name)]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_on_the_demo_world(preset: str, tmp_path: Path) -> None:
    _train(preset, tmp_path / "run", ["data.train=synthetic", "data.limit_train=32", "data.holdout=8"])
    rows = read_rows([tmp_path / "run" / "results.jsonl"])
    assert [r.dataset for r in rows] == ["id"] and 0.0 <= rows[0].top1 <= 100.0

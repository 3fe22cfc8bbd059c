"""`robustft zeroshot` end to end: the run it writes loads back and predicts like the built classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from robustft.cli import main
from robustft.data.testing import write_image
from robustft.model import build_zeroshot_classifier, load_classifier, load_clip, predict
from robustft.pipeline.runs import read_run_info
from robustft.safeio import load_tensors

CLASSES = ["cat", "dog", "bird", "fish"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
SEED = 1234


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zs-inputs")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    for i in range(6):
        write_image(root / "images" / f"{i}.png", size=48 + 8 * i, seed=i)
    return {"classes": root / "classes.txt", "templates": root / "templates.txt", "images": root / "images"}


def _zeroshot(inputs: dict[str, Path], out: Path, *extra: str) -> int:
    torch.manual_seed(SEED)  # robustft-tiny with pretrained "none" draws random weights
    return main(["zeroshot", "--model", "robustft-tiny", "--pretrained", "none", "--classnames",
                 str(inputs["classes"]), "--templates", str(inputs["templates"]), "--out", str(out), "--no-progress",
                 *extra])


@pytest.fixture(scope="module")
def run_dir(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zs") / "run"
    assert _zeroshot(inputs, out) == 0
    return out


def _images(inputs: dict[str, Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(inputs["images"].glob("*.png"))]


def test_writes_a_run_folder(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sorted(p.name for p in run_dir.iterdir()) == ["classifier.json", "classifier.safetensors", "run.json"]
    info = read_run_info(run_dir)
    assert info["kind"] == "zeroshot" and info["model"] == "robustft-tiny" and info["pretrained"] == "none"
    meta = json.loads((run_dir / "classifier.json").read_text())
    assert meta["classnames"] == CLASSES and meta["templates"] == TEMPLATES
    assert meta["num_classes"] == len(CLASSES)


def test_loads_back_and_predicts_like_the_built_classifier(run_dir: Path, inputs: dict[str, Path]) -> None:
    loaded, meta = load_classifier(run_dir)
    torch.manual_seed(SEED)
    bundle = load_clip("robustft-tiny", "none")
    built = build_zeroshot_classifier(bundle, CLASSES, TEMPLATES, progress=False).eval()

    saved = loaded.state_dict()
    for name, tensor in built.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    images = _images(inputs)
    top1, probs = predict(loaded, images)
    ref_top1, ref_probs = predict(built, images)
    assert probs.shape == (len(images), len(CLASSES))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(images)), atol=1e-5, rtol=0)
    assert torch.all(probs >= 0)
    assert torch.equal(top1, ref_top1)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=0)
    assert meta["classnames"][int(top1[0])] in CLASSES


def test_head_rows_are_the_normalised_prompt_means_times_logit_scale(run_dir: Path) -> None:
    loaded, _ = load_classifier(run_dir)
    weight = loaded.head.weight.detach()
    norms = weight.norm(dim=1)
    torch.manual_seed(SEED)
    scale = load_clip("robustft-tiny", "none").model.logit_scale.exp().item()
    torch.testing.assert_close(norms, torch.full_like(norms, scale), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(loaded.head.bias) == 0


def test_same_inputs_again_reenter_the_run_and_other_inputs_are_refused(
    run_dir: Path, inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before, _ = load_tensors(run_dir / "classifier.safetensors")
    assert _zeroshot(inputs, run_dir) == 0  # the same run: rebuilt in place, same tensors
    after, _ = load_tensors(run_dir / "classifier.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    other = tmp_path / "other"
    assert _zeroshot(inputs, other) == 0
    (tmp_path / "three.txt").write_text("cat\ndog\nbird\n")
    capsys.readouterr()
    argv = ["zeroshot", "--model", "robustft-tiny", "--pretrained", "none", "--classnames", str(tmp_path / "three.txt"),
            "--templates", "simple", "--out", str(other), "--no-progress"]
    assert main(argv) == 2
    assert "already holds a different robustft run" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    _, meta = load_classifier(other)
    assert meta["classnames"] == ["cat", "dog", "bird"] and meta["templates"] == ["a photo of a {}."]


def test_prints_where_the_run_went(inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert _zeroshot(inputs, tmp_path / "z") == 0
    assert capsys.readouterr().out.strip() == f"zero-shot classifier written to {tmp_path / 'z'}"

"""FLYP as a method: its loss and its optimizer step against hand-written references, 2
processes against 1, resume, the saved run, the CLI commands on a FLYP run, and WiSE-FT of
a FLYP run (both towers interpolated, every head rebuilt from its text tower).

Runs use the random-weight ``robustft-tiny`` CLIP; CLI runs use the smoke preset trimmed to
32 training images (a few seconds each).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import robustft.pipeline.train as pipeline_train
from robustft.cli import main
from robustft.engine.optim import build_optimizer
from robustft.methods import MethodOptions, build_method
from robustft.methods.task_contrastive import TextSide
from robustft.model import load_classifier, load_clip
from robustft.model.classifier import ImageClassifier
from robustft.model.text import TEXT_TOWER_FILE, TextTower, zeroshot_head_from_text
from robustft.pipeline.data import world_paths
from robustft.reports.results import read_rows
from robustft.safeio import load_tensors

from _methods_fixtures import CLASSNAMES, TEMPLATES, _one_thread, batch, text_context, zeroshot  # noqa: F401

TINY = ("--set", "data.limit_train=32", "--set", "data.holdout=8", "--set", "data.batch_size=8",
        "--set", "data.eval_sets=[id]")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)[0]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--config", "smoke", "--out", str(out), "--no-progress", *extra])


# ----------------------------------------------------------------------------- the loss by hand
def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax written out: x - max - log(sum(exp(x - max)))."""
    shifted = x - x.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def _hand_logits(student: ImageClassifier, side: TextSide, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        img = student.forward_features(batch["image"]).features
        texts = [side.templates[int(t)].format(side.classnames[int(y)]) for y, t in zip(batch["label"], batch["template"])]
        txt = side.tower.encode(side.tokenizer(texts))
        img = img / img.norm(dim=1, keepdim=True)
        txt = txt / txt.norm(dim=1, keepdim=True)
        return side.tower.logit_scale.exp() * img @ txt.T


def _sharp_context() -> dict[str, Any]:
    """The fixtures' text side with CLIP's trained temperature (exp 100): a random tower's
    features are nearly parallel, so a small scale would leave every loss near log(N)."""
    context = text_context()
    with torch.no_grad():
        context["text"].tower.logit_scale.fill_(math.log(100.0))
    return context


def _distinct_captions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with templates chosen so that same-class rows have different captions."""
    return {**batch, "template": (torch.arange(batch["label"].shape[0]) // 4) % len(TEMPLATES)}


def test_flyp_loss_equals_a_hand_computation(zeroshot, batch) -> None:
    context = _sharp_context()
    method = build_method("flyp", copy.deepcopy(zeroshot), None, MethodOptions(), context=context)
    with torch.no_grad():
        out = method(batch)
    logits = _hand_logits(method.student, context["text"], batch)
    n = logits.shape[0]
    idx = torch.arange(n)
    image_to_text = -_log_softmax(logits)[idx, idx].mean()
    text_to_image = -_log_softmax(logits.T)[idx, idx].mean()
    expected = (image_to_text + text_to_image) / 2
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert float(out["loss_task"]) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    # Same-class captions are negatives by default: the batch has repeated labels, so the
    # multi-positive loss must differ.
    assert len(set(batch["label"].tolist())) < n


def test_flyp_multi_positive_loss_equals_soft_target_cross_entropy(zeroshot, batch) -> None:
    batch = _distinct_captions(batch)
    context = _sharp_context()
    method = build_method("flyp", copy.deepcopy(zeroshot), None, MethodOptions(multi_positive=True),
                          context=context)
    with torch.no_grad():
        out = method(batch)
    logits = _hand_logits(method.student, context["text"], batch)
    labels = batch["label"]
    n = logits.shape[0]
    targets = torch.zeros(n, n)
    for i in range(n):
        positives = [j for j in range(n) if labels[j] == labels[i]]
        for j in positives:
            targets[i, j] = 1.0 / len(positives)
    image_to_text = -(targets * _log_softmax(logits)).sum(dim=1).mean()
    text_to_image = -(targets * _log_softmax(logits.T)).sum(dim=1).mean()
    expected = (image_to_text + text_to_image) / 2
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    plain = build_method("flyp", copy.deepcopy(zeroshot), None, MethodOptions(), context=_sharp_context())
    with torch.no_grad():
        assert float(plain(batch)["loss"]) != pytest.approx(float(expected), rel=1e-3)


# ----------------------------------------------------------------------------- one step vs the reference recipe
def test_one_adamw_step_equals_the_reference_recipe_over_every_clip_parameter(batch) -> None:
    """robustft's FLYP step = plain AdamW over ALL of CLIP's parameters with one weight decay."""
    torch.manual_seed(0)
    bundle = load_clip("robustft-tiny", "none")
    reference = copy.deepcopy(bundle.model).train()
    tower = TextTower.from_clip(bundle.model, copy=True)
    head = zeroshot_head_from_text(tower, bundle.tokenizer, CLASSNAMES, TEMPLATES)
    student = ImageClassifier(copy.deepcopy(bundle.model.visual), head, bundle.preprocess)
    side = TextSide(tower=tower, tokenizer=bundle.tokenizer, classnames=list(CLASSNAMES), templates=list(TEMPLATES))
    method = build_method("flyp", student, None, MethodOptions(), context={"text": side})
    lr, wd = 1e-3, 0.1

    # The head is rebuilt from the text tower, never trained; every CLIP parameter is.
    assert not any(p.requires_grad for p in student.head.parameters())
    groups = method.param_groups(wd)
    assert all(g["weight_decay"] == wd for g in groups)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    expected_ids = {id(p) for p in student.visual.parameters()} | {id(p) for p in tower.parameters()}
    assert set(grouped) == expected_ids and id(tower.logit_scale) in expected_ids
    ours = {f"visual.{k}": p for k, p in student.visual.named_parameters()}
    ours.update(dict(tower.named_parameters()))
    theirs = dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()  # image tower, text tower (token/positional embeddings, ln, proj), logit_scale
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    optimizer = build_optimizer(groups, lr=lr, weight_decay=wd)
    method.train()
    optimizer.zero_grad()
    method(batch)["loss"].backward()
    optimizer.step()

    # The naive reference: CLIP's own forward on normalised images, the loss written out, AdamW.
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=wd, foreach=False)
    mean = torch.tensor(bundle.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.preprocess.std).view(1, 3, 1, 1)
    texts = [TEMPLATES[int(t)].format(CLASSNAMES[int(y)]) for y, t in zip(batch["label"], batch["template"])]
    img = F.normalize(reference.encode_image((batch["image"] - mean) / std), dim=-1)
    txt = F.normalize(reference.encode_text(bundle.tokenizer(texts)), dim=-1)
    logits = reference.logit_scale.exp() * img @ txt.T
    idx = torch.arange(logits.shape[0])
    loss = (-_log_softmax(logits)[idx, idx].mean() - _log_softmax(logits.T)[idx, idx].mean()) / 2
    ref_opt.zero_grad()
    loss.backward()
    ref_opt.step()

    moved = max((theirs[k].detach() - p).abs().max().item() for k, p in
                {f"visual.{k}": v for k, v in bundle.model.visual.named_parameters()}.items())
    assert moved > 1e-4  # the step did something
    gmax = max(p.grad.abs().max().item() for p in theirs.values())
    assert all(p.grad is not None for p in ours.values())  # every CLIP parameter got a gradient
    unsure = total = 0
    for name, param in ours.items():
        mine, ref = param.grad, theirs[name].grad
        torch.testing.assert_close(mine, ref, rtol=1e-3, atol=1e-5 * gmax, msg=name)  # the same gradients
        # Adam's first step is lr * g / (|g| + eps): a gradient that is float noise (the key
        # bias of attention, whose exact gradient is 0; dead units) moves by a random +-lr in
        # either implementation. Elsewhere the steps agree to float rounding (fused vs
        # for-loop AdamW kernels may differ in the last bits).
        sure = (mine - ref).abs() <= 1e-3 * ref.abs()  # a gradient both agree on (exact zeros included)
        after, expected = param.detach(), theirs[name].detach()
        torch.testing.assert_close(after[sure], expected[sure], rtol=0, atol=1e-6, msg=name)
        assert (after - expected).abs().max().item() <= 2 * lr * (1 + wd) + 1e-6, name
        unsure, total = unsure + int((~sure).sum()), total + int((ref != 0).sum())
    assert unsure <= 0.005 * total, (unsure, total)  # ~150 of ~60k: the key biases, a few dead units
    assert not tower.logit_scale.detach().equal(bundle.model.logit_scale.detach())  # logit_scale trained


# ----------------------------------------------------------------------------- WiSE-FT of FLYP, in the method
def test_flyp_wise_finalize_mixes_both_towers_and_rebuilds_every_head(zeroshot, batch) -> None:
    context = text_context()
    side = context["text"]
    start_tower = copy.deepcopy(side.tower)
    student = copy.deepcopy(zeroshot)
    method = build_method("flyp+wise", student, None, MethodOptions(alphas=(0.0, 0.5, 1.0)), context=context)
    optimizer = torch.optim.AdamW(method.param_groups(0.1), lr=1e-2)
    method.train()
    for _ in range(2):
        optimizer.zero_grad()
        method(batch)["loss"].backward()
        optimizer.step()
    method.sync_head()
    trained = side.tower.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in start_tower.state_dict().items())
    # The start copy is frozen: training did not move it.
    start = method.zeroshot_text_state
    assert all(torch.equal(start[k], v) for k, v in start_tower.state_dict().items())

    out = method.finalize(student, zeroshot)
    assert list(out) == [0.0, 0.5, 1.0]
    zero, one, half = out[0.0].state_dict(), out[1.0].state_dict(), out[0.5].state_dict()
    zs_head = zeroshot_head_from_text(start_tower, side.tokenizer, side.classnames, side.templates)
    for k, v in zeroshot.state_dict().items():
        if k.startswith("visual."):
            assert torch.equal(zero[k], v), k
            assert torch.equal(one[k], student.state_dict()[k]), k
    assert torch.equal(zero["head.weight"], zs_head.weight) and not torch.equal(zero["head.weight"],
                                                                                zeroshot.head.weight)
    assert torch.equal(one["head.weight"], student.head.weight) and torch.equal(one["head.bias"], student.head.bias)
    mean_tower = out.text_tower(0.5)
    for k, v in mean_tower.state_dict().items():
        torch.testing.assert_close(v, (start[k] + trained[k]) / 2, rtol=0, atol=1e-6, msg=k)
    expected = zeroshot_head_from_text(mean_tower, side.tokenizer, side.classnames, side.templates)
    assert torch.equal(half["head.weight"], expected.weight) and not half["head.bias"].any()
    assert torch.equal(out.text_tower(1.0).state_dict()["logit_scale"], trained["logit_scale"])


def test_plain_wise_ft_keeps_no_text_tower(zeroshot) -> None:
    method = build_method("wise-ft", copy.deepcopy(zeroshot), None, MethodOptions())
    assert method.zeroshot_text_state is None and method.finalize(method.student, zeroshot).text is None


# ----------------------------------------------------------------------------- CLI runs
def _start_bundle() -> Any:
    """The smoke runs' starting CLIP: seed-0 robustft-tiny."""
    torch.manual_seed(0)
    return load_clip("robustft-tiny", "none")


def _world_classes() -> list[str]:
    return sorted(p.name for p in world_paths().splits["train"].iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A flyp run, a flyp+wise run (alphas 0, 0.5, 1), the zero-shot run they start from, a few test images."""
    root = tmp_path_factory.mktemp("flyp")
    world = world_paths()
    classes = _world_classes()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for c in classes:
        for src in sorted((world.splits["id"] / c).iterdir())[:2]:
            (root / "imgs" / c).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / "imgs" / c / src.name)
    torch.manual_seed(0)  # the smoke runs' random initial weights (seed 0)
    assert main(["zeroshot", "--model", "robustft-tiny", "--pretrained", "none", "--classnames",
                 str(root / "classes.txt"), "--templates", str(world.templates), "--out", str(root / "zs"),
                 "--no-progress"]) == 0
    assert train(root / "flyp", *TINY, "--set", "method.name=flyp") == 0
    assert train(root / "flyp-wise", *TINY, "--no-eval", "--set", "method.name=flyp+wise",
                 "--set", "method.alphas=[0.0, 0.5, 1.0]") == 0
    return {"root": root, "zs": root / "zs", "flyp": root / "flyp", "wise": root / "flyp-wise",
            "imgs": root / "imgs"}


def _tower_from(state: dict[str, torch.Tensor]) -> TextTower:
    tower = TextTower.from_clip(_start_bundle().model, copy=True)
    tower.load_state_dict(state)
    return tower


def test_saved_head_is_the_head_rebuilt_from_the_trained_text_tower(runs: dict[str, Path]) -> None:
    run = runs["flyp"]
    classifier, meta = load_classifier(run)
    final = tensors(run / "final.safetensors")
    text = {k[len("text."):]: v for k, v in final.items() if k.startswith("text.")}
    assert text and "logit_scale" in text
    assert {k[len("student."):] for k in final if k.startswith("student.")} == set(classifier.state_dict())
    saved_tower = tensors(run / TEXT_TOWER_FILE)
    assert saved_tower.keys() == text.keys() and all(torch.equal(saved_tower[k], text[k]) for k in text)
    bundle = _start_bundle()
    assert not torch.equal(text["logit_scale"], bundle.model.logit_scale.detach())  # the tower trained
    head = zeroshot_head_from_text(_tower_from(text), bundle.tokenizer, meta["classnames"], meta["templates"])
    state = classifier.state_dict()
    assert torch.equal(state["head.weight"], head.weight) and not state["head.bias"].any()
    assert all(torch.equal(state[k], final[f"student.{k}"]) for k in state if k.startswith("visual."))


def test_eval_wise_cam_and_report_run_on_a_flyp_run(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["flyp"]
    rows = tmp_path / "rows.jsonl"
    assert main(["eval", "--run", str(run), "--out", str(rows), "--no-progress"]) == 0
    (row,) = read_rows(rows)
    (trained,) = read_rows(run / "results.jsonl")
    assert (row.run, row.method, row.dataset, row.top1) == ("flyp", "flyp", "id", trained.top1)
    wise_rows = tmp_path / "wise.jsonl"
    assert main(["wise", "--zeroshot", str(runs["zs"]), "--finetuned", str(run), "--alphas", "0:1:0.5",
                 "--out", str(wise_rows), "--save", str(tmp_path / "mixed"), "--no-progress"]) == 0
    curve = read_rows(wise_rows)
    assert [(r.alpha, r.dataset) for r in curve] == [(0.0, "id"), (0.5, "id"), (1.0, "id")]
    assert curve[2].top1 == trained.top1  # alpha 1 is the fine-tuned run
    assert main(["cam", "--run", str(run), "--images", str(runs["imgs"]), "--out", str(tmp_path / "c.npz"),
                 "--grid", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "c.npz").is_file() and (tmp_path / "grid.png").is_file()
    assert main(["report", str(rows), str(wise_rows), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.md").is_file()


def test_wise_of_a_flyp_run_mixes_both_towers_and_rebuilds_heads(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["flyp"]
    mixed = tmp_path / "mixed"
    assert main(["wise", "--zeroshot", str(runs["zs"]), "--finetuned", str(run), "--alphas", "0:1:0.5",
                 "--out", str(tmp_path / "wise.jsonl"), "--save", str(mixed), "--no-progress"]) == 0
    bundle = _start_bundle()
    start = TextTower.from_clip(bundle.model, copy=True)
    trained = tensors(run / TEXT_TOWER_FILE)
    classes, templates = load_classifier(run)[1]["classnames"], load_classifier(run)[1]["templates"]
    zs, _ = load_classifier(runs["zs"])
    ft, _ = load_classifier(run)
    for alpha in ("0.00", "0.50", "1.00"):
        clf, meta = load_classifier(mixed / f"alpha_{alpha}")
        tower = tensors(mixed / f"alpha_{alpha}" / TEXT_TOWER_FILE)
        a = float(alpha)
        for k, v in tower.items():
            torch.testing.assert_close(v, (1 - a) * start.state_dict()[k] + a * trained[k], rtol=0, atol=1e-6)
        head = zeroshot_head_from_text(_tower_from(tower), bundle.tokenizer, classes, templates)
        assert torch.equal(clf.head.weight, head.weight), alpha
        for k, v in clf.state_dict().items():
            if k.startswith("visual."):
                torch.testing.assert_close(v, (1 - a) * zs.state_dict()[k] + a * ft.state_dict()[k],
                                           rtol=0, atol=1e-6)
    assert all(torch.equal(v, ft.state_dict()[k]) for k, v in load_classifier(mixed / "alpha_1.00")[0]
               .state_dict().items())
    # Alpha 0 depends on the start alone: `robustft wise` and `flyp+wise` build the same classifier.
    zero, _ = load_classifier(mixed / "alpha_0.00")
    in_training, _ = load_classifier(runs["wise"] / "wise" / "alpha_0.00")
    assert all(torch.equal(v, in_training.state_dict()[k]) for k, v in zero.state_dict().items())


def test_flyp_wise_run_writes_classifiers_with_rebuilt_heads(runs: dict[str, Path]) -> None:
    run = runs["wise"]
    bundle = _start_bundle()
    start = TextTower.from_clip(bundle.model, copy=True)
    trained = tensors(run / TEXT_TOWER_FILE)
    final = tensors(run / "final.safetensors")
    assert all(torch.equal(trained[k], final[f"text.{k}"]) for k in trained)
    zs, zs_meta = load_classifier(runs["zs"])
    ft, meta = load_classifier(run)
    classes, templates = meta["classnames"], meta["templates"]
    zero, zero_meta = load_classifier(run / "wise" / "alpha_0.00")
    one, _ = load_classifier(run / "wise" / "alpha_1.00")
    half, _ = load_classifier(run / "wise" / "alpha_0.50")
    assert zero_meta["extra"]["alpha"] == 0.0 and zero_meta["extra"]["method"] == "flyp+wise"
    # alpha 0: the zero-shot classifier built from the start tower.
    start_head = zeroshot_head_from_text(start, bundle.tokenizer, classes, templates)
    assert torch.equal(zero.head.weight, start_head.weight) and not zero.head.bias.any()
    torch.testing.assert_close(zero.head.weight, zs.head.weight, rtol=0, atol=1e-5)  # `robustft zeroshot`'s head
    assert all(torch.equal(v, zs.state_dict()[k]) for k, v in zero.state_dict().items() if k.startswith("visual."))
    # alpha 1: the fine-tuned classifier with its rebuilt head.
    assert all(torch.equal(v, ft.state_dict()[k]) for k, v in one.state_dict().items())
    head = zeroshot_head_from_text(_tower_from(trained), bundle.tokenizer, classes, templates)
    assert torch.equal(ft.head.weight, head.weight)
    # alpha 0.5: the text tower is the mean of both, the head is rebuilt from it.
    tower = tensors(run / "wise" / "alpha_0.50" / TEXT_TOWER_FILE)
    for k, v in tower.items():
        torch.testing.assert_close(v, (start.state_dict()[k] + trained[k]) / 2, rtol=0, atol=1e-6)
    mid_head = zeroshot_head_from_text(_tower_from(tower), bundle.tokenizer, classes, templates)
    assert torch.equal(half.head.weight, mid_head.weight)
    averaged = (zero.head.weight + one.head.weight) / 2
    assert not torch.allclose(half.head.weight, averaged, atol=1e-4)  # heads are not interpolated


def test_wise_refuses_a_flyp_run_without_its_text_tower(runs: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old-flyp"
    shutil.copytree(runs["flyp"], old)
    (old / TEXT_TOWER_FILE).unlink()
    rows = tmp_path / "rows.jsonl"
    capsys.readouterr()
    assert main(["wise", "--zeroshot", str(runs["zs"]), "--finetuned", str(old), "--alphas", "0.5",
                 "--out", str(rows), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert TEXT_TOWER_FILE in err[-1] and "--set method.name=flyp+wise" in err[-1]
    assert not rows.exists()


def test_wise_refuses_a_zeroshot_run_of_another_model(runs: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(5)  # another random init than the run's seed 0
    other = tmp_path / "zs-other"
    assert main(["zeroshot", "--model", "robustft-tiny", "--pretrained", "none", "--classnames",
                 str(runs["root"] / "classes.txt"), "--templates", str(world_paths().templates), "--out", str(other),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["wise", "--zeroshot", str(other), "--finetuned", str(runs["flyp"]), "--alphas", "0.5",
                 "--out", str(tmp_path / "rows.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--zeroshot {other} is not the model" in err and "seed 0" in err


# ----------------------------------------------------------------------------- resume
RESUME = ("--set", "data.limit_train=40", "--set", "data.holdout=8", "--set", "optim.epochs=2",
          "--set", "checkpoint.every=2", "--set", "data.eval_sets=[id]", "--set", "method.name=flyp")


def _hook_after_step(monkeypatch: pytest.MonkeyPatch, step: int, action: Callable[[], None]) -> None:
    real_fit = pipeline_train.fit

    def fit(*args: Any, **kwargs: Any) -> Any:
        def on_step_end(done: int) -> None:
            if done == step:
                action()

        return real_fit(*args, on_step_end=on_step_end, **kwargs)

    monkeypatch.setattr(pipeline_train, "fit", fit)


def _same(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _log(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "images_per_s")}
            for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_flyp_resume_after_sigterm_equals_an_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference, out = tmp_path / "uninterrupted", tmp_path / "preempted"
    assert train(reference, *RESUME) == 0
    with monkeypatch.context() as patch:
        # 32 rows per epoch in batches of 8: step 3 is inside epoch 1, the caption sampler mid-stream.
        _hook_after_step(patch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
        assert train(out, *RESUME) == 130
    assert not (out / "classifier.json").exists()
    assert train(out, *RESUME, "--resume") == 0
    for name in ("classifier.safetensors", "final.safetensors", TEXT_TOWER_FILE, "best/model.safetensors"):
        assert _same(out / name, reference / name), name
    (row,) = read_rows(out / "results.jsonl")
    (ref,) = read_rows(reference / "results.jsonl")
    assert (row.top1, row.top5, row.n) == (ref.top1, ref.top5, ref.n)
    assert _log(out) == _log(reference)


# ----------------------------------------------------------------------------- 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = main(argv)
    if code != 0:
        raise SystemExit(f"rank {rank}: robustft exited with {code}")


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def _split_key_biases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``state`` without the key third of every ``attn.in_proj_bias``, and those thirds alone."""
    rest, keys = {}, {}
    for k, v in state.items():
        if k.endswith("attn.in_proj_bias"):
            d = v.shape[0] // 3
            rest[k], keys[k] = torch.cat([v[:d], v[2 * d:]]), v[d:2 * d]
        else:
            rest[k] = v
    return rest, keys


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flyp", "flyp+l2sp"])
def test_two_gloo_processes_equal_one(method: str, tmp_path: Path) -> None:
    """data.batch_size 8: 4 rows per rank in 2 processes, 8 in one; the loss is over the global batch."""
    world_paths()  # generate the world before the processes start
    common = ["train", "--config", "smoke", "--no-progress", *TINY, "--no-eval", "--set", f"method.name={method}"]
    if method == "flyp+l2sp":
        common += ["--set", "method.l2sp_weight=1.0"]  # large enough to matter in a few steps
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--out", str(one)]) == 0
    mp.spawn(_ddp_worker, args=(2, _free_port(), [*common, "--out", str(two)]), nprocs=2, join=True)
    a, b = tensors(one / "final.safetensors"), tensors(two / "final.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("text.") for k in a)
    start = {f"student.visual.{k}": v for k, v in _start_bundle().model.visual.state_dict().items()}
    moved = max((a[k] - start[k]).abs().max().item() for k in start)
    # The key bias of attention has an exact gradient of 0 (a constant added to every score
    # of a row): Adam turns its float noise into +-lr steps, so it is compared loosely.
    (rest_a, keys_a), (rest_b, keys_b) = _split_key_biases(a), _split_key_biases(b)
    diff = max((rest_a[k] - rest_b[k]).abs().max().item() for k in rest_a)
    key_bias_diff = max((keys_a[k] - keys_b[k]).abs().max().item() for k in keys_a)
    # Same global batches -> same gradients up to summation order (see test_cli_train).
    assert moved > 1e-4 and diff <= min(5e-5, 0.02 * moved), (diff, moved)
    assert key_bias_diff <= 2 * 1e-3 * 3  # at most 2 lr per step, 3 steps at smoke's lr 1e-3
    loss1, loss2 = _losses(one), _losses(two)
    assert len(loss1) == len(loss2) and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(loss1, loss2))
    ha, hb = tensors(one / "classifier.safetensors"), tensors(two / "classifier.safetensors")
    torch.testing.assert_close(ha["head.weight"], hb["head.weight"], rtol=0, atol=1e-4)  # rebuilt alike

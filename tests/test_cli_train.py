"""`robustft train` end to end on the smoke preset: artefacts, every method, 2 processes.

Runs use the random-weight ``robustft-tiny`` CLIP and the synthetic world (generated once
into the test cache), trimmed to a few dozen images so that each takes about a second.
"""

from __future__ import annotations

import io
import json
import os
import socket
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from robustft.cli import main
from robustft.config import build_config, config_to_dict
from robustft.methods import METHODS, list_methods
from robustft.model import build_zeroshot_classifier, load_classifier, load_clip
from robustft.pipeline.data import world_paths
from robustft.reports.results import read_rows
from robustft.safeio import load_tensors

TINY = ("--set", "data.limit_train=32", "--set", "data.holdout=8", "--set", "data.batch_size=8",
        "--set", "data.eval_sets=[id]")
TRAINABLE = [name for name, _ in list_methods() if METHODS.get(name).trains]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--config", "smoke", "--out", str(out), "--no-progress", *extra])


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)[0]


@pytest.fixture(scope="module")
def zeroshot_state() -> dict[str, torch.Tensor]:
    """The smoke run's starting point: seed-0 robustft-tiny + the world's zero-shot head."""
    world = world_paths()
    torch.manual_seed(0)
    bundle = load_clip("robustft-tiny", "none")
    classes = sorted(p.name for p in world.splits["train"].iterdir() if p.is_dir())  # labels follow sorted folders
    clf = build_zeroshot_classifier(bundle, classes, str(world.templates), progress=False)
    return {k: v.detach().clone() for k, v in clf.state_dict().items()}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("smoke") / "run"
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert train(out) == 0
    return out, buf.getvalue()


def test_smoke_writes_every_artefact(smoke_run: tuple[Path, str]) -> None:
    out, stdout = smoke_run
    for name in ("config.yaml", "run.json", "classifier.json", "classifier.safetensors", "results.jsonl",
                 "train_log.jsonl", "log.txt", "best/model.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps and all((out / "checkpoints" / s / "model.safetensors").is_file() for s in steps)
    assert yaml.safe_load((out / "config.yaml").read_text()) == config_to_dict(build_config("smoke"))
    info = json.loads((out / "run.json").read_text())
    assert info["kind"] == "train" and info["method"] == "ft" and info["name"] == "smoke"
    assert "run smoke (ft) finished" in stdout and str(out / "results.jsonl") in stdout


def test_smoke_logs_and_results(smoke_run: tuple[Path, str]) -> None:
    out, _ = smoke_run
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["kind"] == "train"]
    assert train_rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert {"loss", "loss_task", "lr", "step", "epoch"} <= set(train_rows[-1])
    assert any(r["kind"] == "val" and 0 <= r["top1"] <= 100 for r in records)
    (row,) = read_rows(out / "results.jsonl")
    assert row.run == out.name and row.method == "ft" and row.dataset == "id" and row.alpha is None  # not "smoke"
    n_images = sum(1 for p in Path(world_paths().splits["id"]).rglob("*") if p.is_file())
    assert row.n == n_images and row.n_bad == 0
    assert 0 <= row.top1 <= row.top5 <= 100 and row.seed == 0


def test_smoke_classifier_is_the_trained_student(smoke_run: tuple[Path, str],
                                                zeroshot_state: dict[str, torch.Tensor]) -> None:
    out, _ = smoke_run
    clf, meta = load_classifier(out)
    saved = clf.state_dict()
    assert saved.keys() == zeroshot_state.keys()
    final = tensors(out / "final.safetensors")
    assert all(torch.equal(saved[k], final[k]) for k in saved)
    changed = [k for k in saved if not torch.equal(saved[k], zeroshot_state[k])]
    assert any(k.startswith("visual.") for k in changed) and "head.weight" in changed
    assert meta["extra"]["method"] == "ft"
    assert meta["classnames"] == sorted(p.name for p in world_paths().splits["train"].iterdir() if p.is_dir())


@pytest.mark.parametrize("method", TRAINABLE)
def test_every_trainable_method_trains_from_the_cli(method: str, tmp_path: Path,
                                                    zeroshot_state: dict[str, torch.Tensor]) -> None:
    out = tmp_path / method
    assert train(out, *TINY, "--no-eval", "--set", f"method.name={method}") == 0
    # Every run folder evaluates (on the test sets it was trained with); rows are named after the folder.
    assert main(["eval", "--run", str(out), "--out", str(tmp_path / "rows.jsonl"), "--no-progress"]) == 0
    assert [(r.run, r.method, r.alpha, r.dataset) for r in read_rows(tmp_path / "rows.jsonl")] == [
        (method, method, None, "id")]
    if method == "wise-ft":
        final = tensors(out / "final.safetensors")
        mixed, meta = load_classifier(out / "wise" / "alpha_0.50")
        assert meta["extra"]["alpha"] == 0.5
        for k, v in mixed.state_dict().items():
            torch.testing.assert_close(v, 0.5 * zeroshot_state[k] + 0.5 * final[k], rtol=0, atol=1e-6)
        return
    clf, meta = load_classifier(out)
    assert meta["extra"]["method"] == method
    state = clf.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    visual_moved = any(not torch.equal(state[k], zeroshot_state[k]) for k in state if k.startswith("visual."))
    assert not torch.equal(state["head.weight"], zeroshot_state["head.weight"])
    assert visual_moved == (method != "lp"), "only the linear probe keeps the image encoder frozen"
    if method == "lp-ft":
        assert (out / "stages" / "1-lp" / "stage_done").is_file() and (out / "stages" / "2-ft" / "stage_done").is_file()


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


def _train_losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path: Path, zeroshot_state: dict[str, torch.Tensor]) -> None:
    world_paths()  # generate the world before the processes start
    common = ["train", "--config", "smoke", "--no-progress", *TINY, "--set", "method.name=ft",
              "--set", "optim.lr=1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--out", str(one)]) == 0
    mp.spawn(_ddp_worker, args=(2, _free_port(), [*common, "--out", str(two)]), nprocs=2, join=True)
    a, b = tensors(one / "classifier.safetensors"), tensors(two / "classifier.safetensors")
    assert a.keys() == b.keys() == zeroshot_state.keys()
    # Same global batches -> same averaged gradients up to summation order; Adam divides by
    # sqrt(v), which magnifies that float noise on near-zero gradients (biases) a little.
    moved = max((a[k] - zeroshot_state[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-4 and diff <= min(5e-5, 0.02 * moved), (diff, moved)
    loss1, loss2 = (_train_losses(d / "train_log.jsonl") for d in (one, two))
    assert len(loss1) == len(loss2) and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(loss1, loss2))
    (row1,) = read_rows(one / "results.jsonl")
    (row2,) = read_rows(two / "results.jsonl")
    assert row1.n == row2.n  # distributed evaluation counts every image exactly once
    assert abs(row1.top1 - row2.top1) <= 100 / row1.n  # at most one borderline image may flip

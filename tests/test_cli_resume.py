"""`robustft train --resume` after a preemption (SIGTERM) or a crash equals an uninterrupted run.

The CLI has no hook into the training loop, so the tests wrap the loop the pipeline calls
(``robustft.pipeline.train.fit``) to act after a given optimizer step: send this process
SIGTERM (as a cluster scheduler would) or raise as if the process died. The resumed run's
classifier must equal the uninterrupted run's bit for bit, and so must its metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import robustft.pipeline.train as pipeline_train
from robustft.cli import main
from robustft.reports.results import read_rows
from robustft.safeio import load_tensors

# 40 images - 8 held out = 32 = 4 steps of 8 per epoch; 2 epochs = 8 steps; checkpoints at 2, 4, 6, 8.
ARGS = ("--set", "data.limit_train=40", "--set", "data.holdout=8", "--set", "optim.epochs=2",
        "--set", "checkpoint.every=2", "--set", "data.eval_sets=[id]")


def train(out: Path, *extra: str) -> int:
    return main(["train", "--config", "smoke", "--out", str(out), "--no-progress", *ARGS, *extra])


def hook_after_step(monkeypatch: pytest.MonkeyPatch, step: int, action: Callable[[], None]) -> None:
    """Make the pipeline's training loop run ``action`` after optimizer step ``step``."""
    real_fit = pipeline_train.fit

    def fit(*args: Any, **kwargs: Any) -> Any:
        def on_step_end(done: int) -> None:
            if done == step:
                action()

        return real_fit(*args, on_step_end=on_step_end, **kwargs)

    monkeypatch.setattr(pipeline_train, "fit", fit)


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_tensors(a)[0], load_tensors(b)[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def log_records(run: Path) -> list[dict[str, Any]]:
    """train_log.jsonl without its wall-clock fields."""
    volatile = {"time", "images_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in volatile}
            for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    assert train(out) == 0
    return out


def _assert_same_run(resumed: Path, reference: Path) -> None:
    assert same_tensors(resumed / "classifier.safetensors", reference / "classifier.safetensors")
    assert same_tensors(resumed / "best" / "model.safetensors", reference / "best" / "model.safetensors")
    (row,) = read_rows(resumed / "results.jsonl")
    (ref,) = read_rows(reference / "results.jsonl")
    assert (row.top1, row.top5, row.n, row.config_hash) == (ref.top1, ref.top5, ref.n, ref.config_hash)
    assert log_records(resumed) == log_records(reference)


def test_sigterm_saves_a_checkpoint_and_resume_equals_an_uninterrupted_run(
    uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "preempted"
    with monkeypatch.context() as patch:
        hook_after_step(patch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
        capsys.readouterr()
        assert train(out) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    # The signal arrives during step 3's bookkeeping; step 4 completes, is saved, then the run stops.
    assert err[-1].startswith("robustft train: interrupted: training stopped by a signal after step 4 of 8")
    assert "--resume" in err[-1]
    assert (out / "checkpoints" / "step_00000004").is_dir()
    assert not (out / "classifier.json").exists() and not (out / "results.jsonl").exists()

    assert train(out, "--resume") == 0
    _assert_same_run(out, uninterrupted)


def test_a_crash_loses_only_the_steps_since_the_last_checkpoint(
    uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "crashed"

    def die() -> None:
        raise RuntimeError("simulated crash (kill -9, node failure)")

    with monkeypatch.context() as patch:
        hook_after_step(patch, 7, die)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(out)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps[-1] == "step_00000006"  # step 7 was lost, nothing after it was written
    assert not (out / "classifier.json").exists()

    assert train(out, "--resume") == 0
    _assert_same_run(out, uninterrupted)


def test_resume_of_a_finished_run_changes_nothing(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(uninterrupted, out)
    assert train(out, "--resume") == 0
    assert same_tensors(out / "classifier.safetensors", uninterrupted / "classifier.safetensors")
    assert same_tensors(out / "best" / "model.safetensors", uninterrupted / "best" / "model.safetensors")
    assert log_records(out) == log_records(uninterrupted)  # no step was trained twice
    assert {r.top1 for r in read_rows(out / "results.jsonl")} == {read_rows(uninterrupted / "results.jsonl")[0].top1}


def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the run folder was checked")

    monkeypatch.setattr(pipeline_train, "load_model", load_model)


def test_a_second_train_without_resume_fails_before_loading_the_model(
        uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "again"
    shutil.copytree(uninterrupted, out)
    before = _files(out)
    _no_model(monkeypatch)
    capsys.readouterr()
    assert train(out) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"robustft train: error: {out} already holds checkpoints (newest step_00000008); pass --resume to continue "
        "that run, or choose a new output folder")
    assert _files(out) == before  # nothing written, moved or deleted


def test_a_stage_folder_with_checkpoints_is_refused_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from robustft.config import build_config
    from robustft.pipeline.runs import prepare_run_dir

    sets = ["data.limit_train=40", "data.holdout=8", "optim.epochs=2", "checkpoint.every=2", "data.eval_sets=[id]",
            "method.name=lp-ft"]
    out = tmp_path / "lpft"
    prepare_run_dir(out, kind="train", identity=pipeline_train.identity_of(build_config("smoke", sets)))
    (out / "stages" / "2-ft" / "checkpoints" / "step_00000002").mkdir(parents=True)
    before = _files(out)
    _no_model(monkeypatch)
    capsys.readouterr()
    assert train(out, "--set", "method.name=lp-ft") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"robustft train: error: {out / 'stages' / '2-ft'} already holds checkpoints (newest step_00000002)")
    assert _files(out) == before


def test_checkpoint_every_option_sets_the_period(tmp_path: Path) -> None:
    out = tmp_path / "every3"
    assert main(["train", "--config", "smoke", "--out", str(out), "--no-progress", "--no-eval",
                 "--set", "data.limit_train=40", "--set", "data.holdout=8", "--set", "checkpoint.keep=10",
                 "--checkpoint-every", "3"]) == 0
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000003", "step_00000004"]  # every 3 steps, plus the end of the epoch
    assert not (out / "results.jsonl").exists()  # --no-eval


AUGMENTED = ("--set", "data.train_augment=true", "--set", "data.workers=2")


def test_resume_with_augmentation_and_persistent_workers_equals_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random crops drawn in 2 persistent worker processes: the resumed run draws the same ones.

    The crash is in the second epoch, so the uninterrupted run's workers have loaded a whole
    epoch before while the resumed run's workers start fresh mid-epoch, at another batch.
    """
    reference = tmp_path / "uninterrupted"
    assert train(reference, *AUGMENTED) == 0
    out = tmp_path / "crashed"

    def die() -> None:
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        hook_after_step(patch, 7, die)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(out, *AUGMENTED)
    assert train(out, "--resume", *AUGMENTED) == 0
    _assert_same_run(out, reference)

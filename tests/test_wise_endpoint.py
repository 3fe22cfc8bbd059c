"""WiSE-FT interpolates the last fine-tuned weights (the reference) or the held-out-best epoch.

The held-out metric is replaced by a falling one (epoch 0 best, epoch 1 worse), so the best
epoch and the last weights differ and each end point is told apart.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from robustft.cli import main
from robustft.model import load_classifier
from robustft.pipeline import train as train_pipeline
from robustft.reports.results import read_rows
from robustft.safeio import load_tensors

TINY = ("--set", "data.limit_train=32", "--set", "data.holdout=8", "--set", "data.batch_size=8",
        "--set", "data.eval_sets=[id]", "--set", "optim.epochs=2", "--set", "method.name=wise-ft",
        "--set", "method.alphas=[0.5]")


@pytest.fixture
def falling_holdout(monkeypatch: pytest.MonkeyPatch) -> None:
    def holdout_fn(student, holdout, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return None if holdout is None else (lambda epoch: {"top1": 90.0 - 50.0 * epoch})

    monkeypatch.setattr(train_pipeline, "_holdout_fn", holdout_fn)


def _train(out: Path, *extra: str) -> None:
    with redirect_stdout(io.StringIO()):
        assert main(["train", "--config", "smoke", "--out", str(out), "--no-progress", *TINY, *extra]) == 0


def _newest_checkpoint(out: Path) -> dict[str, torch.Tensor]:
    newest = sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))[-1]
    return load_tensors(newest / "model.safetensors")[0]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("endpoint", ["last", "best"])
def test_wise_ft_interpolates_the_chosen_end_point(endpoint: str, tmp_path: Path, falling_holdout: None) -> None:
    out = tmp_path / endpoint
    _train(out, "--set", f"method.wise_endpoint={endpoint}")
    final = load_tensors(out / "final.safetensors")[0]
    last, best = _newest_checkpoint(out), load_tensors(out / "best" / "model.safetensors")[0]
    assert not _same(last, best), "the falling held-out metric must make the best epoch differ from the last"
    assert _same(final, last if endpoint == "last" else best)
    assert load_classifier(out / "wise" / "alpha_0.50")[1]["extra"]["endpoint"] == endpoint
    rows = read_rows([out / "results.jsonl"])
    wise = [r for r in rows if r.alpha is not None]
    assert wise and all(r.extra["wise_endpoint"] == endpoint for r in wise)
    assert all("wise_endpoint" not in r.extra for r in rows if r.alpha is None)
    # Donors are drawn within each process's micro-batch: every row says how the batch was split.
    assert all((r.extra["micro_batch"], r.extra["processes"], r.extra["accum_steps"]) == (8, 1, 1) for r in rows)


def test_other_methods_keep_their_best_epoch_whatever_the_wise_end_point(tmp_path: Path,
                                                                         falling_holdout: None) -> None:
    out = tmp_path / "ft"
    _train(out, "--set", "method.name=ft", "--set", "method.wise_endpoint=last")
    final = load_tensors(out / "final.safetensors")[0]
    assert _same(final, load_tensors(out / "best" / "model.safetensors")[0])
    assert not _same(final, _newest_checkpoint(out))
    assert load_classifier(out)[1]["extra"]["endpoint"] == "best"

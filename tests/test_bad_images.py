"""Unreadable images in training and evaluation: counted, skipped, listed, limited.

The trainer's skip protocol (unit tests on toy batches, a real masked method whose donors
must be other images, and two gloo processes of which one gets an unusable micro-batch),
then `robustft train`, `eval` and `wise` on class folders with corrupt files.
"""

from __future__ import annotations

import copy
import io
import json
import os
import socket
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from _methods_fixtures import zeroshot  # noqa: F401 - a pytest fixture
from robustft.cli import main
from robustft.data import testing as fake
from robustft.engine import TrainSettings, fit
from robustft.errors import ConfigError, DataError
from robustft.methods import MethodOptions, build_method
from robustft.reports.results import read_rows
from robustft.safeio import load_tensors, save_tensors
from test_engine_trainer import N_CLASSES, Stop, ToyData, ToyMethod, scramble, stop_after, train_records, weights


# ----------------------------------------------------------------------------- toys
class BatchList:
    """A loader stand-in: fixed micro-batches of ``per_batch`` items, ``sizes[i]`` of them readable.

    Batches look like :func:`robustft.data.folder.collate_skip_bad`'s (``n_bad`` counts the
    dropped items; an all-unreadable batch has an empty ``[0, 3, 0, 0]`` image tensor) and
    ``dataset.bad_paths()`` names the dropped items, as an image-folder dataset does.
    """

    def __init__(self, sizes: list[int], *, per_batch: int = 4, images: torch.Tensor | None = None,
                 prefix: str = "/data") -> None:
        n = len(sizes) * per_batch
        if images is None:
            images = ToyData(n).images
        labels = torch.arange(n) % N_CLASSES
        self.batches: list[dict[str, Any]] = []
        bad: list[str] = []
        for i, size in enumerate(sizes):
            idx = torch.arange(i * per_batch, i * per_batch + size)
            image = images[idx] if size else torch.zeros(0, 3, 0, 0)
            self.batches.append({"image": image, "label": labels[idx], "index": idx, "n_bad": per_batch - size})
            bad += [f"{prefix}/img{j:03d}.png" for j in range(i * per_batch + size, (i + 1) * per_batch)]
        self.dataset = SimpleNamespace(bad_paths=lambda: list(bad))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PairMethod(ToyMethod):
    """A toy method that, like MultiFill, needs two images per micro-batch."""

    def min_batch_size(self) -> int:
        return 2


def settings(**kw: Any) -> TrainSettings:
    base: dict[str, Any] = dict(epochs=1, lr=0.05, warmup_frac=0.2, log_every=1, tensorboard=False)
    return TrainSettings(**(base | kw))


def listed(run_dir: Path) -> list[str]:
    return (run_dir / "bad_images.txt").read_text().splitlines()


# ----------------------------------------------------------------------------- the trainer
def test_unusable_micro_batches_are_skipped_and_counted(tmp_path: Path) -> None:
    # accum 2: step 1 is whole, step 2 loses its second micro-batch, step 3 has none usable.
    method = ToyMethod()
    after: dict[int, dict[str, torch.Tensor]] = {}
    result = fit(method, BatchList([4, 4, 4, 0, 0, 0]), settings(accum_steps=2), run_dir=tmp_path, progress=False,
                 on_step_end=lambda step: after.__setitem__(step, weights(method)))
    assert result.step == 3 and method.calls == 3
    assert (result.n_images, result.n_bad_images) == (24, 12)
    assert (result.skipped_micro_batches, result.skipped_steps) == (3, 1)
    assert any(not torch.equal(after[1][k], after[2][k]) for k in after[1])
    assert all(torch.equal(after[2][k], after[3][k]) for k in after[2])  # a step without data changes nothing
    records = train_records(tmp_path)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    (data,) = [r for r in records if r["kind"] == "data"]
    assert data["n_bad_images"] == 12 and data["n_images"] == 24 and data["skipped_steps"] == 1
    assert listed(tmp_path) == [f"/data/img{j:03d}.png" for j in range(12, 24)]


def test_no_bad_images_writes_no_list_and_no_data_record(tmp_path: Path) -> None:
    result = fit(ToyMethod(), BatchList([4, 4]), settings(), run_dir=tmp_path, progress=False)
    assert (result.n_images, result.n_bad_images, result.skipped_micro_batches) == (8, 0, 0)
    assert not (tmp_path / "bad_images.txt").exists()
    assert all(r["kind"] != "data" for r in train_records(tmp_path))


def test_bad_fraction_limit_stops_with_the_list(tmp_path: Path) -> None:
    sizes = [4, 2, 4, 4, 4, 4]  # 2 of 24 unreadable (8.3%)
    result = fit(ToyMethod(), BatchList(sizes), settings(max_bad_fraction=0.1), run_dir=tmp_path / "ok",
                 progress=False)
    assert result.step == 6 and result.n_bad_images == 2
    # Above the limit the run stops as soon as the epoch end is certain to exceed it (step 2 here).
    with pytest.raises(DataError, match=r"training set: 2 of 8 images unreadable \(25\.000%\), above the limit of "
                                        r"5\.000% \(data\.max_bad_fraction\); .*bad_images\.txt\): "
                                        r"/data/img006\.png, /data/img007\.png"):
        fit(ToyMethod(), BatchList(sizes), settings(max_bad_fraction=0.05), run_dir=tmp_path / "over",
            progress=False)
    assert listed(tmp_path / "over") == ["/data/img006.png", "/data/img007.png"]
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        settings(max_bad_fraction=1.5)


def test_resume_with_skipped_steps_equals_uninterrupted_run(tmp_path: Path) -> None:
    sizes = [4, 0, 4, 4, 0, 0]  # per epoch: a half step, a whole one, an empty one
    cfg = settings(epochs=2, accum_steps=2, checkpoint_every=1)
    full = ToyMethod(noisy=True)
    expected = fit(full, BatchList(sizes), cfg, run_dir=tmp_path / "full", progress=False)
    with pytest.raises(Stop):  # killed after step 5 (mid-epoch 1, its checkpoint saved): a replay resume
        fit(ToyMethod(noisy=True), BatchList(sizes), cfg, run_dir=tmp_path / "cut", progress=False,
            on_step_end=stop_after(5))
    again = ToyMethod(noisy=True)
    scramble(again)
    result = fit(again, BatchList(sizes), cfg, run_dir=tmp_path / "cut", resume=True, progress=False)
    assert all(torch.equal(weights(again)[k], v) for k, v in weights(full).items())
    counts = ("n_images", "n_bad_images", "skipped_micro_batches", "skipped_steps")
    assert [getattr(result, c) for c in counts] == [getattr(expected, c) for c in counts] == [48, 24, 6, 2]
    assert train_records(tmp_path / "cut") == train_records(tmp_path / "full")


@pytest.mark.parametrize("masking, donors", [("RandMaskSingleFill(0.5)", "derangement"),
                                             ("RandMaskMultiFill(0.5)", "permutation")])
def test_method_needing_other_images_skips_a_one_image_micro_batch(
        masking: str, donors: str, zeroshot, tmp_path: Path) -> None:  # noqa: F811
    options = MethodOptions(masking=masking, donors=donors)
    method = build_method("fd-refill", copy.deepcopy(zeroshot), copy.deepcopy(zeroshot), options)
    assert method.min_batch_size() == 2
    assert build_method("fd-refill", copy.deepcopy(zeroshot), copy.deepcopy(zeroshot),
                        MethodOptions(masking="RandMaskSingleFill(0.5)")).min_batch_size() == 1
    images = torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loader = BatchList([3, 1, 3], per_batch=3, images=images)
    with pytest.raises(ConfigError, match="at least 2"):  # what the trainer avoids
        method(loader.batches[1])
    result = fit(method, loader, settings(), run_dir=tmp_path, progress=False)
    assert (result.step, result.skipped_steps, result.skipped_micro_batches, result.n_bad_images) == (3, 1, 1, 2)


# ----------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from robustft.distributed import init_distributed

    env = init_distributed("cpu", timeout_s=30.0)
    # Rank 1's LAST micro-batch of steps 1 and 2 is unusable: every rank must skip it and
    # synchronise gradients on the micro-batch before it instead.
    sizes = [[4, 4, 4, 4, 4, 3], [4, 1, 4, 0, 4, 4]][rank]
    report: dict[str, Any] = {}
    method = PairMethod()
    result = fit(method, BatchList(sizes, prefix=f"/rank{rank}"), settings(accum_steps=2), run_dir=Path(out, "ok"),
                 dist_env=env, progress=False)
    save_tensors(Path(out, f"rank{rank}.safetensors"), method.student.state_dict())
    report["counts"] = [result.n_images, result.n_bad_images, result.skipped_micro_batches, result.skipped_steps]
    try:
        fit(PairMethod(), BatchList(sizes, prefix=f"/rank{rank}"), settings(accum_steps=2, max_bad_fraction=0.1),
            run_dir=Path(out, "over"), dist_env=env, progress=False)
        report["error"] = None
    except DataError as exc:
        report["error"] = str(exc)
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    env.destroy()


@pytest.mark.slow
def test_two_processes_skip_one_ranks_unusable_micro_batch_together(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["counts"] == reports[1]["counts"] == [48, 8, 2, 0]
    w0, w1 = (load_tensors(tmp_path / f"rank{r}.safetensors")[0] for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # gradients were synchronised every step
    assert reports[0]["error"] == reports[1]["error"] is not None
    assert "/rank0/img023.png" in reports[0]["error"] and "/rank1/img005.png" in reports[0]["error"]
    assert "/rank1/img005.png" in listed(tmp_path / "over")


# ----------------------------------------------------------------------------- the CLI
CLASSES = ("bird", "cat", "dog")


def _corrupt(folder: Path, names: list[str]) -> list[str]:
    kinds = ("truncated", "garbage", "empty")
    return [str(fake.write_corrupt_image(folder / name, kinds[i % 3])) for i, name in enumerate(names)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """24 training images of which 3 are corrupt; 10 test images of which 1 is corrupt."""
    root = tmp_path_factory.mktemp("bad-data")
    train = fake.make_image_folder(root / "train", CLASSES, per_class=7, size=32)
    val = fake.make_image_folder(root / "val", CLASSES, per_class=3, size=32, seed=1)
    bad_train = _corrupt(train, ["bird/x.jpg", "cat/y.png", "dog/z.jpg"])
    bad_val = _corrupt(val, ["cat/broken.jpg"])
    names = root / "names.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    return SimpleNamespace(root=root, train=train, val=val, bad_train=sorted(bad_train), bad_val=bad_val,
                           names=names)


def _train(folders: SimpleNamespace, out: Path, limit: float) -> tuple[int, str]:
    """`robustft train` (smoke preset) on the folders; returns the exit code and stdout."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["train", "--config", "smoke", "--out", str(out), "--no-progress",
                     "--set", "data.train=folder", "--set", f"data.train_dir={folders.train}",
                     "--set", f"data.val_dir={folders.val}", "--set", "data.holdout=0",
                     "--set", "data.eval_sets=[id]", "--set", "head.templates=simple",
                     "--set", f"data.max_bad_fraction={limit}"])
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def trained_with_bad_images(folders: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bad-train") / "run"
    code, stdout = _train(folders, out, 0.2)
    assert code == 0
    return out, stdout


def test_train_below_the_limit_finishes_and_reports(trained_with_bad_images: tuple[Path, str],
                                                    folders: SimpleNamespace) -> None:
    out, stdout = trained_with_bad_images
    assert listed(out) == sorted(folders.bad_train + folders.bad_val)  # training and test images
    assert f"4 unreadable image(s) skipped, listed in {out / 'bad_images.txt'}" in stdout
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    (data,) = [r for r in records if r["kind"] == "data"]
    assert (data["n_bad_images"], data["n_images"], data["skipped_micro_batches"]) == (3, 24, 0)
    (row,) = read_rows(out / "results.jsonl")
    assert (row.dataset, row.n, row.n_bad) == ("id", 9, 1)
    assert "training set, epoch 0: 3 of 24 images unreadable" in (out / "log.txt").read_text()


def test_train_above_the_limit_stops_with_exit_2_and_the_list(folders: SimpleNamespace, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    capsys.readouterr()
    code, _ = _train(folders, out, 0.05)
    text = capsys.readouterr().err
    assert code == 2
    (line,) = [ln for ln in text.splitlines() if ln.startswith("robustft train: error:")]
    assert "training set:" in line and "above the limit of 5.000% (data.max_bad_fraction)" in line
    assert f"(all listed in {out / 'bad_images.txt'})" in line and "Traceback" not in text
    found = listed(out)
    assert found and set(found) <= set(folders.bad_train) and all(path in line for path in found)
    assert not (out / "classifier.safetensors").exists()


def test_eval_limit_from_the_option_or_the_run(folders: SimpleNamespace, trained_with_bad_images: tuple[Path, str],
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zs = tmp_path / "zs"
    assert main(["zeroshot", "--model", "robustft-tiny", "--pretrained", "none", "--classnames", str(folders.names),
                 "--templates", "simple", "--out", str(zs), "--no-progress"]) == 0
    results = tmp_path / "results.jsonl"
    argv = ["eval", "--run", str(zs), "--dataset", f"mine={folders.val}", "--out", str(results), "--no-progress"]
    for extra in (["--max-bad-fraction", "0.05"], []):  # the option, then the default 0.001
        capsys.readouterr()
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        limit = "5.000%" if extra else "0.100%"
        assert (f"robustft eval: error: mine: 1 of 10 images unreadable (10.000%), above the limit of {limit} "
                f"(--max-bad-fraction); fix or delete these files (all listed in {tmp_path / 'results.bad_images.txt'})"
                f": {folders.bad_val[0]}") in err
    assert not results.exists()
    assert (tmp_path / "results.bad_images.txt").read_text().splitlines() == folders.bad_val

    capsys.readouterr()
    assert main(argv + ["--max-bad-fraction", "0.5"]) == 0
    assert "listed in" in capsys.readouterr().out
    (row,) = read_rows(results)
    assert (row.n, row.n_bad) == (9, 1)
    # A trained run's own data.max_bad_fraction (0.2) is the default limit for its evaluation.
    trained, _ = trained_with_bad_images
    assert main(["eval", "--run", str(trained), "--dataset", f"mine={folders.val}", "--out", str(results),
                 "--no-progress"]) == 0
    assert [r.n_bad for r in read_rows(results)] == [1, 1]
    assert main(argv + ["--max-bad-fraction", "2"]) == 2
    assert "--max-bad-fraction 2.0 must be a fraction in [0, 1]" in capsys.readouterr().err


def test_wise_stops_above_the_limit(folders: SimpleNamespace, trained_with_bad_images: tuple[Path, str],
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trained, _ = trained_with_bad_images
    results = tmp_path / "wise.jsonl"
    argv = ["wise", "--zeroshot", str(trained), "--finetuned", str(trained), "--alphas", "0,1",
            "--dataset", f"mine={folders.val}", "--out", str(results), "--no-progress"]
    capsys.readouterr()
    assert main(argv + ["--max-bad-fraction", "0.05"]) == 2
    assert "mine: 1 of 10 images unreadable" in capsys.readouterr().err and not results.exists()
    assert (tmp_path / "wise.bad_images.txt").read_text().splitlines() == folders.bad_val
    assert main(argv) == 0  # the run's own limit, 0.2
    assert [r.n_bad for r in read_rows(results)] == [1, 1]

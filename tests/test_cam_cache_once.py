"""The teacher-CAM cache: the method decides whether one is built, and 2 processes build it once."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from robustft.cli import main
from robustft.config import build_config
from robustft.methods import METHODS, MethodOptions
from robustft.pipeline import train as train_pipeline
from robustft.pipeline.data import world_paths

TINY = ("data.limit_train=32", "data.holdout=8", "data.batch_size=8", "data.eval_sets=[id]")


def _cfg(*overrides: str):
    return build_config("smoke", [*TINY, *overrides])


@pytest.mark.parametrize(("overrides", "stages"), [
    (("method.name=fd-refill", "method.cam_source=teacher"), ["fd-refill"]),  # the default ObjMaskSingleFill(0.3)
    (("method.name=kd-refill", "method.cam_source=teacher", "method.masking=CtxMaskMultiFill(0.5)"), ["kd-refill"]),
    (("method.name=fd-attnmask", "method.cam_source=teacher"), ["fd-attnmask"]),
    (("method.name=fd-refill", "method.cam_source=teacher", "method.masking=RandMaskSingleFill(0.5)"), []),
    (("method.name=fd-tokendrop", "method.cam_source=teacher"), []),  # RandMaskNoFill: no CAM
    (("method.name=fd-refill", "method.cam_source=student"), []),  # the student's CAM changes every step
    (("method.name=fd-refill",), []),  # cam_source defaults to the student
    (("method.name=lp-ft", "method.cam_source=teacher"), []),  # stages lp and ft mask nothing
    (("method.name=fd", "method.cam_source=teacher"), []),
    (("method.name=wise-ft", "method.cam_source=teacher"), []),
])
def test_the_method_decides_whether_a_cache_is_wanted(overrides: tuple[str, ...], stages: list[str]) -> None:
    cfg = _cfg(*overrides)
    assert train_pipeline._cam_cache_stages(cfg) == stages
    options = train_pipeline.method_options(cfg)
    assert METHODS.get(cfg.method.name).wants_teacher_cams(options) == bool(stages)


def test_wants_teacher_cams_of_the_method_classes() -> None:
    teacher = MethodOptions(cam_source="teacher")
    assert METHODS.get("fd-refill").wants_teacher_cams(teacher)  # default masking ObjMaskSingleFill(0.3)
    assert METHODS.get("fd-refill").wants_teacher_cams(MethodOptions(cam_source="teacher", masking=""))
    assert not METHODS.get("fd-refill").wants_teacher_cams(MethodOptions(cam_source="teacher",
                                                                          masking="RandMaskMultiFill(0.5)"))
    assert not METHODS.get("fd-refill").wants_teacher_cams(MethodOptions(cam_source="student"))
    for name in ("ft", "lp", "lp-ft", "fd", "kd", "wise-ft", "zeroshot"):
        assert not METHODS.get(name).wants_teacher_cams(teacher), name


def test_no_cache_is_built_when_the_method_does_not_want_one(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a teacher-CAM cache was built for a run that does not use it")

    monkeypatch.setattr(train_pipeline, "_build_cam_cache", refuse)
    for i, extra in enumerate((["--set", "method.masking=RandMaskSingleFill(0.5)"],
                               ["--set", "data.train_augment=true"])):
        argv = ["train", "--config", "smoke", "--out", str(tmp_path / str(i)), "--no-progress", "--no-eval",
                *(x for o in TINY for x in ("--set", o)), "--set", "method.name=fd-refill",
                "--set", "method.cam_source=teacher", "--set", "optim.epochs=1", *extra]
        assert main(argv) == 0


def test_cam_cache_command_refuses_a_run_without_a_cache_before_loading(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_pipeline, "load_model", refuse)
    sets = ["--set", "method.name=fd-refill", "--set", "method.cam_source=teacher"]
    assert main(["cam-cache", "--config", "smoke", *sets, "--set", "method.masking=RandMaskSingleFill(0.5)"]) == 2
    assert "selects no patches by CAM" in capsys.readouterr().err
    assert main(["cam-cache", "--config", "smoke", *sets, "--set", "data.train_augment=true"]) == 2
    assert "cannot be cached" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cams_dir: str, record: str, argv: list[str]) -> None:
    """One rank of ``robustft train``, counting the cache builds and file writes it does."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from robustft.methods import cam_cache

    build, save = cam_cache.build_teacher_cam_cache, cam_cache.save_tensors

    def log(event: str) -> None:
        with open(record, "a", encoding="utf-8") as f:
            f.write(json.dumps({"rank": rank, "event": event}) + "\n")

    def counted_build(*args: object, **kwargs: object) -> torch.Tensor:
        log("build")
        return build(*args, **kwargs)  # type: ignore[arg-type]

    def counted_save(*args: object, **kwargs: object) -> None:
        log("write")
        save(*args, **kwargs)  # type: ignore[arg-type]

    cam_cache.build_teacher_cam_cache = counted_build  # type: ignore[assignment]
    cam_cache.save_tensors = counted_save  # type: ignore[assignment]
    cam_cache.default_cam_cache_dir = lambda: Path(cams_dir)  # type: ignore[assignment]
    code = main(argv)
    if code != 0:
        raise SystemExit(f"rank {rank}: robustft exited with {code}")


def _events(record: Path) -> list[tuple[int, str]]:
    if not record.is_file():
        return []
    return [(e["rank"], e["event"]) for e in map(json.loads, record.read_text().splitlines())]


@pytest.mark.slow
def test_two_processes_build_the_teacher_cam_cache_once(tmp_path: Path) -> None:
    world_paths()  # generate the world before the processes start
    cams = tmp_path / "cams"
    argv = ["train", "--config", "smoke", "--no-progress", "--no-eval", *(x for o in TINY for x in ("--set", o)),
            "--set", "method.name=fd-refill", "--set", "method.cam_source=teacher", "--set", "optim.epochs=1"]
    record = tmp_path / "events.jsonl"
    mp.spawn(_worker, args=(_free_port(), str(cams), str(record), [*argv, "--out", str(tmp_path / "run")]),
             nprocs=2, join=True)
    assert _events(record) == [(0, "build"), (0, "write")]  # rank 0 built and wrote it; rank 1 read the file
    assert len(list(cams.glob("teacher-mmcam-*.safetensors"))) == 1
    assert "teacher-CAM cache: wrote" in (tmp_path / "run" / "log.txt").read_text()

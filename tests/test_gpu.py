"""CUDA checks, opt-in: ``pytest -m gpu`` on a machine with one or more GPUs.

Every other run hides the GPUs (tests/conftest.py), so these tests skip there with the
reason. They cover what the CPU tests cannot: nccl process groups, bf16 autocast on CUDA
(the student's CAM, the distillation targets, the logits) and resume on the GPU.

Resume on CUDA is checked as a smoke test (the run continues from the checkpoint, with the
same step sequence, and finishes): CUDA kernels that accumulate with atomics are not
bitwise reproducible, so unlike on the CPU the weights are not compared bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU and `pytest -m gpu` (other runs hide the GPUs)"),
]

ARGS = ("--config", "smoke", "--no-progress", "--set", "device=cuda", "--set", "method.name=fd-refill",
        "--set", "method.cam_source=student", "--set", "optim.precision=bf16", "--set", "data.limit_train=40",
        "--set", "data.holdout=8", "--set", "optim.epochs=2", "--set", "checkpoint.every=2",
        "--set", "data.eval_sets=[id]")
CRASH_AFTER = 7  # 4 steps per epoch: the resume starts mid-way through the second epoch, at step 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_worker(rank: int, world: int, ports: list[int], out: str) -> None:
    """Uninterrupted run, crashed run, resumed run: the CLI as ``torchrun`` would start it."""
    import robustft.pipeline.train as pipeline_train
    from robustft.cli import main

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    root, report = Path(out), {}

    def train(run: str, port: int, *extra: str) -> int:
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per process group
        return main(["train", "--out", str(root / run), *ARGS, *extra])

    report["full"] = train("full", ports[0])
    real_fit = pipeline_train.fit

    def crashing_fit(*args: Any, **kwargs: Any) -> Any:
        def on_step_end(step: int) -> None:
            if step == CRASH_AFTER:
                raise RuntimeError("simulated crash")

        return real_fit(*args, on_step_end=on_step_end, **kwargs)

    pipeline_train.fit = crashing_fit
    try:
        train("cut", ports[1])
        report["crashed"] = False
    except RuntimeError as exc:
        report["crashed"] = "simulated crash" in str(exc)
    finally:
        pipeline_train.fit = real_fit
    report["resumed"] = train("cut", ports[2], "--resume")
    report["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    (root / f"report_rank{rank}.json").write_text(json.dumps(report))


def _steps(run: Path) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())]


def _check_runs(root: Path, world: int) -> None:
    from robustft.reports.results import read_rows
    from robustft.safeio import load_tensors

    for rank in range(world):
        report = json.loads((root / f"report_rank{rank}.json").read_text())
        assert report == {"full": 0, "crashed": True, "resumed": 0, "tf32": True}, (rank, report)
    full, cut = root / "full", root / "cut"
    assert (cut / "checkpoints" / "step_00000008").is_dir()
    assert _steps(cut) == _steps(full)  # the resumed log continues where the checkpoint left off
    for run in (full, cut):
        (row,) = read_rows(run / "results.jsonl")
        assert math.isfinite(row.top1) and row.n > 0
        weights, _ = load_tensors(run / "classifier.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
    assert "precision: bf16" in (cut / "config.yaml").read_text()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for a 2-rank nccl run")
def test_two_rank_nccl_fd_refill_bf16_student_cam_with_resume(tmp_path: Path) -> None:
    mp.spawn(_train_worker, args=(2, [_free_port() for _ in range(3)], str(tmp_path)), nprocs=2, join=True)
    _check_runs(tmp_path, 2)


def test_one_gpu_fd_refill_bf16_student_cam_with_resume(tmp_path: Path) -> None:
    mp.spawn(_train_worker, args=(1, [0, 0, 0], str(tmp_path)), nprocs=1, join=True)
    _check_runs(tmp_path, 1)


def _tiny_classifier() -> Any:
    from robustft.model.classifier import ClassifierHead, ImageClassifier
    from robustft.model.clip import load_clip

    torch.manual_seed(0)
    bundle = load_clip("robustft-tiny", "none", device="cuda")
    weights = torch.nn.functional.normalize(torch.randn(4, bundle.model.visual.output_dim), dim=-1).cuda()
    head = ClassifierHead.from_zeroshot(weights, math.log(100.0))
    return ImageClassifier(bundle.model.visual, head, bundle.preprocess).cuda().eval()


def test_bf16_cam_on_cuda_is_the_float32_rollout_and_close_to_the_fp32_cam() -> None:
    from robustft.model.cam import cam_from_forward, compute_cam
    from robustft.ops.cam import mmcam

    clf = _tiny_classifier()
    gen = torch.Generator(device="cuda").manual_seed(1)
    images = torch.rand(8, 3, 32, 32, device="cuda", generator=gen)
    labels = torch.arange(8, device="cuda") % 4
    fp32 = compute_cam(clf, images, labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = compute_cam(clf, images, labels)
        logits, out = clf.forward_with_features(images.clone().requires_grad_(True), return_attn=True)
        maps = list(out.attn)
        grads = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), maps, retain_graph=True)
        again = cam_from_forward(logits, out, labels, "mmcam", retain_graph=False, grid_size=clf.grid_size)
    assert bf16.raw.dtype == torch.float32 and bf16.logits.dtype == torch.float32
    assert out.features.dtype == torch.float32 and logits.dtype == torch.float32
    reference = mmcam([m.detach().float() for m in maps], [g.float() for g in grads])  # outside autocast
    torch.testing.assert_close(again.raw.flatten(1), reference, rtol=1e-5, atol=1e-6)
    similarity = torch.nn.functional.cosine_similarity(bf16.normalized().flatten(1), fp32.normalized().flatten(1))
    assert similarity.min() > 0.99, similarity


def test_init_distributed_on_cuda_switches_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    from robustft.distributed import init_distributed

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert init_distributed("cuda", tf32=False).device == torch.device("cuda", 0)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        init_distributed("cuda")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

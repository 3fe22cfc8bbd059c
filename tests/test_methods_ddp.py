"""methods under DDP: every student pass goes through the wrapper, gradients are averaged over ranks.

The masked step runs the DDP-wrapped student twice (clean pass with attention maps, then the
counterfactual pass) with a CAM gradient to the attention maps in between; this checks that
DDP still averages every parameter's gradient exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from robustft.distributed import init_distributed
from robustft.methods import MethodOptions, build_method
from robustft.model.classifier import ClassifierHead, ImageClassifier
from robustft.model.clip import load_clip

NAMES = ("lp", "kd-refill", "fd-refill")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _method(name: str, rank: int):
    torch.manual_seed(0)
    bundle = load_clip("robustft-tiny", "none")
    weights = F.normalize(torch.randn(4, bundle.model.visual.output_dim), dim=-1)
    zeroshot = ImageClassifier(bundle.model.visual, ClassifierHead.from_zeroshot(weights, math.log(10.0)),
                               bundle.preprocess)
    student = copy.deepcopy(zeroshot)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return build_method(name, student, zeroshot, MethodOptions(seed=1, rank=rank))


def _batch(rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return {"image": torch.rand(4, 3, 32, 32, generator=gen), "label": torch.arange(4), "index": torch.arange(4)}


def _grads(method) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    env = init_distributed("cpu", timeout_s=60.0)
    report = {}
    for name in NAMES:
        local = _method(name, rank)
        local(_batch(rank))["loss"].backward()
        mine = _grads(local)
        averaged = {n: env.all_reduce_sum(g.clone()) / 2 for n, g in mine.items()}
        method = _method(name, rank)
        method.set_ddp_module(env.wrap_ddp(method.trainable_module()))
        method(_batch(rank))["loss"].backward()
        synced = _grads(method)
        method.set_ddp_module(None)
        report[name] = {
            "same_keys": sorted(synced) == sorted(mine),
            "err": max(float((synced[n] - averaged[n]).abs().max()) for n in mine),
            "differs_from_local": any(not torch.allclose(synced[n], mine[n]) for n in mine),
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    env.destroy()


@pytest.mark.slow
def test_ddp_gradients_are_the_rank_average(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in NAMES:
            assert report[name]["same_keys"], (rank, name)
            assert report[name]["err"] < 1e-6, (rank, name, report[name]["err"])
            assert report[name]["differs_from_local"], (rank, name)  # DDP really averaged

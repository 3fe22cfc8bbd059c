"""Distributed helper: launcher environments, single-process identities, and real 2-process gloo runs."""

from __future__ import annotations

import json
import os
import socket
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import robustft.distributed
import robustft.pipeline.train as pipeline_train
from robustft.cli import main
from robustft.config import build_config
from robustft.distributed import DistEnv, ddp_call, init_distributed, is_peer_failure, launcher_env, shard_range, unwrap
from robustft.distributed import _duplicate_gpus, _resolve_device, set_tf32
from robustft.engine import TrainSettings, fit, list_checkpoints
from robustft.errors import ConfigError, TrainingError
from robustft.safeio import load_tensors, save_tensors
from test_engine_trainer import Stop, ToyMethod, scramble, stop_after, toy_loader

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}


def test_launcher_env_reads_torchrun_and_slurm() -> None:
    assert launcher_env({}) == (0, 1, 0, "single")
    assert launcher_env(TORCHRUN) == (3, 8, 1, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "MASTER_ADDR": "n0",
             "MASTER_PORT": "29500", "SLURM_NTASKS": "16"}
    assert launcher_env(slurm) == (5, 16, 1, "slurm")
    # torchrun inside a SLURM allocation: torchrun's variables win.
    assert launcher_env({**slurm, **TORCHRUN}) == (3, 8, 1, "torchrun")
    # The batch script itself (no srun step) is one process, not rank 0 of 16 waiting forever.
    batch_step = {k: v for k, v in slurm.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert launcher_env(batch_step) == (0, 1, 0, "single")


@pytest.mark.parametrize(
    ("env", "message"),
    [({**TORCHRUN, "MASTER_ADDR": None}, "MASTER_ADDR"), ({**TORCHRUN, "RANK": "9"}, "rank 9, world size 8"),
     ({**TORCHRUN, "WORLD_SIZE": "eight"}, "WORLD_SIZE='eight'")],
)
def test_launcher_env_rejects_broken_environments(env: dict, message: str) -> None:
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        launcher_env(env)


def test_single_process_env_is_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("auto")
    assert (env.rank, env.world_size, env.backend, env.device.type, env.is_primary) == (0, 1, None, "cpu", True)
    t = torch.tensor([1.0, 2.0])
    assert env.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert env.all_gather_object({"a": 1}) == [{"a": 1}] and env.broadcast_object(5) == 5
    env.barrier()
    net = nn.Linear(2, 2)
    assert env.wrap_ddp(net) is net and unwrap(net) is net
    assert torch.equal(ddp_call(net, "forward", torch.ones(1, 2)), net(torch.ones(1, 2)))
    assert env.rank_seed(1) != DistEnv(rank=1, world_size=2).rank_seed(1)
    env.destroy()


def test_device_choices() -> None:
    with pytest.raises(ConfigError, match="unknown device 'gpu'; valid: auto, cpu, cuda"):
        init_distributed("gpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        init_distributed("cuda")  # tests hide every GPU
    with pytest.raises(ConfigError, match="timeout"):
        init_distributed("cpu", timeout_s=0)


def test_shard_range_and_peer_failure_detection() -> None:
    assert [list(shard_range(5, r, 2)) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert is_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer"))
    assert is_peer_failure(RuntimeError("Timed out waiting 3000ms for recv operation to complete"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


# ----------------------------------------------------------------------------- real process groups
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int, timeout_s: float) -> DistEnv:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    return init_distributed("cpu", timeout_s=timeout_s)


def _failure_worker(rank: int, port: int, out: str, mode: str) -> None:
    env = _join(rank, 2, port, timeout_s=3.0)
    report: dict = {"gather": env.all_gather_object(rank * 10), "bcast": env.broadcast_object(f"from{rank}")}
    report["sum"] = env.all_reduce_sum(torch.tensor([float(rank + 1)])).tolist()
    env.barrier()
    if rank == 1:
        if mode == "hang":
            time.sleep(5.0)  # alive but silent: only the timeout can free rank 0
        os._exit(0)
    start = time.monotonic()
    try:
        env.all_reduce_sum(torch.ones(2))
        report["error"] = None
    except TrainingError as exc:
        report["error"] = str(exc)
    report["waited"] = time.monotonic() - start
    Path(out, f"{mode}.json").write_text(json.dumps(report))
    os._exit(0)  # skip destroy_process_group: the peer is gone


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_or_hung_rank_raises_within_timeout(tmp_path: Path, mode: str) -> None:
    mp.spawn(_failure_worker, args=(_free_port(), str(tmp_path), mode), nprocs=2, join=True)
    report = json.loads((tmp_path / f"{mode}.json").read_text())
    assert report["gather"] == [0, 10] and report["bcast"] == "from0" and report["sum"] == [3.0]
    assert report["error"] is not None and "another process probably died or stopped responding" in report["error"]
    assert report["waited"] < 10.0


def _settings(**kw: object) -> TrainSettings:
    base: dict = dict(epochs=2, lr=0.05, warmup_frac=0.2, log_every=1, tensorboard=False, clip_grad_norm=0.5)
    return TrainSettings(**(base | kw))


def _train_worker(rank: int, port: int, out: str) -> None:
    env = _join(rank, 2, port, timeout_s=60.0)
    root = Path(out)
    # Same global batch as the 1-process run (8): 2 ranks x 2 accumulation steps x 2 images.
    method = ToyMethod()
    fit(method, toy_loader(2, rank=rank, world=2), _settings(accum_steps=2), run_dir=root / "ddp", dist_env=env,
        progress=False)
    save_tensors(root / f"ddp_rank{rank}.safetensors", method.student.state_dict())
    # Interrupted + resumed 2-process run with random draws equals the uninterrupted one.
    cfg = _settings(checkpoint_every=2)
    full = ToyMethod(noisy=True)
    fit(full, toy_loader(4, rank=rank, world=2), cfg, run_dir=root / "full", dist_env=env, progress=False)
    try:
        fit(ToyMethod(noisy=True), toy_loader(4, rank=rank, world=2), cfg, run_dir=root / "cut", dist_env=env,
            progress=False, on_step_end=stop_after(3))
    except Stop:
        pass
    again = ToyMethod(noisy=True)
    scramble(again)
    fit(again, toy_loader(4, rank=rank, world=2), cfg, run_dir=root / "cut", dist_env=env, resume=True,
        progress=False)
    same = all(torch.equal(a, b) for a, b in zip(full.student.state_dict().values(),
                                                  again.student.state_dict().values()))
    Path(out, f"resume_rank{rank}.json").write_text(json.dumps({"same": same}))
    env.destroy()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_train_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = ToyMethod()
    fit(single, toy_loader(8), _settings(), run_dir=tmp_path / "single", progress=False)
    rank0, _ = load_tensors(tmp_path / "ddp_rank0.safetensors")
    rank1, _ = load_tensors(tmp_path / "ddp_rank1.safetensors")
    for name, value in single.student.state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), name  # replicas stay identical
        torch.testing.assert_close(rank0[name], value, rtol=0, atol=1e-5)
    assert any(not torch.equal(value, ToyMethod().student.state_dict()[name])
               for name, value in single.student.state_dict().items())
    for rank in (0, 1):
        assert json.loads((tmp_path / f"resume_rank{rank}.json").read_text())["same"], rank
    assert [p.name for p in list_checkpoints(tmp_path / "cut")][-1] == "step_00000006"


# ----------------------------------------------------------------------------- GPUs per process, TF32
class _FakeCuda:
    """torch.cuda as a node with ``count`` visible GPUs would show it (records set_device)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.selected: list[int] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", self.selected.append)


def test_srun_with_one_gpu_per_task_uses_the_one_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _FakeCuda(monkeypatch, count=1)
    # srun --ntasks-per-node=4 --gpus-per-task=1: local ranks 0..3, each task sees one GPU.
    for local in range(4):
        assert _resolve_device("cuda", local, "slurm") == torch.device("cuda", 0)
    assert cuda.selected == [0, 0, 0, 0]


def test_local_rank_beyond_the_visible_gpus_is_an_error_when_gpus_are_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    _FakeCuda(monkeypatch, count=1)
    # torchrun: every local process sees the node's GPUs, so rank 1 of a 1-GPU node has none.
    with pytest.raises(ConfigError, match="local rank 1 has no GPU: this process sees 1; .*--nproc_per_node"):
        _resolve_device("cuda", 1, "torchrun")
    _FakeCuda(monkeypatch, count=2)
    assert _resolve_device("cuda", 1, "slurm") == torch.device("cuda", 1)  # a 2-GPU task: the local rank's GPU
    with pytest.raises(ConfigError, match="local rank 3 has no GPU: this process sees 2; .*--gpus-per-task=1"):
        _resolve_device("cuda", 3, "slurm")


def test_srun_launch_end_to_end_picks_gpu_0_and_checks_gpus_are_distinct(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _FakeCuda(monkeypatch, count=1)
    for name, value in {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
                        "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    joined: list[tuple] = []
    monkeypatch.setattr(robustft.distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(robustft.distributed.dist, "init_process_group",
                        lambda backend, **kw: joined.append((backend, kw["rank"], kw["world_size"])))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(uuid="GPU-ab"))
    places = [("n0", f"GPU-{r}") for r in range(8)]

    def gather(out: list, obj: object) -> None:
        out[:] = places[:5] + [obj] + places[6:]

    monkeypatch.setattr(robustft.distributed.dist, "all_gather_object", gather)
    monkeypatch.setattr(robustft.distributed, "set_tf32", lambda enabled: None)
    env = init_distributed("cuda")
    assert (env.device, env.local_rank, env.backend, joined) == (torch.device("cuda", 0), 1, "nccl",
                                                                 [("nccl", 5, 8)])
    assert cuda.selected == [0]
    # Without GPU binding two tasks of a node would share one GPU: refused with the fix.
    places[2] = (socket.gethostname(), "GPU-ab")
    monkeypatch.setattr(robustft.distributed.dist, "destroy_process_group", lambda: None)
    with pytest.raises(ConfigError, match="ranks 2 and 5 both run on GPU GPU-ab .*--gpus-per-task=1"):
        init_distributed("cuda")


def test_duplicate_gpus_are_found_per_host() -> None:
    assert _duplicate_gpus([("a", "g0"), ("a", "g1"), ("b", "g0")]) is None
    assert _duplicate_gpus([("a", "g0"), ("b", "g0"), ("a", "g0")]) == "ranks 0 and 2 both run on GPU g0 of host a"


@pytest.fixture
def _tf32_restored() -> Iterator[None]:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.usefixtures("_tf32_restored")
def test_tf32_is_set_for_cuda_runs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    set_tf32(False)
    init_distributed("cpu")  # the CPU has no TF32: the switches are left alone
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    _FakeCuda(monkeypatch, count=1)
    assert init_distributed("cuda").device == torch.device("cuda", 0)  # on by default
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    init_distributed("cuda", tf32=False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)


def test_train_passes_optim_tf32_to_the_device_set_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert build_config("smoke").optim.tf32 is True
    seen: list[bool] = []

    def init(device: str, timeout_s: float, *, tf32: bool) -> DistEnv:
        seen.append(tf32)
        raise ConfigError("stop here")

    monkeypatch.setattr(pipeline_train, "init_distributed", init)
    for value in ("true", "false"):
        assert main(["train", "--config", "smoke", "--out", str(tmp_path / value), "--no-progress",
                     "--set", f"optim.tf32={value}"]) == 2
    assert seen == [True, False]


# ----------------------------------------------------------------------------- every rank, rank 0's weights
def _broadcast_worker(rank: int, port: int, out: str) -> None:
    env = _join(rank, 2, port, timeout_s=60.0)
    torch.manual_seed(rank)  # each rank starts with other weights, as after reading a stale file
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    net[1].running_mean.add_(rank + 1.0)
    with torch.no_grad():
        net[0].weight.data = net[0].weight.data.t().contiguous().t()  # a non-contiguous parameter
    env.broadcast_module(net)
    save_tensors(Path(out) / f"bcast_rank{rank}.safetensors", {k: v.contiguous() for k, v in net.state_dict().items()})
    env.destroy()


@pytest.mark.slow
def test_broadcast_module_gives_every_rank_rank_0s_weights(tmp_path: Path) -> None:
    mp.spawn(_broadcast_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, _ = load_tensors(tmp_path / "bcast_rank0.safetensors")
    rank1, _ = load_tensors(tmp_path / "bcast_rank1.safetensors")
    torch.manual_seed(0)
    expected = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict()
    expected["1.running_mean"] = expected["1.running_mean"] + 1.0
    for name, value in expected.items():
        assert torch.equal(rank0[name], value) and torch.equal(rank1[name], value), name


def test_train_broadcasts_the_kept_weights_after_each_stage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    monkeypatch.setattr(DistEnv, "broadcast_module", lambda self, module, src=0: calls.append(type(module).__name__))
    out = tmp_path / "run"
    args = ["train", "--config", "smoke", "--out", str(out), "--no-progress", "--no-eval",
            "--set", "data.limit_train=24", "--set", "data.holdout=8"]
    assert main(args) == 0
    assert calls == ["ImageClassifier"]  # after the best epoch was loaded, before final.safetensors

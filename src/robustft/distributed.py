"""Process-group set-up and the few collectives robustft needs; the only importer of torch.distributed.

One code path serves a single CPU process, one GPU, N GPUs under ``torchrun`` and a SLURM
``srun`` launch: :func:`init_distributed` reads the launcher's environment and returns a
:class:`DistEnv`, whose collectives are identities when there is one process. CUDA runs use
nccl, everything else gloo. Every process group gets a timeout, so when one rank dies or
hangs the others raise :class:`robustft.errors.TrainingError` instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from robustft.errors import ConfigError, RobustFTError, TrainingError

__all__ = [
    "DistEnv",
    "init_distributed",
    "launcher_env",
    "ddp_call",
    "unwrap",
    "no_sync",
    "is_peer_failure",
    "shard_range",
    "all_gather_with_grad",
    "set_tf32",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Substrings of the RuntimeErrors gloo and nccl raise when a peer vanished or a collective
# timed out; older builds raise plain RuntimeError rather than dist.DistError.
_PEER_FAILURE_MARKERS = ("gloo", "nccl", "timed out", "connection reset", "connection closed", "watchdog")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank in ``[0, world_size)``.
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU).
        device: The device this process computes on.
        backend: ``"nccl"``, ``"gloo"`` or ``None`` when no process group exists (one process).
        timeout_s: Collective timeout of the process group, in seconds.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float = 1800.0

    @property
    def is_primary(self) -> bool:
        """True on rank 0, the process that writes files and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when collectives talk to other processes."""
        return self.world_size > 1 and self.backend is not None

    def rank_seed(self, seed: int) -> int:
        """A seed that differs per rank: ``seed * 1000003 + rank`` (mod 2**63)."""
        return (int(seed) * 1_000_003 + self.rank) % 2**63

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it."""
        if self.is_distributed:
            with self.peer_failures("all_reduce"):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Gather a picklable object from every rank (in-memory only); returns the list by rank."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self.peer_failures("all_gather_object"):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Return rank ``src``'s ``obj`` on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj]
        with self.peer_failures("broadcast_object"):
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast_module(self, module: nn.Module, src: int = 0) -> None:
        """Overwrite every parameter and persistent buffer of ``module`` with rank ``src``'s, in place.

        For weights each rank read from a file rank 0 wrote (the best epoch, a finished
        stage): after this every rank holds exactly rank 0's numbers, even when a
        filesystem served a stale copy. The module must have the same structure on every rank.
        """
        if not self.is_distributed:
            return
        with torch.no_grad(), self.peer_failures("broadcast_module"):
            for tensor in module.state_dict().values():
                staged = not tensor.is_contiguous() or (self.backend == "nccl" and tensor.device.type != "cuda")
                buf = tensor.to(self.device).contiguous() if staged else tensor
                dist.broadcast(buf, src=src)
                if staged:
                    tensor.copy_(buf)

    def barrier(self) -> None:
        """Wait until every rank arrives here (or the timeout passes)."""
        if self.is_distributed:
            with self.peer_failures("barrier"):
                dist.barrier()

    def wrap_ddp(self, module: nn.Module, *, find_unused_parameters: bool = False) -> nn.Module:
        """Wrap ``module`` for data-parallel training; the module itself when there is one process.

        Call the result as ``wrapped(*args)`` for ``module.forward`` or through
        :func:`ddp_call` for any other method of ``module`` (``forward_features``, ...):
        both arm DDP's gradient all-reduce for the next backward pass. Calling ``module``
        directly in a multi-process run would silently skip that synchronisation.
        DDP copies rank 0's parameters and buffers to every rank when it wraps.
        """
        if not self.is_distributed:
            return module
        if not any(p.requires_grad for p in module.parameters()):
            raise ConfigError("the trainable module has no parameter with requires_grad=True; nothing to train")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            _CallRouter(module), device_ids=device_ids, find_unused_parameters=find_unused_parameters
        )

    def on_primary(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a file write, a choice) on rank 0 only; every rank returns its result.

        A :class:`RobustFTError` raised by ``fn`` is raised on rank 0 and, as a
        TrainingError quoting it, on every other rank, so no rank is left waiting.
        The result must be picklable (it is broadcast).
        """
        result, error = None, None
        if self.is_primary:
            try:
                result = fn()
            except RobustFTError as exc:
                error = exc
        shared = self.broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if shared[1] is not None:
            raise TrainingError(f"rank 0 failed: {shared[1]}")
        return shared[0]  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def peer_failures(self, what: str) -> Iterator[None]:
        """Turn a collective that failed because another rank died or hung into a TrainingError."""
        try:
            yield
        except RuntimeError as exc:
            if not (self.is_distributed and is_peer_failure(exc)):
                raise
            raise TrainingError(
                f"rank {self.rank}/{self.world_size}: {what} failed; another process probably died or "
                f"stopped responding (collective timeout {self.timeout_s:g} s): {str(exc).splitlines()[0]}; "
                "the first failing rank's log shows the cause"
            ) from exc

    def destroy(self) -> None:
        """Tear the process group down (safe to call twice or with one process)."""
        if self.backend is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class _CallRouter(nn.Module):
    """Routes ``router(*args, _call=name, **kwargs)`` to ``module.<name>(*args, **kwargs)``.

    DDP only synchronises gradients of passes that go through its own ``forward``; this
    lets any entry point of the wrapped module (not just ``forward``) take that path.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, _call: str = "forward", **kwargs: Any) -> Any:
        return getattr(self.module, _call)(*args, **kwargs)


def ddp_call(wrapped: nn.Module, name: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``module.<name>(*args, **kwargs)`` of a module returned by :meth:`DistEnv.wrap_ddp`.

    With DDP the call goes through DDP's forward, so this pass's gradients are averaged
    over ranks in the next backward; with one process it is a plain method call.

    Example:
        ``logits, out = ddp_call(wrapped, "forward_with_features", images, return_attn=True)``
    """
    if isinstance(wrapped, DistributedDataParallel):
        return wrapped(*args, _call=name, **kwargs)
    return getattr(wrapped, name)(*args, **kwargs)


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The module :meth:`DistEnv.wrap_ddp` was given."""
    if isinstance(wrapped, DistributedDataParallel):
        inner = wrapped.module
        return inner.module if isinstance(inner, _CallRouter) else inner
    return wrapped


def is_peer_failure(exc: BaseException) -> bool:
    """True when ``exc`` looks like a collective that failed on a dead or hung peer."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _PEER_FAILURE_MARKERS)


def no_sync(wrapped: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Skip DDP's gradient all-reduce for the forward+backward inside (accumulation micro-steps)."""
    if isinstance(wrapped, DistributedDataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Indices of ``n`` items this rank handles: a strided shard, no padding, no duplicates."""
    return range(rank, n, world_size)


class _GatherWithGrad(torch.autograd.Function):
    """Autograd core of :func:`all_gather_with_grad`; see there for the gradient convention."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:  # type: ignore[override]
        with env.peer_failures("all_gather_with_grad"):
            local_shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
            shapes = [torch.empty_like(local_shape) for _ in range(env.world_size)]
            dist.all_gather(shapes, local_shape)
            sizes = [[int(v) for v in shape.tolist()] for shape in shapes]
            if any(shape[1:] != sizes[env.rank][1:] for shape in sizes):
                # Every rank sees the same shapes, so every rank raises here together.
                raise TrainingError(
                    f"all_gather_with_grad: ranks hold tensors of shapes {[tuple(s) for s in sizes]}; only the "
                    "first (batch) dimension may differ between ranks"
                )
            rows = [shape[0] for shape in sizes]
            longest = max(rows)
            local = tensor.contiguous()
            if local.shape[0] < longest:  # pad to the longest slice; all_gather needs equal shapes
                padded = local.new_zeros((longest, *local.shape[1:]))
                padded[: local.shape[0]] = local
                local = padded
            parts = [torch.empty_like(local) for _ in range(env.world_size)]
            dist.all_gather(parts, local)
        ctx.env = env
        ctx.start = sum(rows[: env.rank])
        ctx.stop = ctx.start + rows[env.rank]
        return torch.cat([part[:n] for part, n in zip(parts, rows)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        total = grad.clone(memory_format=torch.contiguous_format)
        with ctx.env.peer_failures("all_gather_with_grad (backward)"):
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[ctx.start : ctx.stop], None


def all_gather_with_grad(tensor: torch.Tensor, env: DistEnv | None = None) -> torch.Tensor:
    """Concatenate every rank's ``[b_r, ...]`` tensor along dim 0, in rank order, keeping gradients.

    The result ``[sum_r b_r, ...]`` is the same on every rank (for the contrastive loss over
    the global batch). Per-rank sizes ``b_r`` may differ (a rank that dropped unreadable
    images, even to 0 rows); the other dimensions and the dtype must agree. With one process
    (or ``env`` not distributed) ``tensor`` itself is returned: no copy, no collective.

    Gradient convention: the backward pass SUMS the gradient of the gathered tensor over all
    ranks and hands this rank's rows of the sum to ``tensor``. Taken together with DDP,
    which AVERAGES parameter gradients over the N ranks, training minimises
    ``(1/N) * sum_r L_r``, where ``L_r`` is the loss rank ``r`` computes (for parameters
    reached through the gathered tensor and for those, like ``logit_scale``, used directly).
    So, for N processes to match one process holding the global batch:

    - either every rank computes the SAME global loss ``L`` from the gathered tensors (the
      simple case; ``(1/N) * N * L = L``): call the loss as one process would, no scaling;
    - or rank ``r`` computes only its own rows' share, and the shares must sum to N times the
      global loss: for a mean over B global rows, ``L_r = (N / B) * sum_{i in rank r} l_i``.

    Every rank must call this the same number of times, in the same order, and backpropagate
    through every result (the backward is a collective too). Integer tensors (labels) can be
    gathered as well; they carry no gradient.

    Args:
        tensor: This rank's ``[b_r, ...]`` slice, on this rank's device.
        env: The job's :class:`DistEnv`; None means torch's default process group when one is
            initialised with more than one process, else a single process.

    Returns:
        ``[sum_r b_r, ...]``: rank 0's rows first, then rank 1's, ...
    """
    if env is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return tensor
        env = DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), device=tensor.device,
                      backend=str(dist.get_backend()))
    if not env.is_distributed:
        return tensor
    if tensor.dim() == 0:
        raise TrainingError("all_gather_with_grad needs a tensor with a batch dimension, got a 0-d tensor")
    out: torch.Tensor = _GatherWithGrad.apply(tensor, env)
    return out


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from None


def launcher_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int, str]:
    """Read rank, world size and local rank from torchrun's or SLURM's environment.

    torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; a plain ``srun`` launch sets
    ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID`` (``MASTER_ADDR`` and ``MASTER_PORT``
    must then be exported by the batch script). Nothing set means one process.

    Returns:
        ``(rank, world_size, local_rank, launcher)`` with launcher in
        ``{"torchrun", "slurm", "single"}``.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and _int_env(env, "SLURM_STEP_NUM_TASKS") > 1:
        # SLURM_STEP_NUM_TASKS is set by srun only, so a command run straight in the batch
        # script of a many-task allocation stays a single process instead of waiting forever.
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_STEP_NUM_TASKS")
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
    else:
        return 0, 1, 0, "single"
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"inconsistent launcher environment: rank {rank}, world size {world}, local rank {local}")
    if world > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
        if missing:
            raise ConfigError(
                f"{launcher} launch with {world} processes but {', '.join(missing)} not set; "
                "export MASTER_ADDR (first node's host name) and MASTER_PORT (a free port) before srun"
            )
    return rank, world, local, launcher


def _resolve_device(device: str, local_rank: int, launcher: str = "single") -> torch.device:
    """The device of this process: CPU, or the GPU of its local rank among those it sees.

    Under ``torchrun`` every process of a node sees the same GPUs, so local rank ``r``
    takes GPU ``r`` and needs ``r < device_count``. Under ``srun`` each task may see only
    its own GPUs (``--gpus-per-task=1``, ``--gpu-bind=single:1``): a task that sees exactly
    one GPU takes it, whatever its local rank. Anything else with ``r >= device_count`` is
    an error; two ranks that still land on one physical GPU are caught after the process
    group is up (:func:`_check_distinct_gpus`).
    """
    choices = ("auto", "cpu", "cuda")
    if device not in choices:
        raise ConfigError(f"unknown device {device!r}; valid: {', '.join(choices)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is visible; use device=cpu or auto")
    count = torch.cuda.device_count()
    index = local_rank
    if local_rank >= count:
        if launcher != "slurm" or count != 1:
            hint = ("give each task one GPU (srun --gpus-per-task=1) or start at most that many tasks per node"
                    if launcher == "slurm" else "start at most that many processes per node (--nproc_per_node)")
            raise ConfigError(f"local rank {local_rank} has no GPU: this process sees {count}; {hint}")
        index = 0  # srun bound this task to its own single GPU
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _duplicate_gpus(places: list[tuple[str, str]]) -> str | None:
    """Ranks that share one physical GPU, from every rank's ``(host, gpu uuid)``; None when all differ."""
    first: dict[tuple[str, str], int] = {}
    for rank, place in enumerate(places):
        if place in first:
            return f"ranks {first[place]} and {rank} both run on GPU {place[1]} of host {place[0]}"
        first[place] = rank
    return None


def _check_distinct_gpus(env: DistEnv) -> None:
    """Fail clearly when two ranks of a CUDA job were given the same GPU (no binding, too many tasks)."""
    if env.device.type != "cuda" or not env.is_distributed:
        return
    uuid = getattr(torch.cuda.get_device_properties(env.device), "uuid", None)
    places = env.all_gather_object((socket.gethostname(), str(uuid if uuid is not None else env.device)))
    clash = _duplicate_gpus(places)
    if clash is not None:
        env.destroy()
        raise ConfigError(f"{clash}; give every process its own GPU (torchrun --nproc_per_node <= GPUs per node, "
                          "or srun --gpus-per-task=1 / --gpu-bind=single:1)")


def set_tf32(enabled: bool) -> None:
    """Let float32 matmuls and convolutions on CUDA use TF32 tensor cores (``enabled``) or not.

    Process-wide (``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``);
    changes nothing on the CPU. TF32 keeps float32's range with a 10-bit mantissa in the
    products (sums stay float32): several times faster on A100/H100-class GPUs.
    """
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def init_distributed(device: str = "auto", timeout_s: float = 1800.0, *, tf32: bool = True) -> DistEnv:
    """Join the job this process was launched into (or stand alone) and pick its device.

    Args:
        device: ``"auto"`` (CUDA when visible, else CPU), ``"cpu"`` or ``"cuda"``; each
            process takes the GPU of its local rank, or under ``srun`` the one GPU its task
            sees (see :func:`_resolve_device`).
        timeout_s: Seconds a collective may wait for the other ranks before raising; this
            is what turns a dead or hung rank into an error instead of a hang.
        tf32: On a CUDA device, allow TF32 for float32 matmuls and convolutions
            (:func:`set_tf32`); ignored on the CPU.

    Returns:
        The :class:`DistEnv`; backend ``None`` for a single process, ``"nccl"`` on CUDA,
        ``"gloo"`` otherwise.
    """
    if not timeout_s > 0:
        raise ConfigError(f"distributed timeout must be > 0 seconds; got {timeout_s}")
    rank, world, local, launcher = launcher_env()
    dev = _resolve_device(device, local, launcher)
    if dev.type == "cuda":
        set_tf32(tf32)
    if world == 1:
        return DistEnv(device=dev, timeout_s=timeout_s)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    logger.info("process group up: %s, rank %d of %d (%s), device %s", backend, rank, world, launcher, dev)
    env = DistEnv(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend, timeout_s=timeout_s)
    _check_distinct_gpus(env)
    return env

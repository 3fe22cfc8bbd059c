"""The training loop: logs, best checkpoint, accumulation, exact resume, signals, non-finite guard."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from robustft.distributed import ddp_call
from robustft.engine import (
    TrainingInterrupted,
    TrainSettings,
    default_param_groups,
    fit,
    list_checkpoints,
    load_best,
    per_rank_micro_batch,
)
from robustft.errors import CheckpointError, ConfigError, TrainingError

N_CLASSES = 3


# ----------------------------------------------------------------------------- toys (also used by test_distributed)
class ToyData(Dataset):
    """``n`` seeded 3x4x4 images whose class shifts the mean, as the trainer's batch dicts."""

    def __init__(self, n: int = 24, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % N_CLASSES
        self.images = (torch.rand(n, 3, 4, 4, generator=gen) * 0.5 + self.labels.view(-1, 1, 1, 1) * 0.2).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


class ToySampler(Sampler[int]):
    """Seeded per-epoch permutation, strided over ranks; ``skip`` optional like the data layer's."""

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0, with_skip: bool = True) -> None:
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.epoch, self.skip = 0, 0
        if not with_skip:
            self.set_epoch = self._set_epoch_no_skip  # type: ignore[method-assign]

    def set_epoch(self, epoch: int, *, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _set_epoch_no_skip(self, epoch: int) -> None:
        self.epoch, self.skip = epoch, 0

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100 + self.epoch))
        return iter(order[self.rank :: self.world][self.skip :].tolist())

    def __len__(self) -> int:
        return self.n // self.world - self.skip


def toy_loader(batch: int, *, rank: int = 0, world: int = 1, n: int = 24, with_skip: bool = True) -> DataLoader:
    data = ToyData(n)
    return DataLoader(data, batch_size=batch, sampler=ToySampler(n, rank, world, with_skip=with_skip), drop_last=True)


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh())
        self.head = nn.Linear(16, N_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ToyMethod(nn.Module):
    """A stand-in Method: CE + feature distillation through DDP-routed passes, optional random draws.

    With ``noisy`` it perturbs images with its own generator and with the global torch
    RNG, so an exact resume needs both random states back.
    """

    def __init__(self, noisy: bool = False, seed: int = 0, poison_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.student = ToyNet()
        self.teacher = ToyNet().requires_grad_(False).eval()
        self.noisy, self.poison_step, self.calls = noisy, poison_step, 0
        self.gen = torch.Generator().manual_seed(1234 + seed)
        object.__setattr__(self, "wrapped", None)  # a plain attribute, not a registered submodule

    def trainable_module(self) -> nn.Module:
        return self.student

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return default_param_groups(self.student, weight_decay)

    def set_ddp_module(self, wrapped: nn.Module | None) -> None:
        object.__setattr__(self, "wrapped", wrapped)

    def extra_state(self) -> dict[str, Tensor]:
        return {"gen": self.gen.get_state()}

    def load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        self.gen.set_state(state["gen"])

    def train(self, mode: bool = True) -> ToyMethod:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        net = self.wrapped if self.wrapped is not None else self.student
        x = batch["image"]
        if self.noisy:
            x = x + 0.1 * torch.randn(x.shape, generator=self.gen) + 0.05 * torch.randn(x.shape)
        # Two passes through DDP in one step, and a gradient taken inside forward (as a
        # student CAM does), like the real methods.
        feats = ddp_call(net, "features", x)
        logits = ddp_call(net, "classify", feats)
        ce = F.cross_entropy(logits, batch["label"])
        saliency = torch.autograd.grad(logits.gather(1, batch["label"][:, None]).sum(), feats, retain_graph=True)[0]
        with torch.no_grad():
            target = self.teacher.features(x)
        fd = F.mse_loss(feats, target) + 0.1 * (saliency.detach().abs() * feats).mean()
        self.calls += 1
        loss = ce + 0.5 * fd
        if self.poison_step is not None and self.calls >= self.poison_step:
            loss = loss * float("nan")
        return {"loss": loss, "logits": logits, "loss_task": ce.detach(), "loss_dist": fd.detach()}


def settings(**kw: Any) -> TrainSettings:
    base = dict(epochs=2, lr=0.05, weight_decay=0.1, schedule="onecycle", warmup_frac=0.2, log_every=1,
                tensorboard=False)
    base.update(kw)
    return TrainSettings(**base)  # type: ignore[arg-type]


def weights(method: ToyMethod) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in method.student.state_dict().items()}


def scramble(method: ToyMethod) -> None:
    """Overwrite the student's weights (the teacher is rebuilt identically, as the pipeline does)."""
    with torch.no_grad():
        for p in method.student.parameters():
            p.normal_()


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    """JSONL records without the wall-clock fields (time, images/s)."""
    out = []
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("time"), record.pop("images_per_s", None)
        out.append(record)
    return out


class Stop(Exception):
    """Stands in for kill -9 after a given step (no checkpoint written at that moment)."""


def stop_after(step: int) -> Any:
    def hook(s: int) -> None:
        if s == step:
            raise Stop

    return hook


def val_fn(method: ToyMethod) -> Any:
    data = ToyData(24, seed=5)

    def evaluate(epoch: int) -> dict[str, float]:
        method.eval()
        with torch.no_grad():
            acc = (method.student(data.images).argmax(1) == data.labels).float().mean().item()
        return {"top1": 100 * acc, "loss": float(epoch)}

    return evaluate


# ----------------------------------------------------------------------------- tests
def test_fit_logs_every_term_checkpoints_and_best(tmp_path: Path) -> None:
    method = ToyMethod()
    before = weights(method)
    result = fit(method, toy_loader(4), settings(epochs=2, checkpoint_every=4, tensorboard=True),
                 run_dir=tmp_path, evaluate=val_fn(method), progress=False, config={"name": "toy"})
    assert result.step == 12 and result.epoch == 2  # 24 images / 4 per batch = 6 steps per epoch
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000006", "step_00000008", "step_00000012"]  # 4 was pruned (keep_last=3)
    records = train_records(tmp_path)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("loss", "loss_task", "loss_dist", "lr", "beta1", "epoch"):
        assert all(key in r for r in train), key
    assert train[-1]["loss"] < train[0]["loss"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["epoch"] for r in val] == [0, 1] and len(result.history) == 2
    assert result.best_metric == max(h["top1"] for h in result.history)
    best = load_best(tmp_path)
    assert best is not None and best[1]["step"] == result.best_step
    assert any(not torch.equal(before[k], v) for k, v in weights(method).items())
    assert list((tmp_path / "tensorboard").iterdir()), "no TensorBoard event file"
    assert method.wrapped is None  # the DDP handle is released after training


def test_accumulation_and_clipping_match_one_big_batch(tmp_path: Path) -> None:
    # Clipping per micro-step (the reference's bug) or syncing every micro-step would differ.
    a, b = ToyMethod(), ToyMethod()
    kw = dict(epochs=1, clip_grad_norm=0.05)
    fit(a, toy_loader(8), settings(**kw), run_dir=tmp_path / "a", progress=False)
    fit(b, toy_loader(4), settings(accum_steps=2, **kw), run_dir=tmp_path / "b", progress=False)
    for name, value in weights(a).items():
        torch.testing.assert_close(weights(b)[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_skip", [True, False], ids=["sampler-skip", "replay"])
def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path, with_skip: bool) -> None:
    cfg = settings(epochs=2, checkpoint_every=2, accum_steps=2)
    full = ToyMethod(noisy=True)
    fit(full, toy_loader(4, with_skip=with_skip), cfg, run_dir=tmp_path / "full", evaluate=val_fn(full),
        progress=False)
    broken = ToyMethod(noisy=True)
    with pytest.raises(Stop):  # dies after step 5 of 6; the newest checkpoint is step 4
        fit(broken, toy_loader(4, with_skip=with_skip), cfg, run_dir=tmp_path / "cut", evaluate=val_fn(broken),
            progress=False, on_step_end=stop_after(5))
    assert list_checkpoints(tmp_path / "cut")[-1].name == "step_00000004"
    torch.manual_seed(999)  # the resumed process starts from an unrelated random state
    again = ToyMethod(noisy=True)
    scramble(again)  # every trained weight must come from the checkpoint
    result = fit(again, toy_loader(4, with_skip=with_skip), cfg, run_dir=tmp_path / "cut", resume=True,
                 evaluate=val_fn(again), progress=False)
    assert result.step == 6
    for name, value in weights(full).items():
        assert torch.equal(weights(again)[name], value), name
    assert train_records(tmp_path / "cut") == train_records(tmp_path / "full")


def test_sigterm_saves_checkpoint_and_resume_completes(tmp_path: Path) -> None:
    cfg = settings(epochs=2, checkpoint_every=0)
    full = ToyMethod(noisy=True)
    fit(full, toy_loader(4), cfg, run_dir=tmp_path / "full", progress=False)

    def preempt(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    method = ToyMethod(noisy=True)
    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        fit(method, toy_loader(4), cfg, run_dir=tmp_path / "cut", progress=False, on_step_end=preempt)
    stopped = info.value.step
    assert stopped in (3, 4)  # the step boundary after the signal
    assert list_checkpoints(tmp_path / "cut")[-1].name == f"step_{stopped:08d}"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    again = ToyMethod(noisy=True)
    scramble(again)
    fit(again, toy_loader(4), cfg, run_dir=tmp_path / "cut", resume=True, progress=False)
    for name, value in weights(full).items():
        assert torch.equal(weights(again)[name], value), name


def test_non_finite_loss_stops_with_terms_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    method = ToyMethod(poison_step=5)
    with pytest.raises(TrainingError, match=r"step 5 .*loss=nan.*loss_task=") as info:
        fit(method, toy_loader(4), settings(checkpoint_every=2), run_dir=tmp_path, progress=False)
    assert "step_00000004" in str(info.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    assert all(torch.isfinite(v).all() for v in weights(method).values())


def test_existing_checkpoints_need_resume_and_resume_without_any_starts_fresh(tmp_path: Path) -> None:
    fit(ToyMethod(), toy_loader(8), settings(epochs=1), run_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        fit(ToyMethod(), toy_loader(8), settings(epochs=1), run_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="total_steps"):
        fit(ToyMethod(), toy_loader(8), settings(epochs=3), run_dir=tmp_path, resume=True, progress=False)
    result = fit(ToyMethod(), toy_loader(8), settings(epochs=1), run_dir=tmp_path / "new", resume=True,
                 progress=False)
    assert result.step == 3


def test_unwritable_run_dir_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    method = ToyMethod()
    before = weights(method)
    with pytest.raises(CheckpointError, match="file"):
        fit(method, toy_loader(8), settings(epochs=1), run_dir=blocker / "run", progress=False)
    assert all(torch.equal(before[k], v) for k, v in weights(method).items())


def test_bf16_autocast_trains(tmp_path: Path) -> None:
    result = fit(ToyMethod(), toy_loader(8), settings(epochs=1, precision="bf16"), run_dir=tmp_path, progress=False)
    records = [r for r in train_records(tmp_path) if r["kind"] == "train"]
    assert result.step == 3 and all(r["loss"] == r["loss"] for r in records)


def test_per_rank_micro_batch() -> None:
    assert per_rank_micro_batch(512, 8, 2) == 32
    assert per_rank_micro_batch(8, 1, 1) == 8
    with pytest.raises(ConfigError, match=r"512 is not divisible by world size 3 x accumulation steps 2 = 6"):
        per_rank_micro_batch(512, 3, 2)
    with pytest.raises(ConfigError, match="positive integer"):
        per_rank_micro_batch(0, 1, 1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("schedule", "linear", "did you mean"), ("precision", "fp16", "valid: bf16, fp32"), ("lr", 0.0, "lr"),
     ("accum_steps", 0, "accum_steps"), ("warmup_frac", 1.5, "warmup_frac"), ("epochs", float("nan"), "epochs")],
)
def test_settings_reject_bad_values(field: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings(**{field: value})


def test_loader_shorter_than_accumulation_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fewer than accum_steps=4"):
        fit(ToyMethod(), toy_loader(8), settings(accum_steps=4), run_dir=tmp_path, progress=False)


@pytest.mark.slow  # imports open_clip and the methods (seconds); the run itself is ~1 s
def test_flagship_method_resumes_exactly(tmp_path: Path) -> None:
    """The real fd-refill method (masks from its own generator) through the same kill/resume cycle."""
    import copy
    import math

    from robustft.methods import MethodOptions, build_method
    from robustft.model.classifier import ClassifierHead, ImageClassifier
    from robustft.model.clip import load_clip

    bundle = load_clip("robustft-tiny", "none")
    size = bundle.preprocess.image_size
    head = ClassifierHead.from_zeroshot(F.normalize(torch.randn(N_CLASSES, bundle.model.visual.output_dim), dim=-1),
                                        math.log(10.0))
    zeroshot = ImageClassifier(bundle.model.visual, head, bundle.preprocess)
    images = torch.rand(12, 3, size, size, generator=torch.Generator().manual_seed(0))
    data = [{"image": images[i], "label": torch.tensor(i % N_CLASSES), "index": torch.tensor(i)} for i in range(12)]

    def run(stop: int | None, resume: bool) -> nn.Module:
        method = build_method("fd-refill", copy.deepcopy(zeroshot), copy.deepcopy(zeroshot), MethodOptions(seed=1))
        loader = DataLoader(data, batch_size=4, sampler=ToySampler(12), drop_last=True)  # type: ignore[arg-type]
        cfg = settings(epochs=2, lr=1e-3, checkpoint_every=2)
        folder = tmp_path / ("full" if stop is None and not resume else "cut")
        with pytest.raises(Stop) if stop else contextlib.nullcontext():
            fit(method, loader, cfg, run_dir=folder, resume=resume, progress=False,
                on_step_end=stop_after(stop) if stop else None)
        return method

    full = run(None, False)
    run(5, False)
    resumed = run(None, True)
    for (name, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name

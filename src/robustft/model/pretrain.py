"""Contrastive pretraining of the demo's tiny CLIP on the synthetic world, with a cache.

The demo needs a robust pre-trained model that no one can download: this module trains the
``robustft-demo`` architecture (an ordinary open_clip CLIP config) from scratch on the
world's image-caption pairs (:func:`robustft.data.synthetic.make_pretraining_pairs`),
fresh pairs every step, with the symmetric InfoNCE loss of CLIP. The weights are cached as
safetensors + JSON under ``<cache>/pretrained/<key>/``, keyed by the world version and
config, the architecture and every pretraining setting, so only the first run pays.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from robustft.data.synthetic import (
    PRETRAINING_FIELDS, TEMPLATES, WORLD_VERSION, WorldConfig, default_cache_dir, make_pretraining_pairs, make_split,
)
from robustft.errors import ConfigError
from robustft.model.clip import ClipBundle, load_clip
from robustft.safeio import read_json, save_tensors, write_json

logger = logging.getLogger(__name__)

__all__ = ["DEMO_ARCH", "PretrainSettings", "pretrain_clip", "load_or_pretrain_demo_clip", "pretrain_cache_key",
           "read_pretrain_metrics", "images_to_tensor"]

DEMO_ARCH = "robustft-demo"
_CONFIG_FILE = Path(__file__).parent / "_configs" / f"{DEMO_ARCH}.json"
_MONITOR_SEED = 7_777_777  # monitoring images come from their own seed, never from a written split


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides the pretrained weights (all of it is in the cache key).

    Attributes:
        steps: Optimizer steps; every step draws ``batch_size`` fresh image-caption pairs.
        batch_size: Pairs per step (the contrastive loss sees batch_size - 1 negatives).
        lr: Peak AdamW learning rate, reached after ``warmup`` steps, then cosine to 0.
        weight_decay: AdamW decay on matrices only (not on gains, biases, logit_scale).
        warmup: Linear warm-up steps.
        seed: Seeds the initial weights and the stream of pairs.
        eval_every: Steps between zero-shot checks (0: only at the end).
        monitor_size: Images per zero-shot check (from the ID distribution, own seed).
        arch: open_clip architecture name.
    """

    steps: int = 360
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 20
    seed: int = 0
    eval_every: int = 60
    monitor_size: int = 300
    arch: str = DEMO_ARCH

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0 or self.warmup < 0 or self.monitor_size < 1:
            raise ConfigError(f"invalid pretraining settings {self}: need steps >= 1, batch_size >= 2, lr > 0, "
                              "warmup >= 0, monitor_size >= 1")


def images_to_tensor(images: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N, H, W, 3] numpy images -> normalised float [N, 3, H, W] model input."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@contextlib.contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    saved = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _random_init(arch: str, seed: int, device: str | torch.device) -> ClipBundle:
    if arch == DEMO_ARCH and arch not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_FILE)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        return load_clip(arch, "none", device=device)


def _zeroshot_weights(bundle: ClipBundle, classnames: tuple[str, ...], device: str | torch.device) -> torch.Tensor:
    """Class embeddings [C, D]: per class, the mean of its normalised template embeddings, renormalised."""
    texts = [t.format(c) for c in classnames for t in TEMPLATES]
    emb = F.normalize(bundle.model.encode_text(bundle.tokenizer(texts).to(device)), dim=-1)
    return F.normalize(emb.view(len(classnames), len(TEMPLATES), -1).mean(1), dim=-1)


@torch.no_grad()
def _zeroshot_accuracy(bundle: ClipBundle, world: WorldConfig, monitor: dict[str, Any],
                       device: str | torch.device) -> dict[str, float]:
    was_training = bundle.model.training
    bundle.model.eval()
    weights = _zeroshot_weights(bundle, world.classes, device)
    out = {}
    for name, (x, y) in monitor.items():
        feats = F.normalize(bundle.model.encode_image(x.to(device)), dim=-1)
        out[name] = (feats @ weights.T).argmax(1).cpu().eq(y).float().mean().item()
    bundle.model.train(was_training)
    return out


def _optimizer(model: torch.nn.Module, s: PretrainSettings) -> tuple[torch.optim.Optimizer, Any]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                            lr=s.lr, betas=(0.9, 0.98), eps=1e-6)

    def factor(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(1, s.steps - s.warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE; pairs with identical captions count as positives of each other (soft targets)."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    key = torch.tensor([ids[c] for c in captions], device=img.device)
    target = (key[:, None] == key[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _monitor_sets(world: WorldConfig, bundle: ClipBundle, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed zero-shot check sets: the ID distribution ("id") and the pretraining one ("pairs")."""
    mean, std = bundle.preprocess.mean, bundle.preprocess.std
    split = make_split(world, "id", n=n, seed=_MONITOR_SEED)
    images, captions = make_pretraining_pairs(world, n, seed=_MONITOR_SEED)
    # Every caption names exactly one class colour; that is the pair's label.
    labels = [next(i for i, c in enumerate(world.classes) if f" {c} " in f" {cap} ") for cap in captions]
    return {"id": (images_to_tensor(split.images, mean, std), torch.from_numpy(split.labels)),
            "pairs": (images_to_tensor(images, mean, std), torch.tensor(labels))}


def pretrain_clip(world_cfg: WorldConfig, settings: PretrainSettings = PretrainSettings(), *,
                  device: str | torch.device = "cpu", progress: bool = True,
                  num_threads: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train ``settings.arch`` from scratch, contrastively, on the world's image-caption pairs.

    Args:
        world_cfg: The world; its ``image_size`` must equal the architecture's.
        settings: Steps, batch size, learning rate, seed, ...
        device: Torch device.
        progress: Show a tqdm bar with the loss and the last zero-shot accuracy.
        num_threads: ``torch.set_num_threads`` for the duration (None: leave as is).

    Returns:
        ``(state_dict, metrics)``: open_clip parameter names -> CPU tensors, and a JSON-able
        dict with the loss and zero-shot accuracy history, the final zero-shot accuracy on
        monitoring images of the ``id`` distribution, and the wall time in seconds.
    """
    with _threads(num_threads):
        bundle = _random_init(settings.arch, settings.seed, device)
        if bundle.preprocess.image_size != world_cfg.image_size:
            raise ConfigError(f"world image_size {world_cfg.image_size} != {settings.arch} input size "
                              f"{bundle.preprocess.image_size}; set WorldConfig(image_size={bundle.preprocess.image_size})")
        return _train(bundle, world_cfg, settings, device, progress)


def _train(bundle: ClipBundle, world: WorldConfig, s: PretrainSettings, device: str | torch.device,
           progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    model, mean, std = bundle.model.train(), bundle.preprocess.mean, bundle.preprocess.std
    opt, sched = _optimizer(model, s)
    monitor = _monitor_sets(world, bundle, s.monitor_size)
    history: list[dict[str, Any]] = []
    start, cpu_start, zs = time.perf_counter(), time.process_time(), {}
    bar = tqdm(range(s.steps), desc="pretrain tiny CLIP", disable=not progress, leave=False)
    for step in bar:
        images, captions = make_pretraining_pairs(world, s.batch_size, seed=s.seed * 1_000_003 + step)
        x = images_to_tensor(images, mean, std).to(device)
        img, txt = model.encode_image(x), model.encode_text(bundle.tokenizer(captions).to(device))
        loss = _contrastive_loss(img, txt, model.logit_scale.exp(), captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        row: dict[str, Any] = {"step": step + 1, "loss": round(loss.item(), 4)}
        if (s.eval_every and (step + 1) % s.eval_every == 0) or step + 1 == s.steps:
            zs = _zeroshot_accuracy(bundle, world, monitor, device)
            row.update({f"zeroshot_{k}": round(v, 4) for k, v in zs.items()})
            logger.info("pretrain step %d/%d loss %.3f zero-shot %s", step + 1, s.steps, loss.item(), zs)
        history.append(row)
        bar.set_postfix(loss=f"{loss.item():.3f}", **{f"zs_{k}": f"{v:.2f}" for k, v in zs.items()})
    metrics = {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1),
               "threads": torch.get_num_threads(), "final_loss": history[-1]["loss"],
               "zeroshot": zs, "logit_scale": round(model.logit_scale.exp().item(), 2), "history": history}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state, metrics


def pretrain_cache_key(world_cfg: WorldConfig, settings: PretrainSettings) -> str:
    """Hash of the world version, the world fields that shape the pretraining pairs, the architecture and settings.

    Fine-tuning knobs of the world (rho, split sizes, fine-tuning object sizes, ...) are left
    out on purpose: changing them does not change the pretrained weights.
    """
    arch_cfg = open_clip.get_model_config(settings.arch) if settings.arch != DEMO_ARCH else json.loads(
        _CONFIG_FILE.read_text())
    blob = json.dumps({"world": world_cfg.key(PRETRAINING_FIELDS), "arch_cfg": arch_cfg, "settings": asdict(settings)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_pretrain_demo_clip(world_cfg: WorldConfig, cache_dir: str | Path | None = None, *,
                               settings: PretrainSettings = PretrainSettings(), device: str | torch.device = "cpu",
                               progress: bool = True, num_threads: int | None = None) -> ClipBundle:
    """The pretrained demo CLIP: from ``<cache>/pretrained/<key>/`` if there, else trained and cached.

    Args:
        world_cfg: The world the model is pretrained on.
        cache_dir: Cache root; defaults to :func:`robustft.data.synthetic.default_cache_dir`.
        settings: Pretraining settings (part of the cache key).
        device: Torch device for training and for the returned model.
        progress: Show a progress bar while training.
        num_threads: ``torch.set_num_threads`` while training (None: leave as is).

    Returns:
        A :class:`ClipBundle` in eval mode whose ``pretrained`` is the cached weights file
        (so ``load_clip(bundle.name, bundle.pretrained)`` rebuilds the same model).
    """
    folder = Path(cache_dir or default_cache_dir()) / "pretrained" / pretrain_cache_key(world_cfg, settings)
    weights, meta_file = folder / "model.safetensors", folder / "meta.json"
    if not (weights.is_file() and meta_file.is_file()):
        logger.info("pretraining %s on the synthetic world (cache miss: %s)", settings.arch, folder)
        state, metrics = pretrain_clip(world_cfg, settings, device=device, progress=progress, num_threads=num_threads)
        save_tensors(weights, state)
        meta = {"world_version": WORLD_VERSION, "world": world_cfg.to_dict(), "settings": asdict(settings),
                "metrics": metrics}
        write_json(meta_file, meta)  # written last: its presence marks a complete cache entry
    else:
        logger.info("loading the pretrained %s from %s", settings.arch, folder)
    if settings.arch == DEMO_ARCH and DEMO_ARCH not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_FILE)
    with torch.random.fork_rng(devices=[]):  # open_clip's random init before loading must not move the caller's RNG
        bundle = load_clip(settings.arch, str(weights), device=device)
    return replace(bundle, pretrained=str(weights))


def read_pretrain_metrics(world_cfg: WorldConfig, settings: PretrainSettings = PretrainSettings(),
                          cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The metrics stored beside cached weights (training time, zero-shot history)."""
    folder = Path(cache_dir or default_cache_dir()) / "pretrained" / pretrain_cache_key(world_cfg, settings)
    return read_json(folder / "meta.json")["metrics"]

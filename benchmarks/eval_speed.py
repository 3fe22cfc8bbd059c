"""Evaluation throughput: robustft's ``evaluate`` against a plain open_clip forward.

Both sides classify the same pre-made tensor images in [0, 1] with the same random-weight
model and the same [C, D] head:

- plain:    normalise, ``model.encode_image``, L2-normalise, matmul with the head (no loader);
- robustft: ``robustft.evaluation.evaluate`` over a dataset of those tensors (non-padded
            loader, ``ImageClassifier`` forward, top-1/top-5 scoring, progress off).

Each side runs ``--repeats`` times, alternating, and the best time of each is kept
(least disturbed by other load on the machine; on a shared machine, raise ``--repeats``:
single timings vary by 2x there). The target is robustft within 5% of plain.

Examples::

    python benchmarks/eval_speed.py                                  # ViT-B-32, CPU, ~1-2 min
    python benchmarks/eval_speed.py --model robustft-tiny --batches 8 --repeats 5
    python benchmarks/eval_speed.py --device cuda --batch 256 --batches 20
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from robustft.data.datasets import EvalSet
from robustft.distributed import DistEnv
from robustft.evaluation import evaluate
from robustft.model import ClassifierHead, ImageClassifier, PreprocessCfg

NUM_CLASSES = 1000


class TensorImages(Dataset):
    """Pre-made images [N, 3, S, S] as ``(image, label, index)`` items."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images[i], i % NUM_CLASSES, i


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (robustft-tiny is registered too)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (best is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--workers", type=int, default=0,
                        help="loader workers of the robustft side (use some on a GPU, where collation shows)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = open_clip.create_model(args.model, pretrained=None).to(device).eval()
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    preprocess = PreprocessCfg(image_size=int(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    dim = model.visual.output_dim
    head_weight = 100.0 * F.normalize(torch.randn(NUM_CLASSES, dim), dim=-1).to(device)
    images = torch.rand(args.batch * args.batches, 3, size, size)
    mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)

    def plain() -> None:
        with torch.inference_mode():
            for start in range(0, len(images), args.batch):
                x = (images[start : start + args.batch].to(device) - mean) / std
                logits = F.normalize(model.encode_image(x), dim=-1) @ head_weight.T
                logits.argmax(dim=-1)

    classifier = ImageClassifier(model.visual, ClassifierHead(head_weight), preprocess).to(device).eval()
    eval_set = EvalSet("bench", TensorImages(images), [[c] for c in range(NUM_CLASSES)], None, "bench", NUM_CLASSES)
    env = DistEnv(device=device)

    def ours() -> None:
        evaluate(classifier, [eval_set], dist_env=env, batch_size=args.batch, workers=args.workers, progress=False)

    # Warm-up (allocator, kernels, first-call dispatch) on one batch of each path.
    with torch.inference_mode():
        model.encode_image((images[: args.batch].to(device) - mean) / std)
        classifier(images[: args.batch].to(device))
    best = {"plain": float("inf"), "robustft": float("inf")}
    for _ in range(args.repeats):
        best["plain"] = min(best["plain"], _timed(plain, device))
        best["robustft"] = min(best["robustft"], _timed(ours, device))
    n = len(images)
    rate = {name: n / seconds for name, seconds in best.items()}
    print(f"model {args.model} on {device}, {args.threads} thread(s), {args.batches} x {args.batch} images, "
          f"best of {args.repeats}")
    print(f"plain open_clip encode_image + matmul: {rate['plain']:8.2f} images/s")
    print(f"robustft evaluate:                     {rate['robustft']:8.2f} images/s")
    ratio = rate["robustft"] / rate["plain"]
    print(f"ratio robustft / plain: {ratio:.3f} ({'within' if ratio >= 0.95 else 'OUTSIDE'} the 5% target)")


if __name__ == "__main__":
    main()

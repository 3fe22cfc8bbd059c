"""`robustft soup`: uniform and greedy model soups of saved runs.

The runs (their classifiers) must share the architecture, the class list (in order) and
the weights' names and shapes; anything else is refused before any work, naming the run
and the difference. A greedy soup chooses its ingredients on the runs' held-out split,
rebuilt from the first trained run's config; every run must hold out the same images
(same training data, ``data.holdout``, ``data.limit_train`` and seed: the split is drawn
with the run's seed), so that no ingredient trained on the images the soup is chosen on.
A zero-shot run (``robustft zeroshot``) trained on nothing and may join any soup.

The soup is written like any classifier run (``classifier.json`` + ``.safetensors``, with
the first trained run's config and test sets in its metadata, so ``robustft eval --run
SOUP`` works as for a training run), plus ``soup.json``, the selection log.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustft.config import RunConfig, config_from_dict
from robustft.data.datasets import IMAGENET_HOLDOUT, EvalSet
from robustft.distributed import DistEnv, init_distributed
from robustft.errors import CheckpointError, ConfigError, RobustFTError
from robustft.evaluation.evaluate import evaluate
from robustft.evaluation.soup import SoupResult, greedy_soup, uniform_soup
from robustft.methods import METHODS
from robustft.methods.catalogue import trains
from robustft.model import ImageClassifier, load_classifier, save_classifier
from robustft.model.serialization import META_FILE, TENSORS_FILE, read_classifier_meta
from robustft.ops.weights import assert_compatible
from robustft.pipeline.data import build_run_data, world_paths
from robustft.pipeline.runs import check_run_dir, prepare_run_dir
from robustft.safeio import load_tensors, write_json

__all__ = ["SOUP_FILE", "run_soup", "split_definition"]

logger = logging.getLogger(__name__)

SOUP_FILE = "soup.json"
_SHOWN = 6  # tensor names listed per kind of difference
_COPIED_EXTRA = ("config", "folders", "folder_classes", "test_sets")  # what `eval --run SOUP` reads


@dataclass
class _Run:
    arg: str  # as given on the command line
    folder: Path  # where its classifier is
    meta: dict[str, Any]

    @property
    def extra(self) -> dict[str, Any]:
        extra = self.meta.get("extra")
        return extra if isinstance(extra, dict) else {}


# ----------------------------------------------------------------------------- the runs and their checks
def _classifier_dir(run: str) -> Path:
    """The run's own classifier; a clear error for a WiSE-FT run, which has none at its top level."""
    path = Path(run)
    if path.is_dir() and not (path / META_FILE).is_file():
        alphas = sorted(p.parent.name for p in path.glob(f"wise/alpha_*/{META_FILE}"))
        if alphas:
            raise CheckpointError(f"{run} is a WiSE-FT run and has no classifier of its own, only interpolations; "
                                  f"give one of them as the ingredient, e.g. {path / 'wise' / alphas[-1]} "
                                  f"(it has {', '.join(alphas)})")
    return path


def _tensor_file(folder: Path) -> Path:
    return folder / TENSORS_FILE if folder.is_dir() else folder.with_suffix(".safetensors")


def _listing(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (f", ... ({len(items)} in all)" if len(items) > _SHOWN else "")


def _arch(meta: dict[str, Any]) -> str:
    return repr(meta["model_name"]) + (" (QuickGELU)" if meta.get("quick_gelu") else "")


def _check_same(first: _Run, run: _Run) -> None:
    """Refuse ``run`` when its architecture, classes or weights differ from ``first``'s."""
    a, b = first.meta, run.meta
    if _arch(a) != _arch(b):
        raise CheckpointError(f"{run.arg} is a {_arch(b)} model and {first.arg} a {_arch(a)} one; a soup averages "
                              "runs of one architecture, fine-tuned from the same start")
    if a.get("preprocess") != b.get("preprocess"):
        pa, pb = a.get("preprocess") or {}, b.get("preprocess") or {}
        keys = sorted(k for k in {*pa, *pb} if pa.get(k) != pb.get(k))
        shown = "; ".join(f"{k} {pb.get(k)!r} vs {pa.get(k)!r}" for k in keys)
        raise CheckpointError(f"{run.arg} preprocesses images unlike {first.arg} ({shown}); a soup averages runs "
                              "of one model and preprocessing")
    ca, cb = list(a["classnames"]), list(b["classnames"])
    if ca != cb:
        if len(ca) != len(cb):
            what = f"{len(cb)} classes, {first.arg} {len(ca)}"
        else:
            i = next(i for i, (x, y) in enumerate(zip(ca, cb)) if x != y)
            what = f"class {i} {cb[i]!r}, {first.arg} {ca[i]!r}"
        raise CheckpointError(f"{run.arg} has another class list than {first.arg} ({run.arg}: {what}); a soup "
                              "averages heads over the same classes in the same order")
    ta, tb = a.get("tensors") or {}, b.get("tensors") or {}
    problems = []
    missing = [k for k in ta if k not in tb]
    extra = [k for k in tb if k not in ta]
    shapes = [f"{k} {tuple(tb[k].get('shape', ()))} vs {tuple(ta[k].get('shape', ()))}"
              for k in ta if k in tb and ta[k].get("shape") != tb[k].get("shape")]
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if extra:
        problems.append(f"extra {_listing(extra)}")
    if shapes:
        problems.append(f"shape {_listing(shapes)}")
    if problems:
        raise CheckpointError(f"{run.arg}'s weights do not fit {first.arg}'s ({'; '.join(problems)}); a soup "
                              "averages runs with the same weights")


def _read_runs(runs: list[str]) -> list[_Run]:
    out = []
    for arg in runs:
        folder = _classifier_dir(arg)
        out.append(_Run(arg, folder, read_classifier_meta(folder)))
    for run in out[1:]:
        _check_same(out[0], run)
        if run.meta.get("pretrained") != out[0].meta.get("pretrained"):
            logger.warning("soup: %s started from %r and %s from %r; averaging runs that did not start from the "
                           "same weights rarely works", run.arg, run.meta.get("pretrained"), out[0].arg,
                           out[0].meta.get("pretrained"))
    return out


# ----------------------------------------------------------------------------- the held-out split (greedy)
def split_definition(cfg: RunConfig) -> dict[str, Any]:
    """What decides which images a run held out: ``{setting: value}``, the same for runs with one split.

    The split (:func:`robustft.data.splits.stratified_holdout`) is drawn with the run's
    ``seed`` from the training images: ImageNet's whole ``train/`` (so ``data.limit_train``
    plays no part; ``data.holdout = -1`` is 10,240), or the first ``data.limit_train``
    images of a folder or of the synthetic world.
    """
    data = cfg.data
    out: dict[str, Any] = {"data.train": data.train}
    if data.train == "imagenet":
        out["data.root"] = data.root
        out["data.paths.imagenet"] = data.paths.get("imagenet")
        out["data.holdout"] = IMAGENET_HOLDOUT if data.holdout == -1 else data.holdout
    else:
        if data.train == "folder":
            out["data.train_dir"] = data.train_dir
        out["data.limit_train"] = data.limit_train
        out["data.holdout"] = data.holdout
    out["seed"] = cfg.seed
    return out


def _config_of(run: _Run) -> RunConfig | None:
    data = run.extra.get("config")
    if data is None:
        return None
    if not isinstance(data, dict):
        raise CheckpointError(f"{run.arg}: extra.config in its {META_FILE} is not a config mapping")
    try:
        return config_from_dict(data)
    except RobustFTError as err:
        raise CheckpointError(f"{run.arg}: its training config (extra.config in {META_FILE}) does not load in "
                              f"this robustft: {err}") from None


def _holdout_plan(runs: list[_Run]) -> tuple[_Run, RunConfig]:
    """The run whose config defines the held-out split; refuses runs whose splits differ or are missing."""
    trained: list[tuple[_Run, RunConfig, dict[str, Any]]] = []
    for run in runs:
        cfg = _config_of(run)
        if cfg is None:
            if not trains(str(run.extra.get("method", ""))) and run.extra.get("method") in METHODS:
                continue  # trained on nothing (the zero-shot classifier), so no held-out image is in its training
            raise ConfigError(f"--greedy: {run.arg} has no training config (extra.config in its {META_FILE}), so "
                              "which images it held out is unknown; give runs written by `robustft train` (or "
                              "`robustft zeroshot`), or drop --greedy for a uniform soup")
        if cfg.data.holdout == 0:
            raise ConfigError(f"--greedy: {run.arg} was trained with data.holdout=0 (no held-out split), so no "
                              "images are left to choose the ingredients on; give runs trained with data.holdout > 0 "
                              "or drop --greedy for a uniform soup")
        trained.append((run, cfg, split_definition(cfg)))
    if not trained:
        raise ConfigError("--greedy: no run was trained by `robustft train` (zero-shot runs only), so there is no "
                          "held-out split to choose the ingredients on; drop --greedy for a uniform soup")
    ref, ref_cfg, ref_split = trained[0]
    for run, _, split in trained[1:]:
        diff = [f"{k} {split.get(k)!r} vs {ref_split.get(k)!r}" for k in dict.fromkeys([*ref_split, *split])
                if split.get(k) != ref_split.get(k)]
        if diff:
            raise ConfigError(f"--greedy: {run.arg} held out other images than {ref.arg} ({'; '.join(diff)}); a "
                              "greedy soup is chosen on images no ingredient trained on, so give runs with the same "
                              "training data, data.holdout and seed (the split is drawn with the run's seed; vary "
                              "other settings), or drop --greedy for a uniform soup")
    return ref, ref_cfg


def _holdout_set(cfg: RunConfig, image_size: int, dist: DistEnv) -> EvalSet:
    if cfg.data.train == "synthetic":
        dist.on_primary(lambda: world_paths() and None)  # rank 0 writes the world once
    holdout = build_run_data(cfg, image_size).holdout
    if holdout is None:  # holdout 0 was refused earlier; a bug if it happens
        raise RuntimeError("the runs' held-out split came out empty")
    return holdout


# ----------------------------------------------------------------------------- the command
def _check_args(runs: list[str], out: str, batch_size: int, workers: int | None) -> None:
    if len(runs) < 2:
        raise ConfigError(f"a soup averages 2 or more runs; got {len(runs)} ({', '.join(runs) or 'none'}); give "
                          "every run to average")
    seen: dict[Path, str] = {}
    for run in runs:
        key = Path(run).resolve()
        if key in seen:
            raise ConfigError(f"{run} is given twice (as {seen[key]} and {run}); give each run once")
        seen[key] = run
    target = Path(out).resolve()
    for key, run in seen.items():
        if key == target or target in key.parents:
            raise ConfigError(f"--out {out} holds the ingredient {run}; write the soup to another folder")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r} must be a positive integer")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"--workers {workers!r} must be 0 or more (0: load in the main process)")


def _identity(runs: list[str], greedy: bool) -> str:
    data = {"runs": [str(Path(r).resolve()) for r in runs], "greedy": greedy}
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:12]


def _loader(runs: list[_Run], template: ImageClassifier, dist: DistEnv) -> Any:
    by_arg = {r.arg: r for r in runs}
    reference = {k: v.detach() for k, v in template.state_dict().items()}

    def load(arg: str) -> dict[str, Any]:
        run = by_arg[arg]
        tensors, _ = load_tensors(_tensor_file(run.folder), device=dist.device)
        assert_compatible(reference, tensors, other=run.arg, reference=runs[0].arg)
        return tensors

    return load


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _table(result: SoupResult) -> str:
    lines = ["| candidate | held-out top-1 | soup with it | kept |", "|:---|---:|---:|:---|"]
    for c in result.candidates:
        lines.append(f"| {c.name} | {_fmt(c.holdout_top1)} | {_fmt(c.soup_top1)} | {'yes' if c.kept else 'no'} |")
    return "\n".join(lines)


def _write(out: Path, result: SoupResult, runs: list[_Run], *, greedy: bool, identity: str, overwrite: bool,
           holdout: dict[str, Any] | None) -> None:
    first = runs[0]
    source = next((r for r in runs if "config" in r.extra), first)  # eval --run SOUP reads its test sets
    extra = {
        "method": "soup",
        "greedy": greedy,
        "ingredients": result.ingredients,
        "candidates": [c.to_dict() for c in result.candidates],
        "holdout_top1": result.holdout_top1,
        "config_from": source.arg,
        **{k: source.extra[k] for k in _COPIED_EXTRA if k in source.extra},
    }
    if isinstance(extra.get("config"), dict):  # rows of `eval --run SOUP` are named after the soup, not its source
        extra["config"] = {**extra["config"], "name": Path(out).name}
    run_dir = prepare_run_dir(out, kind="soup", identity=identity, overwrite=overwrite,
                              extra={"method": "soup", "greedy": greedy, "runs": [r.arg for r in runs]})
    save_classifier(result.model, run_dir, model_name=first.meta["model_name"],  # type: ignore[arg-type]
                    pretrained=first.meta.get("pretrained", "none"), classnames=first.meta["classnames"],
                    templates=first.meta.get("templates", []), extra=extra)
    write_json(run_dir / SOUP_FILE, {
        "greedy": greedy, "runs": [r.arg for r in runs], "ingredients": result.ingredients,
        "candidates": [c.to_dict() for c in result.candidates], "holdout_top1": result.holdout_top1,
        "holdout": holdout,
        "rule": ("sorted by held-out top-1 (ties: the order given), best first; each next run kept only if the "
                 "uniform mean of the kept runs and it scores strictly higher on the held-out split")
        if greedy else "uniform mean of every run's weights, head included",
    })


def run_soup(*, runs: list[str], out: str, greedy: bool = False, batch_size: int = 256, workers: int | None = None,
             device: str = "auto", progress: bool = True, overwrite: bool = False) -> str:
    """Average the classifiers of ``runs`` into the classifier run ``out``; returns a printable summary.

    Args:
        runs: Two or more run folders (or classifier folders such as ``RUN/wise/alpha_1.00``).
        out: The soup's run folder.
        greedy: Choose the ingredients on the runs' held-out split (see
            :mod:`robustft.evaluation.soup`); otherwise average them all.
        batch_size, workers, device, progress: Of the held-out evaluations (greedy).
        overwrite: Replace a different run in ``out``.

    Raises:
        ConfigError, CheckpointError, DataError: Before anything is written: fewer than 2
            runs, mismatched runs, held-out splits that differ or are missing (greedy), a
            bad ``out``.
    """
    _check_args(runs, out, batch_size, workers)
    identity = _identity(runs, greedy)
    check_run_dir(out, kind="soup", identity=identity, overwrite=overwrite)
    found = _read_runs(runs)
    plan = _holdout_plan(found) if greedy else None
    dist = init_distributed(device)
    try:
        template, _ = load_classifier(found[0].folder, device=dist.device)
        load = _loader(found, template, dist)
        names = [r.arg for r in found]
        holdout_info = None
        if plan is not None:
            ref, cfg = plan
            holdout = _holdout_set(cfg, template.preprocess.image_size, dist)
            holdout_info = {"from": ref.arg, "images": len(holdout.dataset), **split_definition(cfg)}  # type: ignore[arg-type]
            logger.info("greedy soup of %d runs, chosen on %d held-out images (the split of %s)", len(names),
                        holdout_info["images"], ref.arg)

            def score(model: Any) -> float:
                (res,) = evaluate(model, [holdout], dist_env=dist, batch_size=batch_size, workers=workers,
                                  progress=progress, max_bad_fraction=cfg.data.max_bad_fraction)
                return res.metrics.get(res.headline, res.top1)  # the split's headline metric (top-1 for most)

            result = greedy_soup(template, names, load, score)
        else:
            result = uniform_soup(template, names, load)
        if dist.is_primary:
            _write(Path(out), result, found, greedy=greedy, identity=identity, overwrite=overwrite,
                   holdout=holdout_info)
    finally:
        dist.destroy()
    kind = (f"greedy soup of {len(result.ingredients)} of {len(names)} runs (held-out top-1 "
            f"{result.holdout_top1:.2f}%)" if greedy else f"uniform soup of {len(names)} runs")
    return f"{_table(result)}\n{kind} written to {out}; evaluate it with `robustft eval --run {out}`"

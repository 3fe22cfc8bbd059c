"""`robustft eval`, `wise`, `report` and `datasets check`: evaluation from saved runs."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from robustft.config import DataConfig
from robustft.data.datasets import EVAL_DATASETS, EvalSet, build_eval_set, build_folder_eval_set
from robustft.data.layouts import RELEASE_CHECKS, format_layout_table
from robustft.data.suites import SUITES
from robustft.distributed import DistEnv, init_distributed
from robustft.errors import CheckpointError, ConfigError, DataError, RobustFTError, choices_hint
from robustft.evaluation.evaluate import evaluate
from robustft.evaluation.metrics import ECE_BINS, check_ece_bins
from robustft.methods.catalogue import with_weight_step
from robustft.evaluation.wise import wise_ft_sweep
from robustft.methods import METHODS, MethodOptions
from robustft.methods.wise_ft import TextEnds, WiseClassifiers
from robustft.model import ImageClassifier, load_classifier, load_clip, save_classifier
from robustft.model.text import TEXT_TOWER_FILE, TextTower, load_text_tower_into, save_text_tower
from robustft.ops.weights import parse_alphas
from robustft.pipeline.runs import classifier_folder, git_sha, run_label, run_of_classifier
from robustft.reports.plots import write_report
from robustft.reports.results import ResultRow, append_rows, read_rows, rows_from_results
from robustft.reports.tables import guess_id_dataset, summary_table, to_markdown

__all__ = ["SUITES", "run_eval", "run_wise", "run_report", "check_datasets", "resolve_eval_sets", "parse_pairs",
           "bad_images_file_for"]

logger = logging.getLogger(__name__)

def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    """``["a=/x", "b=/y"]`` -> ``{"a": "/x", "b": "/y"}``; a clear error for a malformed item."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"{what} {item!r} must look like NAME=FOLDER")
        out[name.strip()] = path.strip()
    return out


def _requested(suite: str | None, datasets: str | None, meta: dict[str, Any]) -> list[str]:
    if suite is not None:
        return list(SUITES.get(suite).sets)
    if datasets:
        return [d.strip() for d in datasets.split(",") if d.strip()]
    planned = meta.get("extra", {}).get("test_sets")
    if planned:
        return list(planned)
    raise ConfigError(f"say what to evaluate: --suite {'|'.join(SUITES.names())} or --dataset NAME[,NAME] "
                      f"(registered: {', '.join(EVAL_DATASETS.names())}; or NAME=FOLDER for your own folder)")


def resolve_eval_sets(names: list[str], meta: dict[str, Any], *, data_root: str | None, paths: dict[str, str],
                      image_size: int) -> list[EvalSet]:
    """Build the named evaluation sets for a classifier described by ``meta``.

    A name is a registered release (found under ``data_root``), a test folder the run was
    trained with (``id``, a shift of the synthetic world, an ``ood_folders`` entry), or
    ``NAME=FOLDER`` for any class-per-folder test set.
    """
    extra = meta.get("extra", {})
    known_folders: dict[str, str] = dict(extra.get("folders") or {})
    classes = list(extra.get("folder_classes") or meta["classnames"])
    sets = []
    for item in names:
        name, sep, folder = item.partition("=")
        if sep:
            sets.append(build_folder_eval_set(name, folder, train_classes=classes, image_size=image_size))
        elif name in known_folders and name not in paths:
            sets.append(build_folder_eval_set(name, known_folders[name], train_classes=classes, image_size=image_size))
        elif name in EVAL_DATASETS:
            if data_root is None and name not in paths:
                raise DataError(f"{name}: give --data-root (the folder holding the releases) or --path {name}=FOLDER")
            sets.append(build_eval_set(name, data_root, image_size=image_size, path_override=paths.get(name),
                                       head_classnames=meta["classnames"]))
        else:
            valid = [*EVAL_DATASETS.names(), *known_folders]
            raise ConfigError(f"unknown dataset {name!r}; {choices_hint(name, valid)} (or NAME=FOLDER)")
    return sets


def _device_env(device: str) -> DistEnv:
    return init_distributed(device)


def _config_name(meta: dict[str, Any]) -> str | None:
    cfg = meta.get("extra", {}).get("config")
    name = cfg.get("name") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) else None


def _run_name(folder: Path, meta: dict[str, Any]) -> str:
    """The rows' ``run``: :func:`run_label` of the run folder, plus ``@alpha`` for a WiSE-FT classifier.

    ``folder`` is the classifier's folder: for ``RUN/wise/alpha_X.XX`` the run folder is
    ``RUN``, for ``wise --save DIR``'s ``DIR/alpha_X.XX`` it is ``DIR``.
    """
    alpha = meta.get("extra", {}).get("alpha")
    if not isinstance(alpha, (int, float)) or not folder.name.startswith("alpha_"):
        return run_label(_config_name(meta), folder)
    return f"{run_label(_config_name(meta), run_of_classifier(folder))}@{alpha:.2f}"


def _rows(results: list[Any], meta: dict[str, Any], run: str, *, method: str | None = None,
          alpha: float | None = None, config: dict[str, Any] | None = None, suite: str | None = None) -> list[ResultRow]:
    extra = meta.get("extra", {})
    cfg = config if config is not None else extra.get("config")
    seed = cfg.get("seed") if isinstance(cfg, dict) else None
    alpha = alpha if alpha is not None else extra.get("alpha")
    # How the run was trained (donors are drawn within each process's micro-batch) and, for a
    # WiSE-FT point, which fine-tuned weights were interpolated.
    details = {k: extra[k] for k in ("micro_batch", "processes", "accum_steps") if k in extra}
    if alpha is not None:
        details["wise_endpoint"] = extra.get("endpoint", "unknown")
    if suite is not None:
        details["suite"] = suite
    return rows_from_results(results, run=run, method=method or extra.get("method", "unknown"),
                             alpha=alpha, config=cfg, git_sha=git_sha() or "unknown", seed=seed,
                             classnames=meta["classnames"], extra=details)


def bad_images_file_for(out: str | Path) -> Path:
    """Where `eval` and `wise` list unreadable images: beside the results file (``results.bad_images.txt``)."""
    path = Path(out)
    return path.with_name(f"{path.stem}.bad_images.txt")


def _max_bad_fraction(given: float | None, meta: dict[str, Any]) -> float:
    """``--max-bad-fraction`` when given, else the run's ``data.max_bad_fraction``, else the config default."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (int, float)) or not (
                math.isfinite(given) and 0 <= given <= 1):
            raise ConfigError(f"--max-bad-fraction {given!r} must be a fraction in [0, 1] (e.g. 0.001: one "
                              "unreadable image in 1,000 is tolerated)")
        return float(given)
    cfg = meta.get("extra", {}).get("config")
    value = cfg.get("data", {}).get("max_bad_fraction") if isinstance(cfg, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    return DataConfig().max_bad_fraction


def _check_options(ece_bins: Any, suite: str | None) -> None:
    """Fail on a bad ``--ece-bins`` or ``--suite`` before any work."""
    if suite is not None:
        SUITES.get(suite)
    check_ece_bins(ece_bins, "--ece-bins")


def _bad_note(bad_file: Path, rows: list[ResultRow]) -> str:
    if not any(r.n_bad for r in rows) or not bad_file.is_file():
        return ""
    return f"\nunreadable images skipped (n_bad in the rows), listed in {bad_file}"


def _table(rows: list[ResultRow]) -> str:
    return to_markdown(summary_table(rows, guess_id_dataset(r.dataset for r in rows)))


def run_eval(*, run: str, data_root: str | None, suite: str | None, datasets: str | None, paths: list[str],
             out: str, batch_size: int = 256, workers: int | None = None, device: str = "auto",
             alpha: float | None = None, progress: bool = True, max_bad_fraction: float | None = None,
             ece_bins: int = ECE_BINS) -> str:
    """Evaluate the classifier of ``run`` and append one results row per dataset to ``out``.

    ``alpha`` picks one of a WiSE-FT run's interpolated classifiers (``RUN/wise/alpha_X.XX``)
    instead of its fine-tuned one (:func:`robustft.pipeline.runs.classifier_folder`).

    More than ``max_bad_fraction`` unreadable images in a set (default: the run's
    ``data.max_bad_fraction``) stops with a DataError; every unreadable image is listed in
    :func:`bad_images_file_for` ``(out)``. ``ece_bins`` sets the calibration error's bins.
    """
    overrides = parse_pairs(paths, "--path")
    _max_bad_fraction(max_bad_fraction, {})  # a bad value fails before any work
    _check_options(ece_bins, suite)
    bad_file = bad_images_file_for(out)
    dist = _device_env(device)
    try:
        folder = classifier_folder(run, alpha)
        classifier, meta = load_classifier(folder, device=dist.device)
        names = _requested(suite, datasets, meta)
        sets = resolve_eval_sets(names, meta, data_root=data_root, paths=overrides,
                                 image_size=classifier.preprocess.image_size)
        results = evaluate(classifier, sets, dist_env=dist, batch_size=batch_size, workers=workers, progress=progress,
                           max_bad_fraction=_max_bad_fraction(max_bad_fraction, meta), bad_images_file=bad_file,
                           bad_fraction_setting="--max-bad-fraction", ece_bins=ece_bins)
        rows = _rows(results, meta, _run_name(folder, meta), suite=suite)
        if dist.is_primary:
            append_rows(out, rows)
        return f"{_table(rows)}\nresults appended to {out}{_bad_note(bad_file, rows)}"
    finally:
        dist.destroy()


def _wise_method(meta: dict[str, Any]) -> str:
    """The method name of a WiSE-FT point of the fine-tuned run (the methods layer names it)."""
    return with_weight_step(str(meta.get("extra", {}).get("method", "unknown")))


def run_wise(*, zeroshot: str, finetuned: str, alphas: str, data_root: str | None, suite: str | None,
             datasets: str | None, paths: list[str], out: str, save: str | None = None, batch_size: int = 256,
             workers: int | None = None, device: str = "auto", progress: bool = True,
             max_bad_fraction: float | None = None, ece_bins: int = ECE_BINS) -> str:
    """Interpolate a zero-shot and a fine-tuned run at each alpha; evaluate each; keep the curve.

    Unreadable images are handled as in :func:`run_eval` (the default limit is the
    fine-tuned run's ``data.max_bad_fraction``).
    """
    alpha_list = parse_alphas(alphas)
    overrides = parse_pairs(paths, "--path")
    _max_bad_fraction(max_bad_fraction, {})  # a bad value fails before any work
    _check_options(ece_bins, suite)
    bad_file = bad_images_file_for(out)
    dist = _device_env(device)
    try:
        zs, zs_meta = load_classifier(zeroshot, device=dist.device)
        ft, ft_meta = load_classifier(finetuned, device=dist.device)
        if zs_meta["classnames"] != ft_meta["classnames"]:
            raise ConfigError(f"{zeroshot} and {finetuned} have different class lists "
                              f"({len(zs_meta['classnames'])} vs {len(ft_meta['classnames'])} classes); "
                              "WiSE-FT needs the zero-shot run the fine-tuned one started from")
        names = _requested(suite, datasets, ft_meta)
        sets = resolve_eval_sets(names, ft_meta, data_root=data_root, paths=overrides,
                                 image_size=ft.preprocess.image_size)
        method, run = _wise_method(ft_meta), run_label(_config_name(ft_meta), finetuned)
        limit = _max_bad_fraction(max_bad_fraction, ft_meta)

        def eval_fn(model: ImageClassifier) -> list[Any]:
            return evaluate(model, sets, dist_env=dist, batch_size=batch_size, workers=workers, progress=progress,
                            max_bad_fraction=limit, bad_images_file=bad_file, bad_fraction_setting="--max-bad-fraction",
                            ece_bins=ece_bins)

        text = _text_ends(zeroshot, zs, finetuned, ft_meta, dist.device)
        if text is None:
            curve = wise_ft_sweep(zs, ft, alpha_list, eval_fn)
        else:  # a run that trained its text tower: both towers mix, each head is rebuilt
            mixes = WiseClassifiers(ft, zs, tuple(alpha_list), text=text)
            curve = [(alpha, eval_fn(mixes[alpha])) for alpha in alpha_list]
        rows: list[ResultRow] = []
        for alpha, results in curve:
            rows += _rows(results, ft_meta, f"{run}@{alpha:.2f}", method=method, alpha=alpha, suite=suite)
        if dist.is_primary:
            append_rows(out, rows)
            if save:
                _save_curve(zs, ft, alpha_list, ft_meta, Path(save), text)
        return f"{_table(rows)}\nWiSE-FT curve ({len(alpha_list)} alphas) appended to {out}{_bad_note(bad_file, rows)}"
    finally:
        dist.destroy()


def _save_curve(zs: ImageClassifier, ft: ImageClassifier, alphas: list[float], meta: dict[str, Any],
                folder: Path, text: TextEnds | None = None) -> None:
    mixes = WiseClassifiers(ft, zs, tuple(alphas), text=text)
    for alpha in alphas:
        out = folder / f"alpha_{alpha:.2f}"
        save_classifier(mixes[alpha], out, model_name=meta["model_name"],
                        pretrained=meta.get("pretrained", "none"), classnames=meta["classnames"],
                        templates=meta.get("templates", []), extra={**meta.get("extra", {}), "alpha": alpha})
        if text is not None:
            save_text_tower(mixes.text_tower(alpha), out)


def _trains_text(method: Any) -> bool:
    """Whether the registered method ``method`` trains the text tower (False for unknown names)."""
    if not isinstance(method, str):
        return False
    try:
        return bool(METHODS.get(method).requirements(MethodOptions()).text_tower)
    except RobustFTError:
        return False


def _text_ends(zeroshot: str, zs: ImageClassifier, finetuned: str, ft_meta: dict[str, Any],
               device: torch.device) -> TextEnds | None:
    """Both text towers when the fine-tuned run trained its text tower (FLYP), else None.

    The fine-tuned tower is the run's ``text_tower.safetensors``; the zero-shot one is the
    tower of the CLIP model the run started from, rebuilt from the run's model, weights and
    seed. ``zeroshot``'s image tower must be that model's, so that alpha 0 is one model.
    """
    method = ft_meta.get("extra", {}).get("method")
    folder = Path(finetuned)
    folder = folder if folder.is_dir() else folder.parent
    if not (folder / TEXT_TOWER_FILE).is_file():
        if _trains_text(method):
            wise = method if str(method).endswith("+wise") else f"{method}+wise"
            raise CheckpointError(
                f"{finetuned} was trained by {method!r}, which trains the text tower, but holds no "
                f"{TEXT_TOWER_FILE}, so its heads cannot be rebuilt from interpolated text towers; retrain it "
                f"with this robustft, or interpolate during training with --set method.name={wise}")
        return None
    cfg = ft_meta.get("extra", {}).get("config")
    cfg = cfg if isinstance(cfg, dict) else {}
    seed = cfg.get("seed", 0)
    model_cfg = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    quick_gelu = ft_meta.get("quick_gelu")
    name, pretrained = ft_meta["model_name"], ft_meta.get("pretrained", "none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed if isinstance(seed, int) and not isinstance(seed, bool) else 0)  # random-init runs
        bundle = load_clip(name, pretrained, device=device, cache_dir=model_cfg.get("cache_dir"),
                           quick_gelu=quick_gelu if isinstance(quick_gelu, bool) else None)
    start = {k: v for k, v in zs.state_dict().items() if k.startswith("visual.")}
    rebuilt = {f"visual.{k}": v for k, v in bundle.model.visual.state_dict().items()}
    source = f"pretrained {pretrained!r}" + (f", random init of seed {seed}" if pretrained.lower() == "none" else "")
    if start.keys() != rebuilt.keys() or any(
            v.shape != rebuilt[k].shape or not torch.allclose(v.float(), rebuilt[k].float(), rtol=1e-5, atol=1e-6)
            for k, v in start.items()):
        raise ConfigError(
            f"--zeroshot {zeroshot} is not the model {finetuned} started from: its image tower differs from "
            f"{name} ({source}), whose text tower is the zero-shot end of the interpolation; give "
            f"the zero-shot classifier of that model (robustft zeroshot --model {name} --pretrained {pretrained})")
    tuned = TextTower.from_clip(bundle.model, copy=True)
    load_text_tower_into(tuned, folder)
    return TextEnds(zeroshot=TextTower.from_clip(bundle.model, copy=False).state_dict(), finetuned=tuned,
                    tokenizer=bundle.tokenizer, classnames=list(ft_meta["classnames"]),
                    templates=list(ft_meta.get("templates") or []))


def run_report(results: list[str], out: str, *, id_dataset: str | None = None) -> str:
    """Tables and plots from results files."""
    for path in results:
        if not Path(path).is_file():
            raise DataError(f"results file {path!r} does not exist; give the JSONL written by eval/wise/train/demo")
    rows = read_rows(results)
    if not rows:
        raise DataError(f"no results rows in {', '.join(results)}")
    files = write_report(rows, out, id_dataset=id_dataset)
    table = files["markdown"].read_text(encoding="utf-8").split("![", 1)[0].replace("# Results", "").strip()
    listing = "\n".join(f"  {kind}: {path}" for kind, path in files.items())
    return f"{table}\n\nwritten:\n{listing}"


def check_datasets(root: str, paths: list[str]) -> str:
    """A table of which dataset releases are present and complete under ``root``."""
    overrides = parse_pairs(paths, "--path")
    if not Path(root).is_dir():
        raise DataError(f"data root {root!r} does not exist; give the folder that holds the dataset releases")
    base = Path(root).expanduser()
    reports = [RELEASE_CHECKS.get(name)(base, Path(overrides[name]).expanduser() if name in overrides else None)
               for name in RELEASE_CHECKS.names()]
    return format_layout_table(reports)

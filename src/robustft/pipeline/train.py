"""`robustft train`: one fine-tuning run from its config, end to end.

The steps, in order: check the config and the data (nothing is written before that),
load CLIP, build the zero-shot classifier (the student's start and the frozen teacher),
train each of the method's stages with the shared loop, keep the best epoch on the
held-out split, finalise (WiSE-FT interpolates), save the classifier(s), evaluate on the
test sets and append results rows to ``RUN_DIR/results.jsonl``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from robustft.config import RunConfig, config_hash, config_to_dict, dump_config
from robustft.data.datasets import EvalSet
from robustft.data.folder import BAD_IMAGES_FILE
from robustft.data.captions import make_caption_loader
from robustft.data.loaders import make_train_loader
from robustft.data.synthetic import WorldConfig
from robustft.distributed import DistEnv, init_distributed
from robustft.engine.checkpoint import load_best, load_module_state, refuse_existing_checkpoints
from robustft.engine.settings import TrainSettings, per_rank_micro_batch
from robustft.engine.trainer import fit
from robustft.errors import ConfigError, ModelError
from robustft.evaluation.evaluate import evaluate
from robustft.log import add_file_handler
from robustft.methods import METHODS, MethodOptions, build_method
from robustft.methods.task_contrastive import TextSide
from robustft.model import ImageClassifier, build_zeroshot_classifier, load_clip, load_templates, save_classifier
from robustft.model.clip import ClipBundle
from robustft.model.text import TextTower, save_text_tower
from robustft.model.pretrain import load_or_pretrain_demo_clip
from robustft.model.vit import vit_unsupported_reason
from robustft.pipeline.data import RunData, build_run_data, build_test_sets, world_paths
from robustft.pipeline.runs import check_run_dir, git_sha, prepare_run_dir, run_label, wise_folder
from robustft.reports.results import append_rows, rows_from_results
from robustft.safeio import load_tensors, save_tensors
from robustft.reports.tables import guess_id_dataset, summary_table, to_markdown

__all__ = ["run_train", "run_cam_cache", "load_model", "method_options", "identity_of", "stage_settings"]

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
_VOLATILE = ("checkpoint", "eval", "device", "dist_timeout_s")  # may change between a run and its resume


def identity_of(cfg: RunConfig) -> str:
    """Hash of what determines a run's numbers (not how often it checkpoints or where it runs)."""
    data = {k: v for k, v in config_to_dict(cfg).items() if k not in _VOLATILE}
    return config_hash(data)  # type: ignore[arg-type]


def method_options(cfg: RunConfig, rank: int = 0) -> MethodOptions:
    """The method options of ``cfg`` (validated)."""
    m = cfg.method
    return MethodOptions(
        task_weight=m.task_weight, distill_weight=m.distill_weight, temperature=m.temperature,
        masking=m.masking or None, cam=m.cam, cam_source=m.cam_source, donors=m.donors,
        label_smoothing=m.label_smoothing, alphas=tuple(m.alphas), l2sp_weight=m.l2sp_weight,
        multi_positive=m.multi_positive, seed=cfg.seed, rank=rank,
    )


def load_model(cfg: RunConfig, dist: DistEnv, progress: bool = True) -> ClipBundle:
    """Load ``cfg.model``; ``pretrained: world`` pretrains (once, cached) the demo CLIP."""
    pretrained = cfg.model.pretrained
    if pretrained == "world":
        pretrained = dist.on_primary(
            lambda: load_or_pretrain_demo_clip(WorldConfig(), progress=progress).pretrained)
    torch.manual_seed(cfg.seed)  # random-init weights ("none") are part of what the seed reproduces
    return load_clip(cfg.model.name, pretrained, device=dist.device, cache_dir=cfg.model.cache_dir)


def _check_early(cfg: RunConfig, dist: DistEnv) -> int:
    """Config checks that need no data or model; returns the per-rank micro-batch."""
    cls = METHODS.get(cfg.method.name)
    if not cls.trains:
        raise ConfigError(f"method {cfg.method.name!r} does not train; build it with `robustft zeroshot` "
                          "(and evaluate with `robustft eval`)")
    options = method_options(cfg, dist.rank)
    micro = per_rank_micro_batch(cfg.data.batch_size, dist.world_size, cfg.optim.accum_steps)
    cls.check(options, micro)  # the method's own refusals (a masking it cannot use, too few donors)
    if cfg.method.masking and not cls.requirements(options).vit:
        logger.warning("method %s does not mask images: method.masking=%r is ignored", cfg.method.name,
                       cfg.method.masking)
    return micro


def _check_vit(cfg: RunConfig, bundle: ClipBundle) -> None:
    """A masked method needs a ViT image tower; fail before the run folder is written."""
    if not METHODS.get(cfg.method.name).requirements(method_options(cfg)).vit:
        return
    reason = vit_unsupported_reason(bundle.model.visual)
    if reason is not None:
        raise ModelError(f"method {cfg.method.name!r} masks image patches, which needs a ViT image tower, but "
                         f"{cfg.model.name!r}: {reason}; use a ViT model (e.g. ViT-B-32) or a method without "
                         "masking (ft, fd, kd)")


def _settings(cfg: RunConfig, stage: str, n_stages: int, select_metric: str = "top1") -> TrainSettings:
    o, m = cfg.optim, cfg.method
    probe = METHODS.get(stage).probe
    epochs = m.lp_epochs if probe and n_stages > 1 else o.epochs
    lr = m.lp_lr if probe else o.lr
    decay = (o.weight_decay if m.lp_weight_decay is None else m.lp_weight_decay) if probe else o.weight_decay
    return TrainSettings(
        epochs=epochs, lr=lr, weight_decay=decay, schedule=o.schedule,
        warmup_frac=o.warmup, warmup_steps=o.warmup_steps, clip_grad_norm=o.clip_grad_norm,
        accum_steps=o.accum_steps, precision=o.precision,
        checkpoint_every=cfg.checkpoint.every, keep_last=cfg.checkpoint.keep, seed=cfg.seed,
        max_bad_fraction=cfg.data.max_bad_fraction, select_metric=select_metric,
    )


def stage_settings(cfg: RunConfig) -> list[tuple[str, TrainSettings]]:
    """What each stage of ``cfg``'s method really trains with: ``[(stage name, settings)]``.

    A probe stage (``lp``, and the first stage of ``lp-ft``) takes ``method.lp_lr`` and
    ``method.lp_weight_decay`` (``optim.weight_decay`` when unset); in a multi-stage method
    it runs ``method.lp_epochs``. Every other stage takes ``optim``'s values.
    """
    stages = _stages(cfg)
    return [(stage, _settings(cfg, stage, len(stages))) for stage in stages]


def _holdout_fn(student: ImageClassifier, holdout: EvalSet | None, cfg: RunConfig, dist: DistEnv,
                bad_file: Path | None = None, before: Callable[[], None] | None = None) -> Any:
    if holdout is None:
        return None

    def evaluate_holdout(epoch: int) -> dict[str, float]:
        if before is not None:
            before()  # e.g. the head rebuilt from the current text tower
        (res,) = evaluate(student, [holdout], dist_env=dist, batch_size=cfg.data.eval_batch_size,
                          workers=cfg.data.workers, precision=cfg.optim.precision, progress=False,
                          max_bad_fraction=cfg.data.max_bad_fraction, bad_images_file=bad_file,
                          bad_fraction_setting="data.max_bad_fraction")
        return dict(res.metrics)  # the best epoch is chosen on the set's headline metric (macro-F1 on iWildCam)

    return evaluate_holdout


def _cam_cache_stages(cfg: RunConfig) -> list[str]:
    """The stages of ``cfg``'s method that would use a teacher-CAM cache (each method class answers for itself)."""
    options = method_options(cfg)
    return [stage for stage in _stages(cfg) if METHODS.get(stage).wants_teacher_cams(options)]


def _teacher_cams(cfg: RunConfig, data: RunData, teacher: ImageClassifier | None, dist: DistEnv,
                  progress: bool) -> Any:
    """The teacher-CAM cache when a stage of the method uses one (built by rank 0 alone), else None."""
    if teacher is None or not _cam_cache_stages(cfg):
        return None
    if cfg.data.train_augment:
        logger.info("teacher CAMs computed every step: training augmentation makes them image-and-draw specific")
        return None
    return _build_cam_cache(cfg, data, teacher, dist, progress)


def _build_cam_cache(cfg: RunConfig, data: RunData, teacher: ImageClassifier, dist: DistEnv, progress: bool) -> Any:
    from robustft.methods.cam_cache import load_or_build_teacher_cam_cache

    return load_or_build_teacher_cam_cache(
        teacher, data.train, model_name=cfg.model.name, weights=cfg.model.pretrained, kind=cfg.method.cam,
        batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.workers, progress=progress, dist_env=dist)


@dataclass
class _Models:
    student: ImageClassifier
    teacher: ImageClassifier | None
    zeroshot: ImageClassifier | None
    context: dict[str, Any]


def _build_models(cfg: RunConfig, bundle: ClipBundle, data: RunData, progress: bool) -> _Models:
    """The student (the zero-shot classifier) and exactly what the method's requirements ask for."""
    zeroshot = build_zeroshot_classifier(bundle, data.classnames, data.templates, progress=progress)
    cls = METHODS.get(cfg.method.name)
    needs = cls.requirements(method_options(cfg))
    teacher = copy.deepcopy(zeroshot).eval().requires_grad_(False) if needs.teacher else None
    keep = copy.deepcopy(zeroshot).eval().requires_grad_(False) if cls.interpolates else None
    context: dict[str, Any] = {}
    if needs.text_tower:
        context["text"] = TextSide(tower=TextTower.from_clip(bundle.model, copy=True), tokenizer=bundle.tokenizer,
                                   classnames=list(data.classnames), templates=load_templates(data.templates))
    return _Models(student=zeroshot, teacher=teacher, zeroshot=keep, context=context)


def _stage_dirs(cfg: RunConfig, run_dir: Path) -> list[Path]:
    """Where each stage trains: the run folder itself, or ``stages/<i>-<name>/`` for a multi-stage method."""
    stages = _stages(cfg)
    return [run_dir] if len(stages) == 1 else [run_dir / "stages" / f"{i + 1}-{s}" for i, s in enumerate(stages)]


def _check_out(cfg: RunConfig, out: Path, resume: bool, overwrite: bool) -> None:
    """The run folder's refusals, before anything loads and writing nothing.

    A different run (unless ``overwrite``), or checkpoints of this one without ``resume``;
    the trainer checks the checkpoints again, as a safety net for other callers of ``fit``.
    """
    kept = check_run_dir(out, kind="train", identity=identity_of(cfg), overwrite=overwrite, resume=resume)
    if kept and not resume:
        for stage_dir in _stage_dirs(cfg, out):
            refuse_existing_checkpoints(stage_dir)


def _stages(cfg: RunConfig) -> list[str]:
    """The stage names of ``cfg``'s method (one, or those of a staged method), read without building it."""
    return list(METHODS.get(cfg.method.name).stages())


def _train_stages(cfg: RunConfig, models: _Models, data: RunData, run_dir: Path, dist: DistEnv, micro: int,
                  resume: bool, progress: bool, teacher_cams: Any) -> Any:
    options = method_options(cfg, dist.rank)
    wanted = set(_cam_cache_stages(cfg)) if teacher_cams is not None else set()
    top = build_method(cfg.method.name, models.student, models.teacher, options, context=models.context,
                       teacher_cams=teacher_cams if len(_stages(cfg)) == 1 and cfg.method.name in wanted else None)
    stages = top.stages()
    for i, stage in enumerate(stages):
        stage_dir = _stage_dirs(cfg, run_dir)[i]
        method = top if len(stages) == 1 else build_method(
            stage, models.student, models.teacher, options, context=models.context,
            teacher_cams=teacher_cams if stage in wanted else None)
        done = stage_dir / "stage_done"
        if resume and done.is_file():
            logger.info("stage %s had finished before; reusing its result", stage)
            _load_final(method, stage_dir)
            dist.broadcast_module(method.trainable_module())  # rank 0's file is the truth, even on a stale share
            method.sync_head()
            continue
        loader = _train_loader(cfg, method, data, micro, dist)
        logger.info("stage %d/%d: %s", i + 1, len(stages), stage)
        select = data.holdout.headline if data.holdout is not None else "top1"
        result = fit(method, loader, _settings(cfg, stage, len(stages), select), run_dir=stage_dir, dist_env=dist,
                     resume=resume, evaluate=_holdout_fn(models.student, data.holdout, cfg, dist,
                                                         run_dir / BAD_IMAGES_FILE, before=method.sync_head),
                     progress=progress, config=config_to_dict(cfg), bad_images_file=run_dir / BAD_IMAGES_FILE)
        best = load_best(stage_dir)
        if best is not None and data.holdout is not None and _endpoint(cfg, last_stage=i == len(stages) - 1) == "best":
            load_module_state(method.trainable_module(), best[0], source=str(stage_dir / "best"))
            logger.info("kept the best epoch of stage %s (held-out %s %.2f)", stage, select, result.best_metric)
        elif best is not None and data.holdout is not None:
            logger.info("kept the last weights of stage %s for WiSE-FT (method.wise_endpoint=last); the best "
                        "epoch (held-out %s %.2f) stays in %s", stage, select, result.best_metric, stage_dir / "best")
        # Every rank read best/ itself; make sure they all go on with rank 0's weights.
        dist.broadcast_module(method.trainable_module())
        method.sync_head()  # a head rebuilt from a trained text tower follows the kept weights
        if dist.is_primary:  # the stage's outcome, so that --resume after it never retrains it
            save_tensors(stage_dir / "final.safetensors", method.trainable_module().state_dict())
            done.write_text("ok\n")
    return top


def _endpoint(cfg: RunConfig, last_stage: bool = True) -> str:
    """Which weights a run keeps as its fine-tuned result: "best" (held-out) or "last".

    Every method keeps its held-out-best epoch, except the last stage of a method that
    interpolates (WiSE-FT), which takes ``method.wise_endpoint`` (the reference: last).
    """
    if last_stage and METHODS.get(cfg.method.name).interpolates:
        return cfg.method.wise_endpoint
    return "best"


def _batch_layout(cfg: RunConfig, dist: DistEnv) -> dict[str, int]:
    """How the global batch was split: donors and masks are drawn within each process's micro-batch."""
    micro = per_rank_micro_batch(cfg.data.batch_size, dist.world_size, cfg.optim.accum_steps)
    return {"micro_batch": micro, "processes": dist.world_size, "accum_steps": cfg.optim.accum_steps}


def _train_loader(cfg: RunConfig, method: Any, data: RunData, micro: int, dist: DistEnv) -> Any:
    """Image batches, or (image, template) rows when the method trains on captions."""
    if method.requirements(method.options).captions:
        n_templates = len(load_templates(data.templates))
        return make_caption_loader(data.train, n_templates, batch_size=micro, global_batch=cfg.data.batch_size,
                                   workers=cfg.data.workers, rank=dist.rank, world_size=dist.world_size,
                                   seed=cfg.seed)
    return make_train_loader(data.train, batch_size=micro, workers=cfg.data.workers, rank=dist.rank,
                             world_size=dist.world_size, seed=cfg.seed)


def _load_final(method: Any, stage_dir: Path) -> None:
    tensors, _ = load_tensors(stage_dir / "final.safetensors")
    load_module_state(method.trainable_module(), tensors, source=str(stage_dir / "final.safetensors"))


def _kept_classifiers(finals: Any, student: ImageClassifier) -> Any:
    """What the run folder keeps: the fine-tuned classifier at ``RUN/``, then each of ``finals``.

    For WiSE-FT ``finals`` are the interpolations only (``RUN/wise/alpha_X.XX/``); the
    fine-tuned end is saved too, so that ``robustft eval --run RUN`` works on every run.
    """
    if None not in finals:
        yield None, student
    yield from finals.items()


def _save_and_evaluate(cfg: RunConfig, top: Any, models: _Models, data: RunData, run_dir: Path, dist: DistEnv,
                       bundle: ClipBundle, progress: bool) -> list[Any]:
    finals = top.finalize(models.student, models.zeroshot) if models.zeroshot is not None else {None: models.student}
    templates = load_templates(data.templates)
    endpoint = _endpoint(cfg) if data.holdout is not None else "last"
    rows: list[Any] = []
    for alpha, classifier in _kept_classifiers(finals, models.student):
        out = run_dir if alpha is None else wise_folder(run_dir, alpha)
        if dist.is_primary:
            save_classifier(classifier, out, model_name=cfg.model.name, pretrained=bundle.pretrained,
                            classnames=data.classnames, templates=templates,
                            extra={"method": cfg.method.name, "alpha": alpha, "config": config_to_dict(cfg),
                                   "folders": data.folders, "folder_classes": data.folder_classes,
                                   "test_sets": data.test_names, "endpoint": endpoint,
                                   **_batch_layout(cfg, dist)})
            if "text" in models.context and (alpha is None or hasattr(finals, "text_tower")):
                # The text tower beside the classifier whose head was built from it: `robustft wise`
                # interpolates RUN's with the zero-shot tower and rebuilds each alpha's head from the mix.
                tower = models.context["text"].tower if alpha is None else finals.text_tower(alpha)
                save_text_tower(tower, out)
    if not cfg.eval.enabled:
        return rows
    image_size = bundle.preprocess.image_size
    test_sets = build_test_sets(cfg, data, image_size, data.classnames)
    label = run_label(cfg.name, run_dir)
    for alpha, classifier in finals.items():
        results = evaluate(classifier, test_sets, dist_env=dist, batch_size=cfg.data.eval_batch_size,
                           workers=cfg.data.workers, precision=cfg.optim.precision, progress=progress,
                           max_bad_fraction=cfg.data.max_bad_fraction, bad_images_file=run_dir / BAD_IMAGES_FILE,
                           bad_fraction_setting="data.max_bad_fraction", ece_bins=cfg.eval.ece_bins)
        rows += rows_from_results(results, run=label if alpha is None else f"{label}@{alpha:.2f}",
                                  method=cfg.method.name, alpha=alpha, config=config_to_dict(cfg),
                                  git_sha=git_sha() or "unknown", seed=cfg.seed, classnames=data.classnames,
                                  extra={**_batch_layout(cfg, dist),
                                         **({} if alpha is None else {"wise_endpoint": endpoint})})
    if dist.is_primary:
        # The run's own rows are rewritten, so a --resume after the end never duplicates them.
        (run_dir / RESULTS_FILE).unlink(missing_ok=True)
        append_rows(run_dir / RESULTS_FILE, rows)
    return rows


def run_train(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              progress: bool = True) -> str:
    """Train ``cfg`` into the run folder ``out``; returns a printable summary."""
    dist = init_distributed(cfg.device, cfg.dist_timeout_s, tf32=cfg.optim.tf32)
    try:
        return _run(cfg, Path(out), dist, resume, overwrite, progress)
    finally:
        dist.destroy()


def _run(cfg: RunConfig, out: Path, dist: DistEnv, resume: bool, overwrite: bool, progress: bool) -> str:
    start = time.perf_counter()
    micro = _check_early(cfg, dist)
    dist.on_primary(lambda: _check_out(cfg, out, resume, overwrite))
    if cfg.data.train == "synthetic":
        dist.on_primary(lambda: world_paths() and None)
    bundle = load_model(cfg, dist, progress)
    _check_vit(cfg, bundle)
    data = build_run_data(cfg, bundle.preprocess.image_size)
    run_dir = Path(dist.on_primary(lambda: str(prepare_run_dir(
        out, kind="train", identity=identity_of(cfg), overwrite=overwrite, resume=resume,
        extra={"method": cfg.method.name, "name": cfg.name}))))
    if dist.is_primary:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        add_file_handler(run_dir / "log.txt")
        if not resume:  # a fresh start lists only what it meets itself
            (run_dir / BAD_IMAGES_FILE).unlink(missing_ok=True)
    logger.info("run %s: method %s, model %s (%s), %d training images, %d process(es)\n%s", cfg.name,
                cfg.method.name, cfg.model.name, bundle.pretrained, len(data.train), dist.world_size, dump_config(cfg))
    if dist.device.type == "cpu" and dist.world_size > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // dist.world_size))
    models = _build_models(cfg, bundle, data, progress)
    teacher_cams = _teacher_cams(cfg, data, models.teacher, dist, progress)
    top = _train_stages(cfg, models, data, run_dir, dist, micro, resume, progress, teacher_cams)
    rows = _save_and_evaluate(cfg, top, models, data, run_dir, dist, bundle, progress)
    minutes = (time.perf_counter() - start) / 60
    lines = [f"run {cfg.name} ({cfg.method.name}) finished in {minutes:.1f} min -> {run_dir}"]
    if rows:
        lines.append(to_markdown(summary_table(rows, guess_id_dataset(r.dataset for r in rows))))
        lines.append(f"results appended to {run_dir / RESULTS_FILE}")
    bad_list = run_dir / BAD_IMAGES_FILE
    if bad_list.is_file():
        n_listed = len(bad_list.read_text(encoding="utf-8").splitlines())
        lines.append(f"{n_listed} unreadable image(s) skipped, listed in {bad_list}")
    return "\n".join(lines)


def run_cam_cache(cfg: RunConfig, progress: bool = True) -> str:
    """`robustft cam-cache`: compute the frozen teacher's CAMs for ``cfg``'s training images."""
    dist = init_distributed(cfg.device, cfg.dist_timeout_s, tf32=cfg.optim.tf32)
    try:
        if cfg.method.cam_source != "teacher":
            raise ConfigError("cam-cache precomputes the frozen teacher's CAMs; set method.cam_source=teacher "
                              "(the student's CAMs change every step and cannot be cached)")
        if not _cam_cache_stages(cfg):
            masking = f"masking {cfg.method.masking!r}" if cfg.method.masking else "its default masking"
            raise ConfigError(f"method {cfg.method.name!r} with {masking} selects no patches by CAM, so there is "
                              "no teacher-CAM cache to build")
        if cfg.data.train_augment:
            raise ConfigError("data.train_augment=true draws a new image every epoch, so its teacher CAMs cannot be "
                              "cached (training computes them every step); set data.train_augment=false to cache them")
        if cfg.data.train == "synthetic":
            dist.on_primary(lambda: world_paths() and None)
        bundle = load_model(cfg, dist, progress)
        data = build_run_data(cfg, bundle.preprocess.image_size)
        teacher = build_zeroshot_classifier(bundle, data.classnames, data.templates, progress=progress)
        teacher.eval().requires_grad_(False)
        cams = _build_cam_cache(cfg, data, teacher, dist, progress)
        return f"teacher CAMs ready for {len(data.train)} images ({cfg.method.cam}, {tuple(cams.shape)})"
    finally:
        dist.destroy()

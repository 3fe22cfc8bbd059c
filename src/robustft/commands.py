"""The CLI's command handlers: turn parsed arguments into pipeline calls.

Each handler validates what it was given, calls one pipeline function and prints the
final, human-facing summary (the only ``print`` calls of the package besides the CLI's
error line). Heavy imports happen inside the handlers so that `robustft --help` is fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

__all__ = ["dispatch"]


def _out(text: str) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun, only rank 0 prints the summary
        return
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def _methods(args: argparse.Namespace) -> int:
    from robustft.methods import METHODS, list_methods
    from robustft.methods.catalogue import COMPOSE_EXAMPLE, composable_parts

    rows = [(name, getattr(METHODS.get(name), "composition", "") or "-", desc) for name, desc in list_methods()]
    width = max(len(name) for name, _, _ in rows)
    comp = max(len(c) for _, c, _ in rows)
    lines = [f"{name:<{width}}  {c:<{comp}}  {desc}" for name, c, desc in rows]
    lines += ["", f"Any other composition, by name: --set method.name=TASK+REG[+REG...][+wise], "
                  f"e.g. --set method.name={COMPOSE_EXAMPLE}"]
    groups = composable_parts()
    part_width = max(len(key) for _, parts in groups for key, _ in parts)
    for heading, parts in groups:
        lines += [f"{heading}:", *(f"  {key:<{part_width}}  {desc}" for key, desc in parts)]
    _out("\n".join(lines))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from robustft.config import list_presets

    _out("\n".join(list_presets()))
    return 0


def _config(args: argparse.Namespace) -> int:
    from robustft.config import build_config, dump_config
    from robustft.pipeline.train import stage_settings

    cfg = build_config(args.config, args.overrides)
    lines = [dump_config(cfg).rstrip("\n")]
    stages = stage_settings(cfg)
    if stages:
        lines.append("# what each training stage trains with (a probe stage: method.lp_lr, method.lp_weight_decay):")
    for stage, s in stages:
        warmup = f"{s.warmup_steps} steps" if s.warmup_steps > 0 else f"{s.warmup_frac:g} of the steps"
        lines.append(f"#   {stage}: lr {s.lr:g}, weight decay {s.weight_decay:g}, {s.epochs:g} epochs, {s.schedule} "
                     f"schedule, clip {s.clip_grad_norm:g}, {s.precision}, warm-up {warmup}")
    _out("\n".join(lines))
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from robustft.pipeline.evaluate import check_datasets

    _out(check_datasets(args.root, args.path))
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from robustft.pipeline.zeroshot import run_zeroshot

    run_dir = run_zeroshot(
        model=args.model, pretrained=args.pretrained, classnames=args.classnames, templates=args.templates,
        out=args.out, device=args.device, overwrite=args.overwrite, progress=not args.no_progress,
    )
    _out(f"zero-shot classifier written to {run_dir}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from robustft.config import build_config
    from robustft.pipeline.train import run_train

    overrides = list(args.overrides)
    if args.checkpoint_every is not None:
        overrides.append(f"checkpoint.every={args.checkpoint_every}")
    if args.no_eval:
        overrides.append("eval.enabled=false")
    cfg = build_config(args.config, overrides)
    summary = run_train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    _out(summary)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from robustft.pipeline.evaluate import run_eval

    _out(run_eval(
        run=args.run, alpha=args.alpha, data_root=args.data_root, suite=args.suite, datasets=args.dataset,
        paths=args.path, out=args.out, batch_size=args.batch_size, workers=args.workers, device=args.device,
        progress=not args.no_progress, max_bad_fraction=args.max_bad_fraction, ece_bins=args.ece_bins,
    ))
    return 0


def _wise(args: argparse.Namespace) -> int:
    from robustft.pipeline.evaluate import run_wise

    _out(run_wise(
        zeroshot=args.zeroshot, finetuned=args.finetuned, alphas=args.alphas, data_root=args.data_root,
        suite=args.suite, datasets=args.dataset, paths=args.path, out=args.out, save=args.save,
        batch_size=args.batch_size, workers=args.workers, device=args.device, progress=not args.no_progress,
        max_bad_fraction=args.max_bad_fraction, ece_bins=args.ece_bins,
    ))
    return 0


def _soup(args: argparse.Namespace) -> int:
    from robustft.pipeline.soup import run_soup

    _out(run_soup(
        runs=args.runs, out=args.out, greedy=args.greedy, batch_size=args.batch_size, workers=args.workers,
        device=args.device, progress=not args.no_progress, overwrite=args.overwrite,
    ))
    return 0


def _report(args: argparse.Namespace) -> int:
    from robustft.pipeline.evaluate import run_report

    _out(run_report(args.results, args.out, id_dataset=args.id_dataset))
    return 0


def _cam(args: argparse.Namespace) -> int:
    from robustft.pipeline.cam import run_cam_export

    _out(run_cam_export(
        run=args.run, images=args.images, cam=args.cam, masking=args.masking, out=args.out, grid=args.grid,
        seed=args.seed, limit=args.limit, device=args.device,
    ))
    return 0


def _cam_cache(args: argparse.Namespace) -> int:
    from robustft.config import build_config
    from robustft.pipeline.train import run_cam_cache

    _out(run_cam_cache(build_config(args.config, args.overrides), progress=not args.no_progress))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from robustft.pipeline.demo import run_demo

    _out(run_demo(out=args.out, quick=args.quick, seeds=args.seeds, jobs=args.jobs, overwrite=args.overwrite,
                  progress=not args.no_progress, everything=args.everything))
    return 0


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "methods": _methods, "presets": _presets, "config": _config, "datasets": _datasets,
    "zeroshot": _zeroshot, "train": _train, "eval": _eval, "wise": _wise, "report": _report,
    "cam": _cam, "cam-cache": _cam_cache, "demo": _demo, "soup": _soup,
}


def dispatch(args: argparse.Namespace) -> int:
    """Run the handler of ``args.command``; returns the exit code."""
    return _HANDLERS[args.command](args)

"""`robustft <command>`: parse the command line, call the pipeline, map errors to exit codes.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback, nothing written),
130 interrupted by Ctrl-C or SIGTERM (a resumable checkpoint is kept), 1 anything else (a bug:
the traceback is shown).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from robustft import __version__
from robustft.errors import RobustFTError

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and a one-line message on bad usage (its default)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing, different run in --out")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune with one method (see `robustft methods`)")
    p.add_argument("--config", "-c", default=None, help="preset name (see `robustft presets`) or YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set optim.lr=1e-5 (repeatable)")
    p.add_argument("--out", required=True, help="run folder to create (or to resume)")
    p.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint in --out")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="save a checkpoint every STEPS optimizer steps (same as --set checkpoint.every=STEPS)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_overwrite(p)


def _add_zeroshot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zeroshot", help="build a zero-shot classifier from a CLIP model and class names")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (robustft-tiny for tests)")
    p.add_argument("--pretrained", default="openai", help="open_clip tag, weights file, or 'none'")
    p.add_argument("--classnames", default="imagenet", help="'imagenet' or a text file, one name per line")
    p.add_argument("--templates", default="openai_imagenet", help="'openai_imagenet', 'simple' or a text file")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    _add_overwrite(p)


def _add_max_bad(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-bad-fraction", type=float, default=None, metavar="F",
                   help="stop when more than this fraction of a set's images is unreadable (default: the run's "
                        "data.max_bad_fraction, else 0.001); they are listed in OUT's NAME.bad_images.txt")


def _add_ece_bins(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ece-bins", type=int, default=15, metavar="N",
                   help="equal-width confidence bins of the expected calibration error (default 15; CaRot's "
                        "and TRACER's tables use 10)")


def _suite_help() -> str:
    from robustft.data.suites import SUITES

    return "a benchmark's sets: " + ", ".join(SUITES.names())


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run on ImageNet and its shifts or on named datasets")
    p.add_argument("--run", required=True, help="run folder holding a classifier")
    p.add_argument("--alpha", type=float, default=None, metavar="A",
                   help="a WiSE-FT run's classifier interpolated at A (RUN/wise/alpha_A) instead of RUN's fine-tuned one")
    p.add_argument("--data-root", default=None, help="folder holding the dataset releases")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--suite", default=None, help=_suite_help())
    g.add_argument("--dataset", default=None, help="comma-separated dataset names or NAME=FOLDER pairs")
    p.add_argument("--path", action="append", default=[], metavar="NAME=FOLDER", help="per-dataset path override")
    p.add_argument("--out", required=True, help="results JSONL file to append to")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    _add_max_bad(p)
    _add_ece_bins(p)


def _add_wise(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("wise", help="WiSE-FT: interpolate a zero-shot and a fine-tuned run, evaluate the curve")
    p.add_argument("--zeroshot", required=True, help="zero-shot run folder (alpha = 0)")
    p.add_argument("--finetuned", required=True, help="fine-tuned run folder (alpha = 1)")
    p.add_argument("--alphas", default="0:1:0.1", help="start:stop:step or a comma list, each in [0, 1]")
    p.add_argument("--data-root", default=None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--suite", default=None, help=_suite_help())
    g.add_argument("--dataset", default=None)
    p.add_argument("--path", action="append", default=[], metavar="NAME=FOLDER")
    p.add_argument("--out", required=True, help="results JSONL file to append to")
    p.add_argument("--save", default=None, help="also save each interpolated classifier under this folder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    _add_max_bad(p)
    _add_ece_bins(p)


def _add_soup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soup", help="model soups: average the weights of several runs (uniform, or greedy on the "
                                    "held-out split)")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="2 or more run folders with classifiers of one architecture and class list")
    p.add_argument("--out", required=True, help="folder for the soup (a classifier run: `robustft eval --run` it)")
    p.add_argument("--greedy", action="store_true",
                   help="greedy soup: best run first, then add each next run only if the held-out top-1 rises "
                        "(the runs must share their held-out split: same data, data.holdout and seed)")
    p.add_argument("--batch-size", type=int, default=256, help="held-out evaluation batch size (--greedy)")
    p.add_argument("--workers", type=int, default=None, help="data-loading workers (--greedy)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    _add_overwrite(p)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables (md, csv) and plots (png) from results JSONL files")
    p.add_argument("results", nargs="+", help="results JSONL files")
    p.add_argument("--out", required=True, help="folder for report.md, report.csv and the plots")
    p.add_argument("--id-dataset", default=None,
                   help="in-distribution dataset name (default: imagenet or id; with neither, every set is a shift)")


def _add_cam(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cam", help="export CAMs, masks and counterfactual images for a folder of images")
    p.add_argument("--run", required=True)
    p.add_argument("--images", required=True, help="folder with one subfolder per class (the run's class names)")
    p.add_argument("--cam", default="mmcam", choices=["mmcam", "gradcam"])
    p.add_argument("--masking", default="ObjMaskSingleFill(0.3)", help="masking spec in the paper's notation")
    p.add_argument("--out", required=True, help="npz file to write")
    p.add_argument("--grid", default=None, help="also write a PNG grid here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=64, help="at most this many images")
    p.add_argument("--device", default="auto")


def _add_cam_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cam-cache", help="precompute the frozen teacher's CAMs for a training config")
    p.add_argument("--config", "-c", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole story on a synthetic world, on CPU, in minutes")
    p.add_argument("--out", default="demo-out", help="output folder (default: ./demo-out)")
    p.add_argument("--quick", action="store_true", help="ft and the flagship only, shorter (about 3 minutes on 2 cores)")
    p.add_argument("--all", action="store_true", dest="everything",
                   help="also L2-SP and a greedy soup of each seed's fine-tuned runs (reuses a default demo's runs)")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds per method; in the folder of an earlier demo, finished runs are reused")
    p.add_argument("--jobs", type=int, default=None, help="parallel fine-tuning jobs (default: CPU cores)")
    p.add_argument("--no-progress", action="store_true")
    _add_overwrite(p)


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser (also used to render the CLI reference)."""
    parser = _Parser(prog="robustft", description="Robust fine-tuning of CLIP models.")
    parser.add_argument("--version", action="version", version=f"robustft {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_demo, _add_train, _add_zeroshot, _add_eval, _add_wise, _add_soup, _add_report, _add_cam,
                _add_cam_cache):
        add(sub)
    sub.add_parser("methods", help="list the registered fine-tuning methods")
    sub.add_parser("presets", help="list the shipped config presets")
    p = sub.add_parser("config", help="print the resolved config of a preset and overrides")
    p.add_argument("--config", "-c", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("datasets", help="dataset tools")
    dsub = p.add_subparsers(dest="datasets_command", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    c = dsub.add_parser("check", help="which dataset releases are present and complete under a root")
    c.add_argument("--root", required=True)
    c.add_argument("--path", action="append", default=[], metavar="NAME=FOLDER")
    return parser


def _one_line(err: BaseException) -> str:
    return str(err).strip().replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from robustft.log import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO, rank=int(os.environ.get("RANK", "0")))
    from robustft import commands
    from robustft.engine.signals import TrainingInterrupted

    try:
        return commands.dispatch(args) or 0
    except TrainingInterrupted as err:  # a signal, not bad input: the checkpoint is kept for --resume
        print(f"robustft {args.command}: interrupted: {_one_line(err)}", file=sys.stderr)
        return 130
    except RobustFTError as err:
        print(f"robustft {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustft {args.command}: interrupted", file=sys.stderr)
        return 130

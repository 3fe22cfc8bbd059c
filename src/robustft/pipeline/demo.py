"""`robustft demo`: the whole story on a synthetic world, on CPU, in minutes.

Steps (each through the same code users run): generate the world (cached), pretrain the
tiny demo CLIP on its image-caption pairs (cached), build the zero-shot run from prompt
templates, fine-tune with each method in parallel single-thread jobs (`robustft train`
subprocesses), sweep WiSE-FT for ft and the flagship, export a CAM grid, and write the
report (results.jsonl, report.md, report.csv, PNG plots). See docs/demo.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tqdm.auto import tqdm

from robustft.data.synthetic import SHIFTS, WorldConfig
from robustft.errors import ConfigError, TrainingError
from robustft.model.pretrain import PretrainSettings, load_or_pretrain_demo_clip
from robustft.pipeline.cam import run_cam_export
from robustft.pipeline.data import world_paths
from robustft.pipeline.evaluate import run_eval, run_report, run_wise
from robustft.pipeline.runs import prepare_run_dir
from robustft.pipeline.soup import run_soup
from robustft.pipeline.zeroshot import run_zeroshot

__all__ = ["DemoJob", "demo_jobs", "run_demo", "FLAGSHIP"]

logger = logging.getLogger(__name__)

FLAGSHIP = "ObjMaskSingleFill(0.3)"  # the masking of the CAM grid (demo_runs.yaml: flagship)
QUICK_PRETRAIN = PretrainSettings(steps=150, eval_every=50)
"""Shorter pretraining for --quick (its own cache entry); zero-shot is already robust by then."""


@dataclass(frozen=True)
class DemoJob:
    """One fine-tuning run of the demo: a name, the method and its `--set` overrides."""

    name: str
    method: str
    overrides: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    def args(self, out: Path, pretrained: str) -> list[str]:
        sets = [f"method.name={self.method}", f"seed={self.seed}", f"name={self.name}",
                f"model.pretrained={pretrained}", *self.overrides]
        return ["train", "--config", "demo", "--out", str(out), "--no-progress",
                *(x for s in sets for x in ("--set", s))]


def _mode(quick: bool, everything: bool) -> str:
    return "quick" if quick else ("all" if everything else "default")


def demo_plan() -> dict[str, Any]:
    """The demo's runs, WiSE-FT sweeps and soup, from ``demo_runs.yaml`` beside this module."""
    text = (resources.files("robustft.pipeline") / "demo_runs.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def demo_jobs(quick: bool, seeds: int, everything: bool = False) -> list[DemoJob]:
    """The fine-tuning runs of the demo (``--quick``: ft and the flagship only; ``--all``: every run)."""
    mode = _mode(quick, everything)
    base = [(r["name"], r["method"], tuple(r.get("sets", ()))) for r in demo_plan()["runs"] if mode in r["modes"]]
    quick_sets = ("optim.epochs=2",) if quick else ()
    return [DemoJob(f"{name}-s{seed}", method, overrides + quick_sets, seed)
            for seed in range(seeds) for name, method, overrides in base]


def _run_job(job: DemoJob, runs: Path, logs: Path, pretrained: str) -> Path:
    out = runs / job.name
    log = logs / f"{job.name}.log"
    # One thread per job: independent runs in parallel beat one run with two threads on a
    # small CPU (threads of small matrix products mostly wait for each other).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    resume = ["--resume"] if (out / "run.json").is_file() and not (out / "results.jsonl").is_file() else []
    if (out / "results.jsonl").is_file():
        return out  # finished in an earlier, interrupted demo
    with open(log, "w", encoding="utf-8") as handle:
        proc = subprocess.run([sys.executable, "-m", "robustft", *job.args(out, pretrained), *resume],
                              stdout=handle, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        raise TrainingError(f"demo run {job.name} failed (exit {proc.returncode}); see {log}: {' | '.join(tail)}")
    return out


def _cpu_jobs(jobs: int | None) -> int:
    n = jobs if jobs is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                       else os.cpu_count() or 1)
    if n < 1:
        raise ConfigError(f"--jobs must be >= 1, got {n}")
    return n


def _append(dst: Path, src: Path) -> None:
    with open(dst, "a", encoding="utf-8") as out:
        out.write(src.read_text(encoding="utf-8"))


def _test_pairs(paths: dict[str, Path]) -> str:
    return ",".join(f"{name}={paths[name]}" for name in ("id", *SHIFTS))


def run_demo(*, out: str = "demo-out", quick: bool = False, seeds: int = 1, jobs: int | None = None,
             overwrite: bool = False, progress: bool = True, everything: bool = False) -> str:
    """Run the demo into ``out``; returns the final table with the total time.

    ``everything`` (``--all``) adds the runs of demo_runs.yaml's ``all`` mode and a greedy
    soup of each seed's fine-tuned runs; in the folder of a default demo it reuses its runs.
    """
    if quick and everything:
        raise ConfigError("--quick and --all contradict each other; give one of them")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    n_jobs = _cpu_jobs(jobs)
    start = time.perf_counter()
    # The seed count is not part of the identity: `--seeds 3` in the folder of a 1-seed demo
    # re-enters it and reuses the finished seed-0 runs.
    identity = hashlib.sha256(json.dumps({"quick": quick}).encode()).hexdigest()[:12]
    root = prepare_run_dir(out, kind="demo", identity=identity, overwrite=overwrite)
    timings: dict[str, float] = {}

    def lap(what: str, t0: float) -> None:
        timings[what] = time.perf_counter() - t0
        logger.info("demo: %s done in %.0f s", what, timings[what])

    t0 = time.perf_counter()
    world = world_paths(WorldConfig())
    lap("world", t0)
    t0 = time.perf_counter()
    settings = QUICK_PRETRAIN if quick else PretrainSettings()
    bundle = load_or_pretrain_demo_clip(WorldConfig(), settings=settings, progress=progress)
    pretrained = bundle.pretrained
    lap("pretraining", t0)

    t0 = time.perf_counter()
    results = root / "results.jsonl"
    results.unlink(missing_ok=True)
    classes = sorted(p.name for p in world.splits["train"].iterdir() if p.is_dir())
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    zs_dir = root / "runs" / "zeroshot"
    run_zeroshot(model=bundle.name, pretrained=pretrained, classnames=str(root / "classnames.txt"),
                 templates=str(world.templates), out=zs_dir, device="cpu", overwrite=True, progress=False)
    tests = _test_pairs(world.splits)
    # workers=0: 64-px PNGs decode faster in-process than worker processes start.
    run_eval(run=str(zs_dir), data_root=None, suite=None, datasets=tests, paths=[], out=str(results),
             device="cpu", workers=0, batch_size=300, progress=False)
    lap("zero-shot", t0)

    t0 = time.perf_counter()
    runs, logs = root / "runs", root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    plan = demo_plan()
    job_list = demo_jobs(quick, seeds, everything)
    done: dict[str, Path] = {}
    with ThreadPoolExecutor(max_workers=n_jobs) as pool, \
            tqdm(total=len(job_list), desc="fine-tuning runs", disable=not progress, unit="run") as bar:
        futures = {pool.submit(_run_job, job, runs, logs, pretrained): job for job in job_list}
        for future, job in futures.items():
            done[job.name] = future.result()
            bar.update(1)
    for job in job_list:
        _append(results, done[job.name] / "results.jsonl")
    lap("fine-tuning", t0)

    t0 = time.perf_counter()
    alphas = "0:1:0.5" if quick else "0:1:0.25"
    for seed in range(seeds):
        for name in plan["wise"]:
            run_wise(zeroshot=str(zs_dir), finetuned=str(done[f"{name}-s{seed}"]), alphas=alphas, data_root=None,
                     suite=None, datasets=tests, paths=[], out=str(results), device="cpu", workers=0,
                     batch_size=300, progress=False)
    lap("WiSE-FT", t0)

    if _mode(quick, everything) in plan["soup"]["modes"]:
        t0 = time.perf_counter()
        for seed in range(seeds):
            soup_dir = runs / f"soup-s{seed}"
            ingredients = [str(done[job.name]) for job in job_list if job.seed == seed]
            run_soup(runs=ingredients, out=str(soup_dir), greedy=bool(plan["soup"]["greedy"]), batch_size=300,
                     workers=0, device="cpu", progress=False, overwrite=True)
            run_eval(run=str(soup_dir), data_root=None, suite=None, datasets=tests, paths=[], out=str(results),
                     device="cpu", workers=0, batch_size=300, progress=False)
        lap("soup", t0)

    t0 = time.perf_counter()
    run_cam_export(run=str(zs_dir), images=str(world.splits["id"]), cam="mmcam", masking=FLAGSHIP,
                   out=str(root / "cams.npz"), grid=str(root / "cam_grid.png"), limit=8, device="cpu")
    table = run_report([str(results)], str(root), id_dataset="id")
    lap("report", t0)
    total = time.perf_counter() - start
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    return (f"{table}\n\nCAM grid: {root / 'cam_grid.png'}\n"
            f"demo finished in {total / 60:.1f} min ({steps}); {len(job_list)} fine-tuning runs on {n_jobs} job(s)")

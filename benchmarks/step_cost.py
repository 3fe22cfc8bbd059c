"""Cost of one training step of each method, relative to plain fine-tuning, timed in ONE process.

For one architecture (default ViT-B-32 at 224 px, random weights), batch size and device,
this script builds the student and the frozen teacher once, builds every requested method
with :func:`robustft.methods.build_method` and the real :class:`MethodOptions`, and times
full training steps as the trainer runs them: the method's forward (under bf16 autocast
with ``--precision bf16``), the backward of the loss, gradient clipping at norm 1.0, the
non-finite check, the AdamW step (:func:`robustft.engine.optim.build_optimizer`) and
``zero_grad(set_to_none=True)``. The learning-rate schedule is left out (a few scalar
operations).

How the timing resists a shared machine:

- After ``--warmup`` untimed steps per method, the ``--steps`` timed steps run in rounds:
  each round times one step of every method, in a rotating order, so a burst of load from
  other processes hits all methods alike. ``s/step`` is the median over rounds, ``min`` the
  fastest; ``ratio_to_ft`` is the median over rounds of ``t(method) / t(ft)`` in the same
  round (both from this run).
- Every step is also timed in process CPU time (``time.process_time``). With ``--threads 1``
  that is the time the step computed, whatever the scheduler took away, so
  ``cpu_ratio_to_ft`` is the ratio to trust on a loaded machine (it still feels the memory
  bandwidth and caches other processes use). With several threads it also counts the
  threads' spin-waiting, and on CUDA it means nothing (use the wall-clock columns).
  The phase breakdown uses CPU time on CPU and wall time (with syncs) on CUDA.
- ``os.getloadavg()`` is recorded before and after; compare runs only at similar load.

Peak memory (``peak_mem_mb``) is measured for each method in a FRESH child process
(``multiprocessing`` spawn), which builds only what that method holds (student; teacher
when it distils; the CAM cache when it uses one) and runs ``--mem-steps`` steps:

- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the models were
  built (weights, gradients, AdamW state, activations, counterfactual images);
- CPU: the peak resident set size (``VmHWM``) minus the RSS before the models were built.
  The peak is reset (``/proc/self/clear_refs``) after the models are built and CLIP's own
  text tower is freed, so the transient full-CLIP construction does not count (a method
  that trains the text tower holds a copy of it, which counts, as in training).

Other outputs: a phase breakdown of ``--breakdown-steps`` extra steps per method (clean
forward, CAM, masking, teacher forward, student forward on the counterfactual, caption
tokenization and text-tower forward for FLYP, backward, clip, optimizer; measured by
wrapping the method's own calls with timers), an evaluation
forward timing (``ImageClassifier`` under ``inference_mode`` against open_clip's
``encode_image`` plus the head matmul, same weights and images), and with ``--profile`` a
``torch.profiler`` operator table per method.

Examples::

    python benchmarks/step_cost.py                                   # ViT-B-32, batch 8, CPU
    python benchmarks/step_cost.py --batch 32 --steps 3 --warmup 1 --json b32.json
    python benchmarks/step_cost.py --methods all --json all.json
    python benchmarks/step_cost.py --methods fd objective                # FLYP, FLYP + cf-FD, L2-SP against ft
    python benchmarks/step_cost.py --model ViT-B-16 --batch 128 --device cuda --precision bf16 --steps 20 --warmup 5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from robustft.engine.optim import build_optimizer, default_param_groups
from robustft.methods import METHODS, MethodOptions, build_method
from robustft.methods.base import Method, feature_loss, task_loss
from robustft.methods.task_contrastive import TextSide
from robustft.model import ClassifierHead, ImageClassifier, compute_cam, load_clip
from robustft.model.prompts import load_classnames, load_templates
from robustft.model.text import TextTower
from robustft.ops.cam import normalize_cam
from robustft.ops.masking import build_counterfactual, make_generator, parse_masking

NUM_CLASSES = 1000  # with ImageNet's class names for the captions of the text-training cases
TEMPLATES = "openai_imagenet"  # CLIP's 80 ImageNet templates: each caption row draws one
POOL_BATCHES = 4  # distinct synthetic batches cycled through (the CAM cache covers them all)


# ----------------------------------------------------------------------------- what to run
@dataclass(frozen=True)
class Case:
    """One method configuration to time.

    Attributes:
        key: Short id used on the command line and in the table.
        method: Registered method name.
        masking: Masking strategy (paper notation) or None.
        cam_source: ``"student"``, ``"teacher"`` or None (no CAM).
        cached: The teacher CAM comes from a precomputed cache (``teacher_cams``).
        reference: Run the reference implementation's pass sequence (:class:`ReferenceSequence`)
            instead of the registered method's.
    """

    key: str
    method: str
    masking: str | None = None
    cam_source: str | None = None
    cached: bool = False
    reference: bool = False

    @property
    def source_label(self) -> str:
        if self.cam_source is None:
            return "-"
        return "teacher-cache" if self.cached else self.cam_source


PRESETS: dict[str, Case] = {c.key: c for c in (
    Case("ft", "ft"),
    Case("kd", "kd"),
    Case("fd", "fd"),
    Case("rand", "fd-refill", "RandMaskSingleFill(0.5)"),
    Case("flagship", "fd-refill", "ObjMaskSingleFill(0.3)", "student"),
    Case("flagship-teacher", "fd-refill", "ObjMaskSingleFill(0.3)", "teacher"),
    Case("flagship-cached", "fd-refill", "ObjMaskSingleFill(0.3)", "teacher", cached=True),
    Case("kd-refill", "kd-refill", "ObjMaskSingleFill(0.3)", "student"),
    Case("tokendrop", "fd-tokendrop", "RandMaskNoFill(0.75)"),
    Case("attnmask", "fd-attnmask", "ObjMaskNoFill(0.3)", "student"),
    Case("l2sp", "l2sp"),
    Case("flyp", "flyp"),
    Case("flyp-fd-refill", "flyp-fd-refill", "ObjMaskSingleFill(0.3)", "student"),
    Case("ref-fd", "fd", reference=True),
    Case("ref-rand", "fd-refill", "RandMaskSingleFill(0.5)", reference=True),
    Case("ref-flagship", "fd-refill", "ObjMaskSingleFill(0.3)", "student", reference=True),
)}
DEFAULT_CASES = ("ft", "fd", "rand", "flagship", "flagship-cached")
REFERENCE_CASES = ("ref-fd", "ref-rand", "ref-flagship")
OBJECTIVE_CASES = ("flyp", "flyp-fd-refill", "l2sp")  # methods of the objective layer beyond CE + distillation
GROUPS = {"reference": REFERENCE_CASES, "objective": OBJECTIVE_CASES}


def parse_case(text: str) -> Case:
    """A preset key, or ``METHOD[@MASKING[@SOURCE]]`` with SOURCE student|teacher|teacher-cache."""
    if text in PRESETS:
        return PRESETS[text]
    parts = text.split("@")
    if len(parts) > 3 or not parts[0]:
        raise SystemExit(f"bad case {text!r}: use one of {', '.join(PRESETS)} or METHOD[@MASKING[@SOURCE]]")
    masking = parts[1] if len(parts) > 1 else None
    source = parts[2] if len(parts) > 2 else None
    if source not in (None, "student", "teacher", "teacher-cache"):
        raise SystemExit(f"bad CAM source {source!r} in {text!r}: use student, teacher or teacher-cache")
    cached = source == "teacher-cache"
    return Case(text, parts[0], masking, "teacher" if cached else source, cached)


def resolve_cases(names: Sequence[str]) -> list[Case]:
    """Cases in the given order, ft first (every ratio needs it); ``all`` expands to every preset."""
    keys: list[str] = []
    for name in names:
        keys.extend(PRESETS if name == "all" else GROUPS.get(name, [name]))
    cases = [parse_case(k) for k in dict.fromkeys(keys)]
    if not any(c.key == "ft" for c in cases):
        cases.insert(0, PRESETS["ft"])
    return sorted(cases, key=lambda c: c.key != "ft")


# ----------------------------------------------------------------------------- models and data
class Models(NamedTuple):
    clip_model: Any
    teacher: ImageClassifier
    student: ImageClassifier
    tokenizer: Callable[[list[str]], torch.Tensor]


def load_models(name: str, device: torch.device, seed: int) -> Models:
    """The open_clip model, frozen teacher and student copy with random weights, on ``device``, and
    the model's tokenizer.

    The head is a random [1000, D] zero-shot-like head (unit rows times logit_scale.exp()).
    The teacher shares the open_clip model's image tower (the eval comparison needs both).
    """
    torch.manual_seed(seed)
    bundle = load_clip(name, "none")
    dim = int(bundle.model.visual.output_dim)
    weights = F.normalize(torch.randn(NUM_CLASSES, dim), dim=-1)
    head = ClassifierHead.from_zeroshot(weights, bundle.model.logit_scale)
    teacher = ImageClassifier(bundle.model.visual, head, bundle.preprocess).to(device).eval()
    student = copy.deepcopy(teacher).train()
    return Models(bundle.model.to(device), teacher, student, bundle.tokenizer)


def build_models(name: str, device: torch.device, seed: int) -> tuple[Any, ImageClassifier, ImageClassifier]:
    """(open_clip model, frozen teacher, student copy): :func:`load_models` without the tokenizer."""
    clip_model, teacher, student, _ = load_models(name, device, seed)
    return clip_model, teacher, student


def needs_text(case: Case) -> bool:
    """Whether the case's method trains the text tower (FLYP and its compositions)."""
    options = MethodOptions(masking=case.masking, cam_source=case.cam_source or "student")
    return not case.reference and METHODS.get(case.method).requirements(options).text_tower


def build_text_side(clip_model: Any, tokenizer: Callable[[list[str]], torch.Tensor],
                    device: torch.device) -> TextSide:
    """What the pipeline gives a text-training method: a trainable COPY of the same CLIP's text
    tower, the model's tokenizer, ImageNet's 1000 class names and CLIP's 80 templates."""
    tower = TextTower.from_clip(clip_model, copy=True).to(device).train()
    return TextSide(tower=tower, tokenizer=tokenizer, classnames=load_classnames("imagenet"),
                    templates=load_templates(TEMPLATES))


def make_pool(batch: int, size: int, device: torch.device, seed: int) -> list[dict[str, torch.Tensor]]:
    """``POOL_BATCHES`` synthetic batches ``{"image" [B,3,S,S] in [0,1], "label", "index", "template"}``.

    ``template`` is each row's template index (a caption row, as FLYP's loader yields them);
    methods without a text tower ignore it.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    n = batch * POOL_BATCHES
    images = torch.rand(n, 3, size, size, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    templates = torch.randint(0, len(load_templates(TEMPLATES)), (n,), generator=gen)
    return [{"image": images[i:i + batch].to(device), "label": labels[i:i + batch].to(device),
             "index": torch.arange(i, i + batch, device=device), "template": templates[i:i + batch].to(device)}
            for i in range(0, n, batch)]


def teacher_cam_cache(teacher: ImageClassifier, pool: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Raw teacher MMCAMs of every pool image, ``[N, gh, gw]`` on the CPU (what ``cam-cache`` stores)."""
    rows = [compute_cam(teacher, b["image"], b["label"], "mmcam").raw.float().cpu() for b in pool]
    return torch.cat(rows)


class ReferenceSequence(torch.nn.Module):
    """The reference implementation's step sequence for fd / fd-refill, on robustft's modules.

    What the reference code runs per step (its trainer, read for this comparison), with
    robustft's ViT forward, CAM and masking functions standing in for its own modules:

    - an MMCAM masking runs its OWN student forward with attention maps and the gradient to
      them (``compute_cam`` on the student), separate from the passes below;
    - the teacher runs once on the (counterfactual) images, without autograd;
    - the student runs on the (counterfactual) images for the features, and AGAIN on the
      clean images for the task logits, both with autograd (for ``fd`` on clean images that
      is two student passes over the same images).

    The loss is the same as robustft's (task CE + w * feature MSE). Because the modules are
    robustft's (fused attention, CLS-only last block), this times the step sequence alone:
    the reference's own modules would be slower still.
    """

    def __init__(self, case: Case, student: ImageClassifier, teacher: ImageClassifier, distill_weight: float) -> None:
        super().__init__()
        self.name = f"reference {case.method}"
        self.student, self.teacher = student, teacher
        self.spec = parse_masking(case.masking) if case.masking else None
        self.distill_weight = distill_weight
        self._generator: torch.Generator | None = None

    def trainable_module(self) -> torch.nn.Module:
        return self.student

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return default_param_groups(self.student, weight_decay)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        x = images
        if self.spec is not None:
            if self._generator is None:
                self._generator = make_generator(0, 0, images.device)
            cam = compute_cam(self.student, images, labels, "mmcam").raw if self.spec.needs_cam else None
            x = build_counterfactual(images, self.spec, patch=self.student.patch_size,
                                     cam_norm=normalize_cam(cam.flatten(1)) if cam is not None else None,
                                     generator=self._generator).images
        with torch.no_grad():
            t_feat = self.teacher.forward_features(x).features
        s_feat = self.student.forward_features(x).features
        logits = self.student(images)
        loss = task_loss(logits, labels) + self.distill_weight * feature_loss(s_feat, t_feat)
        return {"loss": loss, "logits": logits}


def build_case(case: Case, student: ImageClassifier, teacher: ImageClassifier | None,
               cams: torch.Tensor | None, text: TextSide | None = None) -> Method | ReferenceSequence:
    """The case's method; ``text`` is the text side of the cases that train the text tower."""
    options = MethodOptions(masking=case.masking, cam_source=case.cam_source or "student")
    if case.reference:
        if teacher is None:
            raise SystemExit(f"case {case.key!r} needs the teacher")
        return ReferenceSequence(case, student, teacher, options.distill_weight)
    if needs_text(case) and text is None:
        raise SystemExit(f"case {case.key!r} trains the text tower: pass build_text_side(...) as text")
    context = {"text": text} if text is not None else None
    return build_method(case.method, student, teacher, options, teacher_cams=cams if case.cached else None,
                        context=context)


# ----------------------------------------------------------------------------- one training step
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """Runs the trainer's step sequence for one method and times it (optionally per phase)."""

    def __init__(self, method: Method | ReferenceSequence, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str, trainable: Sequence[tuple[torch.nn.Parameter, bool]] = ()):
        """``trainable``: (parameter, requires_grad) pairs set before every step (untimed), for
        cases that share modules but train different parts of them (FLYP's head is frozen)."""
        self.method, self.optimizer, self.device = method, optimizer, device
        self.params = [p for p in method.trainable_module().parameters() if p.requires_grad]
        self.precision = precision
        self.trainable = list(trainable)
        self.phases: dict[str, float] | None = None
        self._open: list[str] = []  # phases entered and not left, innermost last
        self._mark = 0.0

    def _autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the enclosed block's time to ``phases[name]``, exclusive of nested phases.

        Process CPU time on CPU, wall time (with syncs) on CUDA. Time spent in a phase
        entered inside this one is charged to the inner phase only, so the phases add up
        to the step.
        """
        if self.phases is None:
            yield
            return
        self._switch_to(name)
        try:
            yield
        finally:
            self._switch_to(None)

    def _switch_to(self, name: str | None) -> None:
        """Close the running interval: enter ``name`` (push) or leave the innermost phase (None)."""
        assert self.phases is not None
        sync(self.device)
        now = self.clock()
        if self._open:
            current = self._open[-1]
            self.phases[current] = self.phases.get(current, 0.0) + now - self._mark
        if name is None:
            self._open.pop()
        else:
            self._open.append(name)
        self._mark = now

    def clock(self) -> float:
        return time.perf_counter() if self.device.type == "cuda" else time.process_time()

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """One optimizer step on ``batch``; returns its (wall, process CPU) time in seconds."""
        for param, flag in self.trainable:
            param.requires_grad_(flag)
        sync(self.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        with self.phase("forward"), self._autocast():
            out = self.method(batch)
        with self.phase("backward"):
            out["loss"].backward()
        with self.phase("clip+check"):
            norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            if not bool(torch.isfinite(out["loss"]) & torch.isfinite(norm)):
                raise RuntimeError(f"{self.method.name}: non-finite loss or gradient in the benchmark")
        with self.phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - start, time.process_time() - start_cpu


_UNSET = object()


def _timed_wrapper(stepper: Stepper, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with stepper.phase(name):
            return fn(*args, **kwargs)
    return wrapped


def breakdown(stepper: Stepper, teacher: ImageClassifier | None, pool: Sequence[dict[str, torch.Tensor]],
              steps: int) -> dict[str, float]:
    """Median seconds per phase over ``steps`` steps, by timing the method's own calls.

    The method's attributes are shadowed on the instance for the duration only. Phase
    times are exclusive: ``forward (rest)`` is what the method's forward spends outside the
    named passes (losses, glue); ``masking`` excludes the CAM; ``cam`` excludes the teacher
    forward that a CAM computed on the fly runs (counted under ``teacher forward``).
    """
    method = stepper.method
    patched: list[tuple[Any, str, Any]] = []  # (object, attribute, its own value before, or _UNSET)

    def patch(obj: Any, attr: str, name: str) -> None:
        if obj is not None and hasattr(obj, attr):
            patched.append((obj, attr, vars(obj).get(attr, _UNSET)))
            setattr(obj, attr, _timed_wrapper(stepper, name, getattr(obj, attr)))

    # The counterfactual term of the composition (objective layer) owns the CAM and the masking.
    term = next((t for t in getattr(method, "reg_terms", ()) if hasattr(t, "counterfactual")), None)
    if getattr(getattr(term, "masking", None), "needs_cam", False):
        patch(term, "_cam", "cam")  # the CAM, or its look-up in the teacher-CAM cache
    patch(term, "counterfactual", "masking")
    patch(teacher, "forward_features", "teacher forward")
    # A text-training task (FLYP) tokenizes the batch's captions and runs the text tower
    # (its backward is part of "backward").
    patch(getattr(getattr(method, "objective", None), "side", None), "tokenizer", "tokenize")
    student_call = method.student_call
    calls = {"n": 0}

    def timed_student_call(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "encode_text":
            with stepper.phase("text tower forward"):
                return student_call(name, *args, **kwargs)
        label = "student clean forward" if calls["n"] == 0 else "student cf forward"
        if calls["n"] == 0 and args and args[0].shape[0] > calls["batch"]:
            label = "student clean+cf forward"  # one pass over [x; x_cf]
        calls["n"] += 1
        with stepper.phase(label):
            return student_call(name, *args, **kwargs)

    patched.append((method, "student_call", _UNSET))
    method.student_call = timed_student_call  # type: ignore[method-assign]
    runs: list[dict[str, float]] = []
    try:
        for i in range(steps):
            stepper.phases, calls["n"], calls["batch"] = {}, 0, pool[i % len(pool)]["image"].shape[0]
            wall, cpu = stepper.step(pool[i % len(pool)])
            runs.append({**_net_phases(stepper.phases), "(step)": wall if stepper.device.type == "cuda" else cpu})
    finally:
        stepper.phases = None
        for obj, attr, before in reversed(patched):
            if before is _UNSET:
                delattr(obj, attr)
            else:
                setattr(obj, attr, before)
    # "(step)" is the whole step on the same clock, to check that the phases account for it.
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]} if runs else {}


def _net_phases(p: dict[str, float]) -> dict[str, float]:
    """Phase times under their printed names (the method's own forward time is what is left)."""
    out = {("forward (rest)" if k == "forward" else k): v for k, v in p.items()}
    return out


# ----------------------------------------------------------------------------- timing rounds
def time_cases(steppers: dict[str, Stepper], pool: Sequence[dict[str, torch.Tensor]], warmup: int,
               steps: int) -> dict[str, list[tuple[float, float]]]:
    """Per case, (wall, CPU) seconds of each of ``steps`` timed steps, measured round-robin."""
    keys = list(steppers)
    for key in keys:
        for i in range(warmup):
            steppers[key].step(pool[i % len(pool)])
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    for r in range(steps):
        order = keys[r % len(keys):] + keys[:r % len(keys)]  # rotate: no case always runs first
        for key in order:
            times[key].append(steppers[key].step(pool[r % len(pool)]))
        print(f"  round {r + 1}/{steps} (wall/cpu s): "
              + ", ".join(f"{k} {times[k][-1][0]:.2f}/{times[k][-1][1]:.2f}" for k in keys), flush=True)
    return times


def time_eval(clip_model: Any, classifier: ImageClassifier, images: torch.Tensor, repeats: int,
              precision: str) -> dict[str, float]:
    """Eval forward: ``ImageClassifier`` vs open_clip ``encode_image`` + head, best and median seconds.

    Wall time, and on CPU also process CPU time (``*_cpu_*`` keys; see the module docstring).
    """
    device = images.device
    mean, std = classifier.pixel_mean, classifier.pixel_std
    weight, bias = classifier.head.weight, classifier.head.bias
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def plain() -> torch.Tensor:
        return F.linear(F.normalize(clip_model.encode_image((images - mean) / std), dim=-1), weight, bias)

    def ours() -> torch.Tensor:
        return classifier(images)

    runs: dict[str, list[float]] = {"open_clip": [], "robustft": []}
    cpu_runs: dict[str, list[float]] = {"open_clip": [], "robustft": []}
    classifier.eval()
    with torch.inference_mode(), autocast:
        # Same weights, same images: same logits (also the warm-up). Logits are 100 * cosine.
        tol = 3.0 if precision == "bf16" else 1e-2
        torch.testing.assert_close(ours().float(), plain().float(), rtol=0, atol=tol)
        for r in range(repeats):
            for name, fn in (("open_clip", plain), ("robustft", ours))[:: 1 if r % 2 == 0 else -1]:
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                sync(device)
                runs[name].append(time.perf_counter() - start)
                cpu_runs[name].append(time.process_time() - start_cpu)
    n = images.shape[0]
    result = {f"{k}_median_s": statistics.median(v) for k, v in runs.items()}
    if device.type == "cpu":
        result.update({f"{k}_cpu_median_s": statistics.median(v) for k, v in cpu_runs.items()})
        result["cpu_ratio_median"] = result["robustft_cpu_median_s"] / result["open_clip_cpu_median_s"]
        result["cpu_ratio_min"] = min(cpu_runs["robustft"]) / min(cpu_runs["open_clip"])
    result.update({f"{k}_min_s": min(v) for k, v in runs.items()})
    result.update({f"{k}_images_per_s": n / statistics.median(v) for k, v in runs.items()})
    result["ratio_median"] = result["robustft_median_s"] / result["open_clip_median_s"]
    result["ratio_min"] = result["robustft_min_s"] / result["open_clip_min_s"]
    return result


# ----------------------------------------------------------------------------- peak memory (child)
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _trim_and_reset_peak() -> bool:
    """Give freed heap back to the OS and reset the peak RSS; False if the reset is unavailable."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(config: dict[str, Any]) -> dict[str, Any]:
    """Peak memory (MiB) of ``config["steps"]`` steps of one case, in a fresh process."""
    torch.set_num_threads(config["threads"])
    case = Case(**config["case"])
    device = torch.device(config["device"])
    pool = make_pool(config["batch"], config["image_size"], device, config["seed"])  # inputs: not counted
    gc.collect()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
    else:
        _trim_and_reset_peak()
        base = _status_kb("VmRSS") * 1024
    clip_model, teacher, student, tokenizer = load_models(config["model"], torch.device("cpu"), config["seed"])
    # The text tower is part of a method only when it trains it (a copy, as the pipeline holds it).
    text = build_text_side(clip_model, tokenizer, device) if needs_text(case) else None
    del clip_model
    teacher = teacher.to(device) if METHODS.get(case.method).needs_teacher else None
    cams = teacher_cam_cache(teacher, pool) if case.cached and teacher is not None else None
    method = build_case(case, student.to(device), teacher, cams, text)
    optimizer = build_optimizer(method.param_groups(0.1), lr=3e-5, weight_decay=0.1)
    gc.collect()
    # The peak starts from what is held now (models, cache): transients of the construction
    # (the full CLIP, the cache's CAM passes) are not part of a training step.
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        how = "cuda max_memory_allocated, from before the models were built"
    else:
        how = ("peak RSS (VmHWM) minus RSS before the models were built; peak reset after construction"
               if _trim_and_reset_peak() else "peak RSS (VmHWM), NOT reset: includes model construction")
    stepper = Stepper(method, optimizer, device, config["precision"])
    for i in range(config["steps"]):
        stepper.step(pool[i % len(pool)])
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_kb("VmHWM") * 1024)
    return {"peak_mem_mb": (peak - base) / 2**20, "mem_method": how}


def memory_table(cases: Sequence[Case], args: argparse.Namespace, image_size: int) -> dict[str, dict[str, Any]]:
    """``measure_memory`` of every case, each in its own spawned process (``args.mem_jobs`` at a time)."""
    ctx = mp.get_context("spawn")
    configs = [{"case": asdict(c), "model": args.model, "image_size": image_size, "batch": args.batch,
                "device": args.device,
                "precision": args.precision, "threads": args.threads, "seed": args.seed,
                "steps": args.mem_steps} for c in cases]
    with ctx.Pool(processes=max(1, min(args.mem_jobs, len(configs))), maxtasksperchild=1) as pool:
        results = pool.map(measure_memory, configs, chunksize=1)
    return {c.key: r for c, r in zip(cases, results)}


# ----------------------------------------------------------------------------- reporting
def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
            cpu = found.group(1).strip() if found else cpu
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
            "python": platform.python_version(), "platform": platform.platform()}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def print_table(records: Sequence[dict[str, Any]]) -> None:
    head = (f"{'case':<17} {'method':<13} {'masking':<24} {'cam_source':<13} {'images/s':>9} {'s/step':>8} "
            f"{'min s':>7} {'ratio_to_ft':>11} {'cpu s/step':>10} {'cpu ratio':>9} {'peak_mem_mb':>11}")
    print(head)
    print("-" * len(head))
    for r in records:
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        print(f"{r['case']:<17} {r['method']:<13} {r['masking'] or '-':<24} {r['cam_source_label']:<13} "
              f"{r['images_per_s']:>9.2f} {r['s_per_step']:>8.3f} {r['s_per_step_min']:>7.3f} "
              f"{r['ratio_to_ft']:>11.3f} {r['cpu_s_per_step']:>10.3f} {r['cpu_ratio_to_ft']:>9.3f} {mem:>11}")


def build_records(cases: Sequence[Case], times: dict[str, list[tuple[float, float]]], batch: int,
                  memory: dict[str, dict[str, Any]], phases: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    ft = [wall for wall, _ in times["ft"]]
    ft_cpu = [cpu for _, cpu in times["ft"]]
    ft_mem = memory.get("ft", {}).get("peak_mem_mb")
    records = []
    for c in cases:
        t = [wall for wall, _ in times[c.key]]
        cpu = [cpu for _, cpu in times[c.key]]
        med = statistics.median(t)
        mem = memory.get(c.key, {})
        records.append({
            "case": c.key, "method": c.method, "masking": c.masking,
            "cam_source": c.cam_source, "cam_cache": c.cached, "cam_source_label": c.source_label,
            "images_per_s": batch / med, "s_per_step": med, "s_per_step_min": min(t), "step_times_s": t,
            "ratio_to_ft": statistics.median(a / b for a, b in zip(t, ft)),
            "ratio_to_ft_of_min": min(t) / min(ft),
            "cpu_s_per_step": statistics.median(cpu), "cpu_step_times_s": cpu,
            "cpu_ratio_to_ft": statistics.median(a / b for a, b in zip(cpu, ft_cpu)),
            "cpu_ratio_to_ft_of_min": min(cpu) / min(ft_cpu),
            "peak_mem_mb": mem.get("peak_mem_mb"), "mem_method": mem.get("mem_method"),
            "mem_ratio_to_ft": (mem["peak_mem_mb"] / ft_mem) if mem and ft_mem else None,
            "phases_s": phases.get(c.key, {}),
        })
    return records


def print_phases(phases: dict[str, dict[str, float]]) -> None:
    if not phases:
        return
    print("\nphase breakdown (median seconds per step):")
    for key, p in phases.items():
        phases_only = {k: v for k, v in p.items() if k != "(step)"}
        parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(phases_only.items(), key=lambda kv: -kv[1]) if v > 5e-4)
        print(f"  {key:<17} step {p.get('(step)', 0.0):.3f}, phases {sum(phases_only.values()):.3f}: {parts}")


def profile_cases(steppers: dict[str, Stepper], pool: Sequence[dict[str, torch.Tensor]], rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for key, stepper in steppers.items():
        with profile(activities=activities) as prof:
            stepper.step(pool[0])
        sort = "self_cuda_time_total" if stepper.device.type == "cuda" else "self_cpu_time_total"
        print(f"\n=== torch.profiler, one step of {key} ===")
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


# ----------------------------------------------------------------------------- main
def build_steppers(cases: Sequence[Case], student: ImageClassifier, teacher: ImageClassifier,
                   cams: torch.Tensor | None, optimizer: torch.optim.Optimizer, device: torch.device,
                   precision: str, text: TextSide | None = None) -> dict[str, Stepper]:
    """One :class:`Stepper` per case, all on the same student, teacher, text side and optimizer.

    Sharing is fine for timing (random weights) but needs every case to train the whole
    image tower: a method that freezes part of it (lp, lp-ft) is refused. What each method
    chose to train (FLYP freezes the head, which it rebuilds from the text tower) is
    recorded after it is built and set again before each of its steps.
    """
    shared = [*student.parameters(), *(text.tower.parameters() if text is not None else ())]
    steppers = {}
    for case in cases:
        for param in shared:
            param.requires_grad_(True)
        method = build_case(case, student, teacher, cams, text if needs_text(case) else None)
        if not all(p.requires_grad for p in student.visual.parameters()):
            raise SystemExit(f"case {case.key!r}: method {case.method!r} trains only part of the student; "
                             "step_cost.py times methods that train the whole model")
        trainable = [(param, param.requires_grad) for param in shared]
        steppers[case.key] = Stepper(method, optimizer, device, precision, trainable)
    return steppers


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (robustft-tiny is registered)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed rounds (one step of every case per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per case before the rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_CASES),
                        help=f"cases: {', '.join(PRESETS)}, 'all', 'reference' (the ref-* cases: the reference "
                             "implementation's pass sequence), 'objective' (flyp, flyp-fd-refill, l2sp), or "
                             "METHOD[@MASKING[@SOURCE]] "
                             f"(default: {' '.join(DEFAULT_CASES)}; ft is always added)")
    parser.add_argument("--memory", choices=("child", "none"), default="child",
                        help="measure peak memory in a fresh process per case, or skip it")
    parser.add_argument("--mem-steps", type=int, default=2, help="steps per memory child (the peak is in step 2)")
    parser.add_argument("--mem-jobs", type=int, default=2, help="memory children run at once (timing is over)")
    parser.add_argument("--breakdown-steps", type=int, default=1, help="extra steps per case timed by phase")
    parser.add_argument("--eval-repeats", type=int, default=3, help="timed eval forwards per side (0: skip)")
    parser.add_argument("--eval-batches", type=int, default=2, help=f"batches per eval forward (<= {POOL_BATCHES})")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per case")
    parser.add_argument("--profile-rows", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="write the records (and run metadata) as JSON")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns the records (also printed, and written with ``--json``)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = resolve_cases(args.methods)
    load_before = os.getloadavg()
    started = time.perf_counter()
    clip_model, teacher, student, tokenizer = load_models(args.model, device, args.seed)
    pool = make_pool(args.batch, teacher.preprocess.image_size, device, args.seed)
    cams = teacher_cam_cache(teacher, pool) if any(c.cached for c in cases) else None
    text = build_text_side(clip_model, tokenizer, device) if any(needs_text(c) for c in cases) else None
    # One optimizer over everything any case trains; AdamW skips parameters without a gradient,
    # so a case pays only for what it trains.
    params = [*student.parameters(), *(text.tower.parameters() if text is not None else ())]
    optimizer = build_optimizer([{"params": params, "weight_decay": 0.1}], lr=3e-5, weight_decay=0.1)
    steppers = build_steppers(cases, student, teacher, cams, optimizer, device, args.precision, text)
    print(f"{args.model} {teacher.preprocess.image_size}px, batch {args.batch}, {device}, {args.precision}, "
          f"{args.threads} thread(s), cases: {', '.join(steppers)}; load average {load_before}", flush=True)
    times = time_cases(steppers, pool, args.warmup, args.steps)
    phases = {k: breakdown(s, teacher, pool, args.breakdown_steps) for k, s in steppers.items()
              if isinstance(s.method, Method)} if args.breakdown_steps > 0 else {}
    if args.profile:
        profile_cases(steppers, pool, args.profile_rows)
    eval_images = torch.cat([b["image"] for b in pool[:args.eval_batches]])
    evaluation = (time_eval(clip_model, teacher, eval_images, args.eval_repeats,
                            args.precision) if args.eval_repeats > 0 else None)
    load_after = os.getloadavg()
    image_size = teacher.preprocess.image_size
    del steppers, optimizer, student, teacher, clip_model, cams, text
    gc.collect()
    memory = memory_table(cases, args, image_size) if args.memory == "child" else {}
    records = build_records(cases, times, args.batch, memory, phases)
    print()
    print_table(records)
    print_phases(phases)
    if evaluation is not None:
        print(f"\neval forward, {len(eval_images)} images: open_clip encode_image + head "
              f"{evaluation['open_clip_images_per_s']:.2f} images/s, robustft ImageClassifier "
              f"{evaluation['robustft_images_per_s']:.2f} images/s; time ratio robustft/open_clip "
              f"{evaluation['ratio_median']:.3f} (median), {evaluation['ratio_min']:.3f} (best)"
              + (f"; CPU time ratio {evaluation['cpu_ratio_median']:.3f} (median), {evaluation['cpu_ratio_min']:.3f} "
                 "(best)" if "cpu_ratio_median" in evaluation else ""))
    print(f"load average before {load_before}, after {load_after}; wall {time.perf_counter() - started:.0f} s")
    if args.json:
        run = {"args": dict(vars(args)), "machine": machine_info(args), "loadavg_before": load_before,
               "loadavg_after": load_after, "eval_forward": evaluation}
        with open(args.json, "w") as f:  # a list of records; each carries the run's metadata
            json.dump([{**r, "run": run} for r in records], f, indent=1)
        print(f"wrote {args.json}")
    return records


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

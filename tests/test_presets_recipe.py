"""Every ``paper-vit-*`` preset resolves to its reference implementation's recipe.

The paper's rows (``PAPER``) are written from the reference code's scripts (``run.sh``,
``example.sh``) and the argument defaults of its two training entry points
(``main_standard.py`` for zero-shot / LP / FT / WiSE-FT, ``main_distill.py`` for KD and FD in
all their variants):

    --lr 3e-5  --weight_decay 0.1  --epoch 10  --lr_schedule 1cycle  --onecycle_pct_start 0.02
    --grad_clip 1  --batch 512  --val_size 10240  --accum_steps 1  --transform clip (no
    augmentation)  --w_task 1  --w_distill 30 (KD and FD alike)  --kd_temp 10  --wise_alpha 0.5
    LP: --freeze_backbone --weight_decay 0 (so the probe trains at 3e-5 without decay)
    WiSE-FT: interpolates the FT run's ckpt-last (the last weights, not the best epoch)
    maskings: the values of example.sh, one per variant

FLYP's rows (``FLYP``) are written from its reference code's ImageNet defaults: 10 epochs,
lr 1e-5, weight decay 0.1, batch 512, the 80 openai_imagenet templates, AdamW betas
0.9/0.999 and eps 1e-8 (fixed), 500 linear warm-up steps then cosine to 0, no gradient
clipping, fp32, training transform RandomResizedCrop(224, scale (0.9, 1.0), bicubic) without
a flip, same-class captions as negatives. robustft keeps its held-out best-epoch split
(10,240 images) there too. ``flyp-fd-refill`` is FLYP's recipe with the paper's
counterfactual FD (ObjMaskSingleFill(0.3), weight 30), a robustft composition.

L2-SP's rows are the paper's FT recipe with the L2-SP term as the LP-FT reference code
applies it to CLIP: lambda 0.01, no 1/2, the head included.

LP-FT is not in the reference code; its row holds robustft's documented settings. The test
reads what each stage really trains with (``stage_settings``), and runs each stage's
schedule on a small optimizer to see where the lr peaks and what beta1 does, so a preset,
the pipeline and the schedule can drift in none of these places.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from robustft.config import build_config, list_presets
from robustft.engine import build_optimizer, build_scheduler, default_param_groups
from robustft.model import load_templates
from robustft.pipeline.train import stage_settings

# What every paper preset shares.
COMMON = {
    "pretrained": "openai", "classnames": "imagenet", "templates": "openai_imagenet", "n_templates": 80,
    "train": "imagenet", "holdout": 10240, "batch_size": 512, "accum_steps": 1, "precision": "fp32",
    "betas": (0.9, 0.999), "eps": 1e-8, "task_weight": 1.0, "distill_weight": 30.0, "temperature": 10.0,
    "cam": "mmcam", "cam_source": "student", "donors": "permutation", "label_smoothing": 0.0, "alphas": [0.5],
    "wise_endpoint": "last", "l2sp_weight": 0.01, "multi_positive": False, "seed": 0,
    "eval_sets": ["imagenet", "imagenet-v2", "imagenet-r", "imagenet-sketch", "objectnet", "imagenet-a"],
}

# The schedule, its warm-up, clipping and training transform of each recipe. "peak_step" and
# "beta1" are read off the stage's schedule over a nominal run of NOMINAL_STEPS steps: the
# step where the lr first reaches its peak, and the (lowest, highest) Adam beta1 in force.
NOMINAL_STEPS = 2000
PAPER = {
    "schedule": "onecycle", "warmup": 0.02, "warmup_steps": 0, "clip_grad_norm": 1.0, "train_augment": False,
    "augment_crop_scale": [0.08, 1.0], "augment_flip": True,  # unused without train_augment: the defaults
    "peak_step": 39, "beta1": (0.85, 0.95),  # OneCycleLR: pct_start 0.02 of 2000 -> step 39; beta1 cycled
}
FLYP = {
    "schedule": "cosine", "warmup": 0.0, "warmup_steps": 500, "clip_grad_norm": 0.0, "train_augment": True,
    "augment_crop_scale": [0.9, 1.0], "augment_flip": False,
    "peak_step": 499, "beta1": (0.9, 0.9),  # 500 linear warm-up steps; betas fixed at 0.9/0.999
}

# (learning rate, weight decay, epochs) of each training stage.
FT = ((3e-5, 0.1, 10.0),)
LP = ((3e-5, 0.0, 10.0),)
LP_FT = ((1e-3, 0.1, 1.0), (3e-5, 0.1, 10.0))  # the probe stage, then FT
FLYP_STAGES = ((1e-5, 0.1, 10.0),)

# preset: (model, method, masking, stages, recipe); one row per shipped paper preset.
TABLE = [
    ("paper-vit-b32",                   "ViT-B-32", "ft",           "",                         FT, PAPER),
    ("paper-vit-b32-ft",                "ViT-B-32", "ft",           "",                         FT, PAPER),
    ("paper-vit-b32-lp",                "ViT-B-32", "lp",           "",                         LP, PAPER),
    ("paper-vit-b32-lp-ft",             "ViT-B-32", "lp-ft",        "",                         LP_FT, PAPER),
    ("paper-vit-b32-wise-ft",           "ViT-B-32", "wise-ft",      "",                         FT, PAPER),
    ("paper-vit-b32-kd",                "ViT-B-32", "kd",           "",                         FT, PAPER),
    ("paper-vit-b32-kd-refill",         "ViT-B-32", "kd-refill",    "ObjMaskSingleFill(0.3)",   FT, PAPER),
    ("paper-vit-b32-fd",                "ViT-B-32", "fd",           "",                         FT, PAPER),
    ("paper-vit-b32-fd-tokendrop",      "ViT-B-32", "fd-tokendrop", "RandMaskNoFill(0.75)",     FT, PAPER),
    ("paper-vit-b32-fd-attnmask-obj",   "ViT-B-32", "fd-attnmask",  "ObjMaskNoFill(0.3)",       FT, PAPER),
    ("paper-vit-b32-fd-attnmask-ctx",   "ViT-B-32", "fd-attnmask",  "CtxMaskNoFill(0.6)",       FT, PAPER),
    ("paper-vit-b32-fd-refill-rand",    "ViT-B-32", "fd-refill",    "RandMaskSingleFill(0.5)",  FT, PAPER),
    ("paper-vit-b32-fd-refill",         "ViT-B-32", "fd-refill",    "ObjMaskSingleFill(0.3)",   FT, PAPER),
    ("paper-vit-b32-fd-refill-ctx",     "ViT-B-32", "fd-refill",    "CtxMaskSingleFill(0.5)",   FT, PAPER),
    ("paper-vit-b32-fd-multifill-rand", "ViT-B-32", "fd-refill",    "RandMaskMultiFill(0.5)",   FT, PAPER),
    ("paper-vit-b32-fd-multifill-obj",  "ViT-B-32", "fd-refill",    "ObjMaskMultiFill(0.6)",    FT, PAPER),
    ("paper-vit-b32-fd-multifill-ctx",  "ViT-B-32", "fd-refill",    "CtxMaskMultiFill(0.3)",    FT, PAPER),
    ("paper-vit-b32-l2sp",              "ViT-B-32", "l2sp",         "",                         FT, PAPER),
    ("paper-vit-b32-flyp",              "ViT-B-32", "flyp",         "",                         FLYP_STAGES, FLYP),
    ("paper-vit-b32-flyp-fd-refill",    "ViT-B-32", "flyp-fd-refill", "ObjMaskSingleFill(0.3)", FLYP_STAGES, FLYP),
    ("paper-vit-b16",                   "ViT-B-16", "ft",           "",                         FT, PAPER),
    ("paper-vit-b16-ft",                "ViT-B-16", "ft",           "",                         FT, PAPER),
    ("paper-vit-b16-lp",                "ViT-B-16", "lp",           "",                         LP, PAPER),
    ("paper-vit-b16-lp-ft",             "ViT-B-16", "lp-ft",        "",                         LP_FT, PAPER),
    ("paper-vit-b16-wise-ft",           "ViT-B-16", "wise-ft",      "",                         FT, PAPER),
    ("paper-vit-b16-kd",                "ViT-B-16", "kd",           "",                         FT, PAPER),
    ("paper-vit-b16-kd-refill",         "ViT-B-16", "kd-refill",    "ObjMaskSingleFill(0.3)",   FT, PAPER),
    ("paper-vit-b16-fd",                "ViT-B-16", "fd",           "",                         FT, PAPER),
    ("paper-vit-b16-fd-tokendrop",      "ViT-B-16", "fd-tokendrop", "RandMaskNoFill(0.75)",     FT, PAPER),
    ("paper-vit-b16-fd-attnmask-obj",   "ViT-B-16", "fd-attnmask",  "ObjMaskNoFill(0.3)",       FT, PAPER),
    ("paper-vit-b16-fd-attnmask-ctx",   "ViT-B-16", "fd-attnmask",  "CtxMaskNoFill(0.6)",       FT, PAPER),
    ("paper-vit-b16-fd-refill-rand",    "ViT-B-16", "fd-refill",    "RandMaskSingleFill(0.5)",  FT, PAPER),
    ("paper-vit-b16-fd-refill",         "ViT-B-16", "fd-refill",    "ObjMaskSingleFill(0.3)",   FT, PAPER),
    ("paper-vit-b16-fd-refill-ctx",     "ViT-B-16", "fd-refill",    "CtxMaskSingleFill(0.5)",   FT, PAPER),
    ("paper-vit-b16-fd-multifill-rand", "ViT-B-16", "fd-refill",    "RandMaskMultiFill(0.5)",   FT, PAPER),
    ("paper-vit-b16-fd-multifill-obj",  "ViT-B-16", "fd-refill",    "ObjMaskMultiFill(0.6)",    FT, PAPER),
    ("paper-vit-b16-fd-multifill-ctx",  "ViT-B-16", "fd-refill",    "CtxMaskMultiFill(0.3)",    FT, PAPER),
    ("paper-vit-b16-l2sp",              "ViT-B-16", "l2sp",         "",                         FT, PAPER),
    ("paper-vit-b16-flyp",              "ViT-B-16", "flyp",         "",                         FLYP_STAGES, FLYP),
    ("paper-vit-b16-flyp-fd-refill",    "ViT-B-16", "flyp-fd-refill", "ObjMaskSingleFill(0.3)", FLYP_STAGES, FLYP),
    ("paper-vit-l14",                   "ViT-L-14", "ft",           "",                         FT, PAPER),
    ("paper-vit-l14-ft",                "ViT-L-14", "ft",           "",                         FT, PAPER),
    ("paper-vit-l14-lp",                "ViT-L-14", "lp",           "",                         LP, PAPER),
    ("paper-vit-l14-lp-ft",             "ViT-L-14", "lp-ft",        "",                         LP_FT, PAPER),
    ("paper-vit-l14-wise-ft",           "ViT-L-14", "wise-ft",      "",                         FT, PAPER),
    ("paper-vit-l14-kd",                "ViT-L-14", "kd",           "",                         FT, PAPER),
    ("paper-vit-l14-kd-refill",         "ViT-L-14", "kd-refill",    "ObjMaskSingleFill(0.3)",   FT, PAPER),
    ("paper-vit-l14-fd",                "ViT-L-14", "fd",           "",                         FT, PAPER),
    ("paper-vit-l14-fd-tokendrop",      "ViT-L-14", "fd-tokendrop", "RandMaskNoFill(0.75)",     FT, PAPER),
    ("paper-vit-l14-fd-attnmask-obj",   "ViT-L-14", "fd-attnmask",  "ObjMaskNoFill(0.3)",       FT, PAPER),
    ("paper-vit-l14-fd-attnmask-ctx",   "ViT-L-14", "fd-attnmask",  "CtxMaskNoFill(0.6)",       FT, PAPER),
    ("paper-vit-l14-fd-refill-rand",    "ViT-L-14", "fd-refill",    "RandMaskSingleFill(0.5)",  FT, PAPER),
    ("paper-vit-l14-fd-refill",         "ViT-L-14", "fd-refill",    "ObjMaskSingleFill(0.3)",   FT, PAPER),
    ("paper-vit-l14-fd-refill-ctx",     "ViT-L-14", "fd-refill",    "CtxMaskSingleFill(0.5)",   FT, PAPER),
    ("paper-vit-l14-fd-multifill-rand", "ViT-L-14", "fd-refill",    "RandMaskMultiFill(0.5)",   FT, PAPER),
    ("paper-vit-l14-fd-multifill-obj",  "ViT-L-14", "fd-refill",    "ObjMaskMultiFill(0.6)",    FT, PAPER),
    ("paper-vit-l14-fd-multifill-ctx",  "ViT-L-14", "fd-refill",    "CtxMaskMultiFill(0.3)",    FT, PAPER),
    ("paper-vit-l14-l2sp",              "ViT-L-14", "l2sp",         "",                         FT, PAPER),
    ("paper-vit-l14-flyp",              "ViT-L-14", "flyp",         "",                         FLYP_STAGES, FLYP),
    ("paper-vit-l14-flyp-fd-refill",    "ViT-L-14", "flyp-fd-refill", "ObjMaskSingleFill(0.3)", FLYP_STAGES, FLYP),
]


@functools.lru_cache(maxsize=None)
def _schedule_shape(schedule: str, warmup_frac: float, warmup_steps: int, betas: tuple[float, float],
                    eps: float) -> tuple[int, tuple[float, float]]:
    """(first step at the peak lr, (lowest, highest) beta1) of a schedule over NOMINAL_STEPS steps."""
    weight = nn.Parameter(torch.zeros(1))
    opt = build_optimizer(default_param_groups(nn.ParameterList([weight]), 0.1), lr=1e-5, weight_decay=0.1,
                          betas=betas, eps=eps)
    sched = build_scheduler(opt, schedule, NOMINAL_STEPS, warmup_frac, warmup_steps)
    lrs, beta1 = [], []
    for _ in range(NOMINAL_STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        beta1.append(opt.param_groups[0]["betas"][0])
        opt.step()  # no gradient: the weights stay, the schedule sees a real step
        sched.step()
    peak = max(lrs)
    return next(i for i, lr in enumerate(lrs) if lr >= peak * (1 - 1e-9)), (min(beta1), max(beta1))


def _one(values: set) -> object:
    """The value all stages share, or the set when they differ (which then fails the comparison)."""
    return next(iter(values)) if len(values) == 1 else values


def _resolved(preset: str) -> dict:
    cfg = build_config(preset)
    m, d = cfg.method, cfg.data
    stages = [s for _, s in stage_settings(cfg)]
    shapes = [_schedule_shape(s.schedule, s.warmup_frac, s.warmup_steps, tuple(s.betas), s.eps) for s in stages]
    return {
        "model": cfg.model.name, "pretrained": cfg.model.pretrained, "classnames": cfg.head.classnames,
        "templates": cfg.head.templates, "n_templates": len(load_templates(cfg.head.templates)), "train": d.train,
        "holdout": d.holdout, "batch_size": d.batch_size, "train_augment": d.train_augment,
        "augment_crop_scale": d.augment_crop_scale, "augment_flip": d.augment_flip,
        "method": m.name, "masking": m.masking, "task_weight": m.task_weight, "distill_weight": m.distill_weight,
        "temperature": m.temperature, "cam": m.cam, "cam_source": m.cam_source, "donors": m.donors,
        "label_smoothing": m.label_smoothing, "alphas": m.alphas, "wise_endpoint": m.wise_endpoint,
        "l2sp_weight": m.l2sp_weight, "multi_positive": m.multi_positive, "seed": cfg.seed, "eval_sets": d.eval_sets,
        # what each stage trains with
        "stages": tuple((s.lr, s.weight_decay, s.epochs) for s in stages),
        "schedule": _one({s.schedule for s in stages}), "warmup": _one({s.warmup_frac for s in stages}),
        "warmup_steps": _one({s.warmup_steps for s in stages}),
        "clip_grad_norm": _one({s.clip_grad_norm for s in stages}), "precision": _one({s.precision for s in stages}),
        "accum_steps": _one({s.accum_steps for s in stages}), "betas": _one({tuple(s.betas) for s in stages}),
        "eps": _one({s.eps for s in stages}),
        "peak_step": _one({peak for peak, _ in shapes}), "beta1": _one({b for _, b in shapes}),
    }


def test_the_table_covers_every_paper_preset() -> None:
    shipped = sorted(p for p in list_presets() if p.startswith("paper-vit-"))
    assert sorted(row[0] for row in TABLE) == shipped


@pytest.mark.parametrize(("preset", "model", "method", "masking", "stages", "recipe"), TABLE,
                         ids=[r[0] for r in TABLE])
def test_paper_preset_is_the_reference_recipe(preset: str, model: str, method: str, masking: str,
                                              stages: tuple, recipe: dict) -> None:
    want = {**COMMON, **recipe, "model": model, "method": method, "masking": masking, "stages": stages}
    got = _resolved(preset)
    drift = {key: (got[key], value) for key, value in want.items() if got[key] != value}
    assert not drift, f"{preset} drifted from the reference recipe (got, want): {drift}"


def test_the_checked_fields_are_the_resolved_fields() -> None:
    # A field added to _resolved but to no recipe (or the reverse) would go unchecked.
    want = {**COMMON, **PAPER, "model": 0, "method": 0, "masking": 0, "stages": 0}
    assert set(want) == set(_resolved("paper-vit-b32")) and set(FLYP) == set(PAPER)


def test_the_probe_trains_with_the_reference_probe_recipe_and_lp_ft_keeps_its_own() -> None:
    # The LP preset's probe and LP-FT's probe stage are configured independently.
    lp = dict((name, s) for name, s in stage_settings(build_config("paper-vit-b32-lp")))["lp"]
    assert (lp.lr, lp.weight_decay) == (3e-5, 0.0)
    lp_ft = stage_settings(build_config("paper-vit-b32-lp-ft", ["method.lp_weight_decay=0.05"]))
    assert [(name, s.weight_decay) for name, s in lp_ft] == [("lp", 0.05), ("ft", 0.1)]
    # Without lp_weight_decay the probe stage follows optim.weight_decay.
    lp_ft = stage_settings(build_config("paper-vit-b32-lp-ft", ["optim.weight_decay=0.2"]))
    assert [(name, s.weight_decay) for name, s in lp_ft] == [("lp", 0.2), ("ft", 0.2)]


def test_config_command_shows_what_the_probe_trains_with(capsys: pytest.CaptureFixture[str]) -> None:
    from robustft.cli import main

    assert main(["config", "-c", "paper-vit-b32-lp"]) == 0
    out = capsys.readouterr().out
    assert "lp_lr: 3.0e-05" in out and "lp_weight_decay: 0.0" in out
    assert "#   lp: lr 3e-05, weight decay 0, 10 epochs" in out
    assert main(["config", "-c", "paper-vit-b32-lp-ft"]) == 0
    out = capsys.readouterr().out
    assert "#   lp: lr 0.001, weight decay 0.1, 1 epochs" in out and "#   ft: lr 3e-05, weight decay 0.1" in out

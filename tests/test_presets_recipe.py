"""Every ``paper-vit-*`` preset resolves to the reference implementation's recipe.

The table below is written from the reference code's scripts (``run.sh``, ``example.sh``)
and the argument defaults of its two training entry points (``main_standard.py`` for
zero-shot / LP / FT / WiSE-FT, ``main_distill.py`` for KD and FD in all their variants):

    --lr 3e-5  --weight_decay 0.1  --epoch 10  --lr_schedule 1cycle  --onecycle_pct_start 0.02
    --grad_clip 1  --batch 512  --val_size 10240  --accum_steps 1  --transform clip (no
    augmentation)  --w_task 1  --w_distill 30 (KD and FD alike)  --kd_temp 10  --wise_alpha 0.5
    LP: --freeze_backbone --weight_decay 0 (so the probe trains at 3e-5 without decay)
    WiSE-FT: interpolates the FT run's ckpt-last (the last weights, not the best epoch)
    maskings: the values of example.sh, one per variant

LP-FT is not in the reference code; its row holds robustft's documented settings. The test
reads what each stage really trains with (``stage_settings``), not only the config fields,
so a preset and the pipeline can drift in neither place.
"""

from __future__ import annotations

import pytest

from robustft.config import build_config, list_presets
from robustft.pipeline.train import stage_settings

# What every paper preset shares (the reference's argument defaults).
COMMON = {
    "pretrained": "openai", "classnames": "imagenet", "templates": "openai_imagenet", "train": "imagenet",
    "holdout": 10240, "batch_size": 512, "accum_steps": 1, "train_augment": False, "schedule": "onecycle",
    "warmup": 0.02, "clip_grad_norm": 1.0, "precision": "fp32", "task_weight": 1.0, "distill_weight": 30.0,
    "temperature": 10.0, "cam": "mmcam", "cam_source": "student", "donors": "permutation",
    "label_smoothing": 0.0, "alphas": [0.5], "wise_endpoint": "last", "seed": 0,
    "eval_sets": ["imagenet", "imagenet-v2", "imagenet-r", "imagenet-sketch", "objectnet", "imagenet-a"],
}

# (learning rate, weight decay, epochs) of each training stage.
FT = ((3e-5, 0.1, 10.0),)
LP = ((3e-5, 0.0, 10.0),)
LP_FT = ((1e-3, 0.1, 1.0), (3e-5, 0.1, 10.0))  # the probe stage, then FT

# preset: (model, method, masking, stages); one row per shipped paper preset.
TABLE = [
    ("paper-vit-b32",                   "ViT-B-32", "ft",           "",                         FT),
    ("paper-vit-b32-ft",                "ViT-B-32", "ft",           "",                         FT),
    ("paper-vit-b32-lp",                "ViT-B-32", "lp",           "",                         LP),
    ("paper-vit-b32-lp-ft",             "ViT-B-32", "lp-ft",        "",                         LP_FT),
    ("paper-vit-b32-wise-ft",           "ViT-B-32", "wise-ft",      "",                         FT),
    ("paper-vit-b32-kd",                "ViT-B-32", "kd",           "",                         FT),
    ("paper-vit-b32-kd-refill",         "ViT-B-32", "kd-refill",    "ObjMaskSingleFill(0.3)",   FT),
    ("paper-vit-b32-fd",                "ViT-B-32", "fd",           "",                         FT),
    ("paper-vit-b32-fd-tokendrop",      "ViT-B-32", "fd-tokendrop", "RandMaskNoFill(0.75)",     FT),
    ("paper-vit-b32-fd-attnmask-obj",   "ViT-B-32", "fd-attnmask",  "ObjMaskNoFill(0.3)",       FT),
    ("paper-vit-b32-fd-attnmask-ctx",   "ViT-B-32", "fd-attnmask",  "CtxMaskNoFill(0.6)",       FT),
    ("paper-vit-b32-fd-refill-rand",    "ViT-B-32", "fd-refill",    "RandMaskSingleFill(0.5)",  FT),
    ("paper-vit-b32-fd-refill",         "ViT-B-32", "fd-refill",    "ObjMaskSingleFill(0.3)",   FT),
    ("paper-vit-b32-fd-refill-ctx",     "ViT-B-32", "fd-refill",    "CtxMaskSingleFill(0.5)",   FT),
    ("paper-vit-b32-fd-multifill-rand", "ViT-B-32", "fd-refill",    "RandMaskMultiFill(0.5)",   FT),
    ("paper-vit-b32-fd-multifill-obj",  "ViT-B-32", "fd-refill",    "ObjMaskMultiFill(0.6)",    FT),
    ("paper-vit-b32-fd-multifill-ctx",  "ViT-B-32", "fd-refill",    "CtxMaskMultiFill(0.3)",    FT),
    ("paper-vit-b16",                   "ViT-B-16", "ft",           "",                         FT),
    ("paper-vit-b16-ft",                "ViT-B-16", "ft",           "",                         FT),
    ("paper-vit-b16-lp",                "ViT-B-16", "lp",           "",                         LP),
    ("paper-vit-b16-lp-ft",             "ViT-B-16", "lp-ft",        "",                         LP_FT),
    ("paper-vit-b16-wise-ft",           "ViT-B-16", "wise-ft",      "",                         FT),
    ("paper-vit-b16-kd",                "ViT-B-16", "kd",           "",                         FT),
    ("paper-vit-b16-kd-refill",         "ViT-B-16", "kd-refill",    "ObjMaskSingleFill(0.3)",   FT),
    ("paper-vit-b16-fd",                "ViT-B-16", "fd",           "",                         FT),
    ("paper-vit-b16-fd-tokendrop",      "ViT-B-16", "fd-tokendrop", "RandMaskNoFill(0.75)",     FT),
    ("paper-vit-b16-fd-attnmask-obj",   "ViT-B-16", "fd-attnmask",  "ObjMaskNoFill(0.3)",       FT),
    ("paper-vit-b16-fd-attnmask-ctx",   "ViT-B-16", "fd-attnmask",  "CtxMaskNoFill(0.6)",       FT),
    ("paper-vit-b16-fd-refill-rand",    "ViT-B-16", "fd-refill",    "RandMaskSingleFill(0.5)",  FT),
    ("paper-vit-b16-fd-refill",         "ViT-B-16", "fd-refill",    "ObjMaskSingleFill(0.3)",   FT),
    ("paper-vit-b16-fd-refill-ctx",     "ViT-B-16", "fd-refill",    "CtxMaskSingleFill(0.5)",   FT),
    ("paper-vit-b16-fd-multifill-rand", "ViT-B-16", "fd-refill",    "RandMaskMultiFill(0.5)",   FT),
    ("paper-vit-b16-fd-multifill-obj",  "ViT-B-16", "fd-refill",    "ObjMaskMultiFill(0.6)",    FT),
    ("paper-vit-b16-fd-multifill-ctx",  "ViT-B-16", "fd-refill",    "CtxMaskMultiFill(0.3)",    FT),
    ("paper-vit-l14",                   "ViT-L-14", "ft",           "",                         FT),
    ("paper-vit-l14-ft",                "ViT-L-14", "ft",           "",                         FT),
    ("paper-vit-l14-lp",                "ViT-L-14", "lp",           "",                         LP),
    ("paper-vit-l14-lp-ft",             "ViT-L-14", "lp-ft",        "",                         LP_FT),
    ("paper-vit-l14-wise-ft",           "ViT-L-14", "wise-ft",      "",                         FT),
    ("paper-vit-l14-kd",                "ViT-L-14", "kd",           "",                         FT),
    ("paper-vit-l14-kd-refill",         "ViT-L-14", "kd-refill",    "ObjMaskSingleFill(0.3)",   FT),
    ("paper-vit-l14-fd",                "ViT-L-14", "fd",           "",                         FT),
    ("paper-vit-l14-fd-tokendrop",      "ViT-L-14", "fd-tokendrop", "RandMaskNoFill(0.75)",     FT),
    ("paper-vit-l14-fd-attnmask-obj",   "ViT-L-14", "fd-attnmask",  "ObjMaskNoFill(0.3)",       FT),
    ("paper-vit-l14-fd-attnmask-ctx",   "ViT-L-14", "fd-attnmask",  "CtxMaskNoFill(0.6)",       FT),
    ("paper-vit-l14-fd-refill-rand",    "ViT-L-14", "fd-refill",    "RandMaskSingleFill(0.5)",  FT),
    ("paper-vit-l14-fd-refill",         "ViT-L-14", "fd-refill",    "ObjMaskSingleFill(0.3)",   FT),
    ("paper-vit-l14-fd-refill-ctx",     "ViT-L-14", "fd-refill",    "CtxMaskSingleFill(0.5)",   FT),
    ("paper-vit-l14-fd-multifill-rand", "ViT-L-14", "fd-refill",    "RandMaskMultiFill(0.5)",   FT),
    ("paper-vit-l14-fd-multifill-obj",  "ViT-L-14", "fd-refill",    "ObjMaskMultiFill(0.6)",    FT),
    ("paper-vit-l14-fd-multifill-ctx",  "ViT-L-14", "fd-refill",    "CtxMaskMultiFill(0.3)",    FT),
]


def _resolved(preset: str) -> dict:
    cfg = build_config(preset)
    m, o, d = cfg.method, cfg.optim, cfg.data
    return {
        "model": cfg.model.name, "pretrained": cfg.model.pretrained, "classnames": cfg.head.classnames,
        "templates": cfg.head.templates, "train": d.train, "holdout": d.holdout, "batch_size": d.batch_size,
        "accum_steps": o.accum_steps, "train_augment": d.train_augment, "schedule": o.schedule,
        "warmup": o.warmup, "clip_grad_norm": o.clip_grad_norm, "precision": o.precision,
        "method": m.name, "masking": m.masking, "task_weight": m.task_weight, "distill_weight": m.distill_weight,
        "temperature": m.temperature, "cam": m.cam, "cam_source": m.cam_source, "donors": m.donors,
        "label_smoothing": m.label_smoothing, "alphas": m.alphas, "wise_endpoint": m.wise_endpoint,
        "seed": cfg.seed, "eval_sets": d.eval_sets,
        "stages": tuple((s.lr, s.weight_decay, s.epochs) for _, s in stage_settings(cfg)),
    }


def test_the_table_covers_every_paper_preset() -> None:
    shipped = sorted(p for p in list_presets() if p.startswith("paper-vit-"))
    assert sorted(row[0] for row in TABLE) == shipped


@pytest.mark.parametrize(("preset", "model", "method", "masking", "stages"), TABLE, ids=[r[0] for r in TABLE])
def test_paper_preset_is_the_reference_recipe(preset: str, model: str, method: str, masking: str,
                                              stages: tuple) -> None:
    want = {**COMMON, "model": model, "method": method, "masking": masking, "stages": stages}
    got = _resolved(preset)
    drift = {key: (got[key], value) for key, value in want.items() if got[key] != value}
    assert not drift, f"{preset} drifted from the reference recipe (got, want): {drift}"


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

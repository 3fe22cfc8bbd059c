"""Evaluation: top-k metrics under each dataset's protocol, the shift-suite evaluation loop,
effective robustness, and WiSE-FT sweeps.

Typical use::

    results = evaluate(classifier, eval_sets, dist_env=env, batch_size=256, workers=8)
    ood = ood_average(results, "imagenet")
    curve = wise_ft_sweep(zeroshot, finetuned, parse_alphas("0:1:0.1"), eval_fn)
"""

from robustft.evaluation.evaluate import PRECISIONS, EvalResult, evaluate, evaluate_set, ood_average
from robustft.evaluation.metrics import AccuracyMeter, Scorer, build_correct_matrix, topk_correct
from robustft.evaluation.robustness import RobustnessFit, effective_robustness, fit_baseline
from robustft.evaluation.wise import wise_ft_sweep

__all__ = [
    "PRECISIONS",
    "AccuracyMeter",
    "EvalResult",
    "RobustnessFit",
    "Scorer",
    "build_correct_matrix",
    "effective_robustness",
    "evaluate",
    "evaluate_set",
    "fit_baseline",
    "ood_average",
    "topk_correct",
    "wise_ft_sweep",
]

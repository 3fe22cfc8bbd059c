"""Effective robustness: OOD accuracy above what the zero-shot models' ID->OOD trend predicts.

Taori et al. (2020, "Measuring Robustness to Natural Distribution Shifts in Image
Classification") observed that, over many models, OOD accuracy is close to a linear
function of ID accuracy once both are transformed to a logit (or probit) scale, and
defined a model's effective robustness as its OOD accuracy minus that line's prediction
at its ID accuracy. Here the baseline line is fitted to the zero-shot models of a report
(the robust starting points fine-tuning should not fall below), in logit space (logit
and probit give nearly the same line between 10% and 90%):

    logit(p) = ln(p / (1 - p)),  p = accuracy / 100, clamped to [1e-4, 1 - 1e-4]
    two or more zero-shot points with different ID accuracy:
        ordinary least squares  logit(ood) = slope * logit(id) + intercept
    one point (or all at the same ID accuracy):
        the line of slope 1 through the (mean) point in logit space

The slope-1 rule says: a model whose ID error odds shrink by some factor is expected to
shrink its OOD error odds by the same factor; effective robustness is then how much
better than that it does. The zero-shot point itself has effective robustness 0, and
models that keep the zero-shot model's ID/OOD odds ratio score 0 too. Effective
robustness is reported in percentage points of accuracy (not in logit units).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from robustft.errors import DataError

__all__ = ["LOGIT_EPS", "RobustnessFit", "logit_percent", "sigmoid_percent", "fit_baseline", "effective_robustness"]

LOGIT_EPS = 1e-4  # accuracies of exactly 0% or 100% would have infinite logits


def logit_percent(acc: float) -> float:
    """Logit of an accuracy given in percent (clamped away from 0% and 100%)."""
    p = min(max(acc / 100.0, LOGIT_EPS), 1.0 - LOGIT_EPS)
    return math.log(p / (1.0 - p))


def sigmoid_percent(z: float) -> float:
    """Inverse of :func:`logit_percent`: a logit back to an accuracy in percent."""
    if z >= 0:
        return 100.0 / (1.0 + math.exp(-z))
    ez = math.exp(z)
    return 100.0 * ez / (1.0 + ez)


@dataclass(frozen=True)
class RobustnessFit:
    """A line ``logit(ood) = slope * logit(id) + intercept`` fitted to zero-shot points.

    Attributes:
        slope: Slope in logit space.
        intercept: Intercept in logit space.
        kind: ``"least-squares"`` (>= 2 distinct ID accuracies) or ``"fixed-slope"`` (one point).
        n_points: How many zero-shot points the line was fitted to.
    """

    slope: float
    intercept: float
    kind: str
    n_points: int

    def predict(self, id_acc: float) -> float:
        """Expected OOD accuracy (percent) of a model with ID accuracy ``id_acc`` (percent)."""
        return sigmoid_percent(self.slope * logit_percent(id_acc) + self.intercept)

    def describe(self) -> str:
        """One line saying how the line was obtained (for reports)."""
        if self.kind == "fixed-slope":
            return (f"line of slope {self.slope:g} in logit space through the zero-shot point "
                    f"({self.n_points} run(s) at one ID accuracy)")
        return (
            f"least-squares line in logit space over {self.n_points} zero-shot points "
            f"(slope {self.slope:.3f}, intercept {self.intercept:.3f})"
        )


def fit_baseline(
    id_accs: Sequence[float], ood_accs: Sequence[float], *, fallback_slope: float = 1.0
) -> RobustnessFit:
    """Fit the zero-shot ID->OOD line in logit space (see the module docstring).

    Args:
        id_accs: ID top-1 accuracies of the zero-shot models, percent.
        ood_accs: Their OOD accuracies (e.g. the OOD average), percent, same order.
        fallback_slope: Logit-space slope of the line through a single point (or through
            the mean of points that share one ID accuracy); 1 by default. A slope measured
            on a population of models for the same shift can be given instead.

    Raises:
        DataError: No points, or the two sequences differ in length.
    """
    if len(id_accs) != len(ood_accs):
        raise DataError(f"{len(id_accs)} ID accuracies but {len(ood_accs)} OOD accuracies for the robustness fit")
    if not id_accs:
        raise DataError("effective robustness needs at least one zero-shot result to fit the baseline")
    xs = [logit_percent(a) for a in id_accs]
    ys = [logit_percent(a) for a in ood_accs]
    n = len(xs)
    mean_x, mean_y = math.fsum(xs) / n, math.fsum(ys) / n
    sxx = math.fsum((x - mean_x) ** 2 for x in xs)
    if sxx < 1e-12:  # one point, or repeated runs of the same zero-shot model
        return RobustnessFit(slope=fallback_slope, intercept=mean_y - fallback_slope * mean_x, kind="fixed-slope",
                             n_points=n)
    sxy = math.fsum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    return RobustnessFit(slope=slope, intercept=mean_y - slope * mean_x, kind="least-squares", n_points=n)


def effective_robustness(id_acc: float, ood_acc: float, fit: RobustnessFit) -> float:
    """OOD accuracy above the baseline's prediction, in percentage points.

    Args:
        id_acc: The model's ID top-1, percent.
        ood_acc: The model's OOD accuracy (same definition as the fit's), percent.
        fit: The zero-shot baseline from :func:`fit_baseline`.
    """
    return ood_acc - fit.predict(id_acc)

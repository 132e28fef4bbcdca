"""The length-controlled win rate, in the manner of AlpacaEval 2.0's.

Reward-model judges favour longer answers, and preference tuning lengthens them, so a win rate can
rise with length alone. For the ``n`` prompts a model and the baseline were both scored on, with
outcome ``s_i`` (1 win, 1/2 tie, 0 loss) and ``delta_i`` = the character length of the model's
answer minus the baseline's, fit the logistic model

    P(win_i) = sigmoid(a + b * tanh(delta_i / sd(delta)))

by maximum likelihood with ``s_i`` as soft labels (Newton's method on the Bernoulli log-likelihood,
which is concave); the length-controlled win rate is the fitted win probability at equal length,
``sigmoid(a)``. Its standard error is the spread of that figure over ``bootstrap`` resamples of the
prompts (a fixed seed: the same inputs give the same figure). ``sd(delta) = 0`` (every pair of
answers as long) leaves only the intercept: the LC win rate is then the plain win rate.

A tiny ridge on ``b`` (``1e-6``) keeps the fit finite when the length feature separates wins from
losses completely; it moves the figure by well under 1e-4 otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["LengthControlled", "length_controlled", "fit_logistic"]

OUTCOME = {"win": 1.0, "tie": 0.5, "loss": 0.0}
RIDGE = 1e-6


@dataclass(frozen=True)
class LengthControlled:
    win_rate: float | None  # sigmoid(a): the fitted win probability at equal length
    se: float | None  # bootstrap standard error over prompts
    slope: float | None  # b: the log-odds per unit of tanh(delta / sd)
    sd_delta: float | None  # sd of the length differences (characters)


def fit_logistic(x: np.ndarray, s: np.ndarray, ridge: float = RIDGE, iterations: int = 100) -> tuple[float, float]:
    """(a, b) maximising sum s log p + (1 - s) log(1 - p), p = sigmoid(a + b x), minus ridge * b^2 / 2."""
    x, s = np.asarray(x, dtype=np.float64), np.asarray(s, dtype=np.float64)
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    penalty = np.diag([0.0, ridge])
    for _ in range(iterations):
        z = X @ w
        p = 1.0 / (1.0 + np.exp(-z))
        grad = X.T @ (s - p) - penalty @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + penalty
        try:
            step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        except np.linalg.LinAlgError:
            break
        w = w + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(w[0]), float(w[1])


def _features(deltas: np.ndarray) -> tuple[np.ndarray, float]:
    sd = float(np.std(deltas))
    return (np.tanh(deltas / sd) if sd > 0 else np.zeros_like(deltas)), sd


def _rate(deltas: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    x, sd = _features(deltas)
    if sd == 0:  # no length difference to control for: the intercept alone, the plain win rate
        return float(np.mean(s)), 0.0, sd
    a, b = fit_logistic(x, s)
    return 1.0 / (1.0 + math.exp(-a)), b, sd


def length_controlled(outcomes: Sequence[str | float], deltas: Sequence[float], bootstrap: int = 200,
                      seed: int = 0) -> LengthControlled:
    """The LC win rate of outcomes (``"win"``/``"tie"``/``"loss"`` or 1/0.5/0) with length differences."""
    s = np.array([OUTCOME[o] if isinstance(o, str) else float(o) for o in outcomes], dtype=np.float64)
    d = np.asarray(deltas, dtype=np.float64)
    if s.size == 0:
        return LengthControlled(None, None, None, None)
    rate, slope, sd = _rate(d, s)
    se = None
    if bootstrap > 0 and s.size > 1:
        rng = np.random.default_rng(seed)
        draws = [_rate(d[idx], s[idx])[0] for idx in (rng.integers(0, s.size, s.size) for _ in range(bootstrap))]
        se = float(np.std(draws, ddof=1))
    return LengthControlled(rate, se, slope, sd)

"""The length-controlled win rate against an independent fit, on outcomes with a known length effect."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dppo.eval.lengthctl import length_controlled


def independent_fit(x: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """Iteratively reweighted least squares for the soft-label logistic regression, written apart
    from dppo's (weighted normal equations solved by Cramer's rule, no ridge)."""
    a = b = 0.0
    for _ in range(200):
        eta = a + b * x
        p = 1 / (1 + np.exp(-eta))
        w = p * (1 - p)
        zwork = eta + (s - p) / w  # the working response
        sw, swx, swxx = w.sum(), (w * x).sum(), (w * x * x).sum()
        swz, swxz = (w * zwork).sum(), (w * x * zwork).sum()
        det = sw * swxx - swx * swx
        na, nb = (swz * swxx - swx * swxz) / det, (sw * swxz - swx * swz) / det
        if abs(na - a) + abs(nb - b) < 1e-13:
            a, b = na, nb
            break
        a, b = na, nb
    return a, b


def synthetic(n: int, a0: float, b0: float, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    deltas = rng.normal(50, 200, n)  # the model answers 50 characters longer on average
    x = np.tanh(deltas / deltas.std())
    p = 1 / (1 + np.exp(-(a0 + b0 * x)))
    u = rng.random(n)
    outcomes = ["win" if ui < p_i - 0.03 else "tie" if ui < p_i + 0.03 else "loss" for ui, p_i in zip(u, p)]
    return outcomes, deltas


def test_matches_an_independent_fit_with_a_known_length_effect():
    outcomes, deltas = synthetic(4000, a0=-0.4, b0=1.5, seed=0)
    lc = length_controlled(outcomes, deltas, bootstrap=50)
    s = np.array([{"win": 1, "tie": 0.5, "loss": 0}[o] for o in outcomes], dtype=float)
    a, b = independent_fit(np.tanh(deltas / deltas.std()), s)
    assert lc.win_rate == pytest.approx(1 / (1 + math.exp(-a)), abs=1e-5)
    assert lc.slope == pytest.approx(b, abs=1e-4)
    # the fit recovers the effect it was given, and the plain win rate is inflated by length
    assert lc.slope == pytest.approx(1.5, abs=0.2) and lc.win_rate == pytest.approx(1 / (1 + math.exp(0.4)), abs=0.03)
    plain = s.mean()
    assert plain > lc.win_rate + 0.05
    assert 0.004 < lc.se < 0.03  # of the order of sqrt(p (1 - p) / n)


def test_without_a_length_effect_it_approaches_the_plain_win_rate():
    outcomes, deltas = synthetic(4000, a0=0.3, b0=0.0, seed=1)
    lc = length_controlled(outcomes, deltas, bootstrap=20)
    plain = np.mean([{"win": 1, "tie": 0.5, "loss": 0}[o] for o in outcomes])
    assert lc.win_rate == pytest.approx(plain, abs=0.01)
    assert abs(lc.slope) < 0.2


def test_equal_lengths_and_degenerate_inputs():
    lc = length_controlled(["win", "loss", "tie", "win"], [0, 0, 0, 0])
    assert lc.win_rate == pytest.approx(0.625) and lc.slope == 0.0 and lc.sd_delta == 0.0
    assert length_controlled([], []).win_rate is None
    # length separates wins from losses completely: the ridge keeps the figure finite
    sep = length_controlled(["win"] * 10 + ["loss"] * 10, [100.0] * 10 + [-100.0] * 10, bootstrap=10)
    assert 0.0 < sep.win_rate < 1.0 and math.isfinite(sep.slope)
    assert length_controlled(["win"], [5.0]).se is None

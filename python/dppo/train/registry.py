"""The losses by name: what each reads, which options it takes, its defaults and its reduction.

Torch-free, so that the command line can check options without loading torch. The loss functions
themselves are pure functions of tensors in :mod:`dppo.train.losses`; an entry names its function
by import path (``"dppo.train.losses:dpo_loss"``) or holds it. Everything a trainer needs to know
about a method comes from here, so the loop never branches on method names, and adding a loss is
one pure function and one :func:`register_loss` call::

    def margin_loss(cfg, logps):              # LossConfig, LogProbs -> LossOutput
        return LossOutput(loss=-F.logsigmoid(cfg.beta * (logps.policy_chosen - logps.policy_rejected)))

    register_loss("margin", LossSpec(margin_loss, data="pairs", needs_reference=False, options=("beta",)))
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "LOSSES", "LossSpec", "LossConfig", "register_loss", "loss_spec", "needs_reference", "needs_ygen",
    "YgenPlan", "ygen_plan", "ygen_free", "WEIGHTS", "VOTES", "VOTE_NORMS", "PENALTY_NORMS",
]

WEIGHTS = ("linear", "quadratic", "sqrt", "expectile")
VOTES = ("policy", "ref")
VOTE_NORMS = ("clip", "tanh")
PENALTY_NORMS = ("mean", "sum")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

# Values shared by every method; options a method does not use are ignored by its loss.
_COMMON_DEFAULTS: dict[str, object] = {
    "beta": 0.01,  # the paper's DPO screen picked 0.01 and used it for every DPPO run
    "gamma": 0.0,
    "alpha": 0.0,
    "weight": "quadratic",
    "zeta": 0.5,
    "vote": "policy",
    "vote_clip": 2000.0,
    "vote_norm": "clip",
    "detach_weight": False,
    "penalty_norm": "mean",
}

@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Hyperparameters of one loss. Build it with :meth:`LossConfig.defaults`.

    Every field is required so that no method silently runs with another method's defaults;
    ``LossConfig.defaults(method, **overrides)`` fills in the paper's values (``docs/method.md``).
    Invalid values raise ``ValueError`` naming the option.

    Attributes:
        method: a name of the registry :data:`LOSSES` ("sft", "dpo", "simpo", "minll", "unll", "conll"
            built in).
        beta: inverse temperature of the sigmoid (DPO, SimPO, DPPO); > 0.
        gamma: SimPO's target reward margin; >= 0 (simpo only).
        alpha: penalty strength; >= 0; alpha = 0 gives exactly DPO (minll, unll, conll).
        weight: f(r): "linear" | "quadratic" | "sqrt" | "expectile" (minll, unll, conll).
        zeta: expectile level in [0, 1] (weight "expectile" only).
        vote: whose log-probs form the vote r = logp(y_w) - logp(y_l): "policy" (the policy being
            trained, gradient flows) or "ref" (the frozen reference, a constant per example).
        vote_clip: C > 0, the scale that maps r into [-1, 1].
        vote_norm: "clip" (r_n = clamp(r, -C, C) / C) or "tanh" (r_n = tanh(r / C)).
        detach_weight: treat f(r) as a constant (no gradient into logp(y_w), logp(y_l) through f).
        penalty_norm: minll only: "mean" penalizes mean_logp(y_gen), "sum" penalizes logp(y_gen).
    """

    method: str
    beta: float
    gamma: float
    alpha: float
    weight: str
    zeta: float
    vote: str
    vote_clip: float
    vote_norm: str
    detach_weight: bool
    penalty_norm: str

    @classmethod
    def defaults(cls, method: str, **overrides: object) -> LossConfig:
        """The paper's configuration for ``method``, with ``overrides`` applied.

        Defaults: beta 0.01 (simpo: beta 2.5, gamma 1.0); alpha 10 for minll, 0.1 for unll and conll;
        weight expectile (zeta 0.5) for minll, quadratic for unll and conll; vote policy; vote_clip
        2000 for minll and unll, 700 for conll; vote_norm clip; detach_weight False;
        penalty_norm mean.
        """
        spec = loss_spec(method)
        unknown = sorted(set(overrides) - set(_COMMON_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown LossConfig option(s) {unknown}; known: {sorted(_COMMON_DEFAULTS)}")
        values = {**_COMMON_DEFAULTS, **spec.defaults, **overrides}
        return cls(method=method, **values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        loss_spec(self.method)
        _check_choice("weight", self.weight, WEIGHTS)
        _check_choice("vote", self.vote, VOTES)
        _check_choice("vote_norm", self.vote_norm, VOTE_NORMS)
        _check_choice("penalty_norm", self.penalty_norm, PENALTY_NORMS)
        if not isinstance(self.detach_weight, bool):
            raise ValueError(f"detach_weight must be a bool, got {self.detach_weight!r}")
        for name, low, low_open, high in (
            ("beta", 0.0, True, math.inf),
            ("gamma", 0.0, False, math.inf),
            ("alpha", 0.0, False, math.inf),
            ("zeta", 0.0, False, 1.0),
            ("vote_clip", 0.0, True, math.inf),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            value = float(value)
            too_low = value <= low if low_open else value < low
            if not math.isfinite(value) or too_low or value > high:
                bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
                raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
            object.__setattr__(self, name, value)  # store ints as floats: the saved config is uniform


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what it needs, so that callers never branch on method names.

    Attributes:
        fn: ``fn(cfg, logps) -> LossOutput`` (per-example losses), or its import path
            ``"module:function"``, imported on first call.
        data: the shards it trains on: ``"sft"`` (prompt, response) or ``"pairs"`` (prompt, chosen,
            rejected[, y_gen]).
        needs_reference: reads reference log-probs (``ref_chosen``, ``ref_rejected``, and for conll
            ``ref_ygen``): the trainer must have them computed (it caches them).
        needs_ygen: has a y_gen term (``ygen_token_logps``, ``ygen_index``).
        needs_ref_ygen: also reads the reference's log-prob of y_gen (``ref_ygen``; conll only).
        options: the :class:`LossConfig` fields the loss reads (``zeta`` only with the expectile
            weight); a trainer refuses the others when a user sets them.
        defaults: this method's defaults over the common ones (``docs/method.md``).
        without_ygen: the method that evaluates this one on data without y_gen (an evaluation set
            prepared without ``--ygen``), called with the option values the two share; None: such
            data is refused. The DPPO methods name ``"dpo"``: the preference term and its rewards.
        reduction: how a step's per-example losses become the step's loss. ``"example"``: their mean
            over the step's examples. ``"token"``: their sum divided by the step's counted
            (response) tokens, for losses that return per-example sums over tokens (SFT: the mean
            negative log-likelihood over every assistant token of the step). Either way the result
            does not depend on how the step is split into micro-batches.
    """

    fn: Callable[..., Any] | str
    data: str = "pairs"
    needs_reference: bool = True
    needs_ygen: bool = False
    needs_ref_ygen: bool = False
    options: tuple[str, ...] = ()
    defaults: Mapping[str, object] = field(default_factory=dict)
    reduction: str = "example"
    without_ygen: str | None = None

    def __post_init__(self) -> None:
        if self.data not in ("sft", "pairs"):
            raise ValueError(f"LossSpec.data must be 'sft' or 'pairs', got {self.data!r}")
        if self.reduction not in ("example", "token"):
            raise ValueError(f"LossSpec.reduction must be 'example' or 'token', got {self.reduction!r}")
        if self.data == "sft" and (self.needs_ygen or self.needs_reference):
            raise ValueError("an SFT loss reads the response alone: no reference, no y_gen")
        unknown = sorted(set(self.options) - set(_COMMON_DEFAULTS))
        if unknown:
            raise ValueError(f"LossSpec.options {unknown} are not LossConfig fields ({sorted(_COMMON_DEFAULTS)})")

    @property
    def needs_rejected(self) -> bool:
        return self.data == "pairs"

    @property
    def function(self) -> Callable[..., Any]:
        if callable(self.fn):
            return self.fn
        module, _, name = self.fn.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, cfg: LossConfig, logps: Any) -> Any:
        return self.function(cfg, logps)

    def step_weights(self, counted_tokens: np.ndarray) -> np.ndarray:
        """Each example's weight in its step's loss (``reduction``), from its counted tokens [B]."""
        n = len(counted_tokens)
        if self.reduction == "token":
            return np.full(n, 1.0 / max(float(np.sum(counted_tokens)), 1.0))
        return np.full(n, 1.0 / max(n, 1))


_PENALTY_OPTIONS = ("beta", "alpha", "weight", "zeta", "vote", "vote_clip", "vote_norm", "detach_weight")
_L = "dppo.train.losses:"

LOSSES: dict[str, LossSpec] = {
    "sft": LossSpec(_L + "sft_loss", data="sft", needs_reference=False, reduction="token"),
    "dpo": LossSpec(_L + "dpo_loss", options=("beta",)),
    # The paper's SimPO grid (Table 1) scored best with gamma 1, beta 2.5 (win rate 0.688), and the
    # author's SimPO script defaults to them. They sit in the SimPO authors' own range
    # (princeton-nlp/SimPO README: beta 2.0 or 2.5 in the preprint, gamma = c * beta with c about
    # 0.25-0.5; here c = 0.4). method.md's gamma is an absolute margin, not a gamma/beta ratio.
    "simpo": LossSpec(_L + "simpo_loss", needs_reference=False, options=("beta", "gamma"), defaults={"beta": 2.5, "gamma": 1.0}),
    # Paper section 5: alpha 10 for minll (expectile, zeta 0.5), 0.1 for unll and conll.
    "minll": LossSpec(_L + "minll_loss", needs_ygen=True, options=(*_PENALTY_OPTIONS, "penalty_norm"),
                      defaults={"alpha": 10.0, "weight": "expectile", "vote_clip": 2000.0}, without_ygen="dpo"),
    "unll": LossSpec(_L + "unll_loss", needs_ygen=True, options=_PENALTY_OPTIONS,
                     defaults={"alpha": 0.1, "weight": "quadratic", "vote_clip": 2000.0}, without_ygen="dpo"),
    # method.md names no conll weight; the author's conll script defaults to quadratic.
    "conll": LossSpec(_L + "conll_loss", needs_ygen=True, needs_ref_ygen=True, options=_PENALTY_OPTIONS,
                      defaults={"alpha": 0.1, "weight": "quadratic", "vote_clip": 700.0}, without_ygen="dpo"),
}
"""The losses by method name (``--method``). :func:`register_loss` adds one."""

BUILTIN = tuple(LOSSES)


def register_loss(name: str, spec: LossSpec, *, overwrite: bool = False) -> None:
    """Make ``name`` a method of ``dppo train`` (``--method name``)."""
    if not name or not name.replace("_", "").replace("-", "").replace("+", "").isalnum():
        raise ValueError(f"loss name {name!r}: use letters, digits, '-', '_' or '+'")
    if name in LOSSES and not overwrite:
        raise ValueError(f"loss {name!r} is already registered (pass overwrite=True to replace it)")
    LOSSES[name] = spec


def loss_spec(method: str) -> LossSpec:
    """The registry's entry for ``method``; ``ValueError`` naming the known ones otherwise."""
    if method not in LOSSES:
        raise ValueError(f"method must be one of {'|'.join(LOSSES)}, got {method!r}")
    return LOSSES[method]


def needs_reference(method: str) -> bool:
    """Whether ``method`` reads reference-model log-probs (dpo, minll, unll, conll)."""
    return loss_spec(method).needs_reference


def needs_ygen(method: str) -> bool:
    """Whether ``method`` has a y_gen term (minll, unll, conll)."""
    return loss_spec(method).needs_ygen


def ygen_free(cfg: LossConfig) -> LossConfig:
    """The configuration that evaluates ``cfg`` on data without y_gen: its entry's ``without_ygen``
    method, with the values of the options the two share (``ConfigError`` where the entry names none)."""
    target = loss_spec(cfg.method).without_ygen
    if target is None:
        from dppo.errors import ConfigError

        raise ConfigError(f"--method {cfg.method} has no evaluation without y_gen: give --eval-data with y_gen "
                          "(`dppo prep prefs --ygen`)")
    shared = {k: getattr(cfg, k) for k in loss_spec(target).options}
    return LossConfig.defaults(target, **shared)


# --------------------------------------------------------------------------------------------------
# y_gen skipping
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class YgenPlan:
    """Which y_gen sequences a micro-batch's forward runs, for one configured loss.

    Attributes:
        forward: the loss has a y_gen term whose forward is needed at all.
        skip: some examples' y_gen term is exactly zero (``losses.can_skip_ygen``), so their
            forward may be left out.
        known_before: which ones is known before the policy's forward: the vote comes from the
            reference (``--vote ref``) or alpha is 0. Otherwise the policy's own vote decides; the
            reference's vote predicts it and a second, small row catches the examples it got wrong.
    """

    forward: bool
    skip: bool = False
    known_before: bool = False


def ygen_plan(cfg: LossConfig, allow_skip: bool = True) -> YgenPlan:
    """The :class:`YgenPlan` of ``cfg`` (``allow_skip=False``: ``--no-skip-ygen``, every y_gen runs)."""
    if not loss_spec(cfg.method).needs_ygen:
        return YgenPlan(forward=False)
    if not allow_skip:
        return YgenPlan(forward=True)
    if cfg.vote == "ref" or cfg.alpha == 0:
        return YgenPlan(forward=True, skip=True, known_before=True)
    # f(r) = 0 on a whole half-line of r: every weight but the expectile (unless zeta is 0 or 1)
    gated = cfg.weight != "expectile" or cfg.zeta in (0.0, 1.0)
    return YgenPlan(forward=True, skip=gated)

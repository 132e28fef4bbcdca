"""The losses by name: what each reads, the options it declares, and its reduction.

Torch-free, so that the command line can check options and print its help without loading torch.
The loss functions themselves are pure functions of tensors (:mod:`dppo.train.losses`); an entry
names its function by import path (``"dppo.train.losses:dpo_loss"``) or holds it.

Everything about a method comes from its entry: the trainer never branches on method names, and
``dppo train`` derives its validation, the "option X is not used by method Y" check, ``RUN/config.json``
and its ``--help`` (options grouped by the methods that use them) from the entries' :class:`Option`
declarations. Adding a loss with an option of its own is one pure function and one entry::

    SCALE = Option("scale", float, 1.0, "Multiplier of the margin", low=0.0, low_open=True)

    def scaled_margin(cfg, logps):            # LossConfig, LogProbs -> LossOutput
        margin = cfg.scale * cfg.beta * (logps.policy_chosen - logps.policy_rejected)
        return LossOutput(loss=-F.logsigmoid(margin))

    register_loss("scaled", LossSpec(scaled_margin, needs_reference=False, options=(BETA.with_default(0.1), SCALE)))

after which ``TrainConfig(method="scaled", scale=3.0, ...)`` trains it, and, declared by an installed
package (below), ``dppo train --method scaled --scale 3`` does. Options several losses share (``BETA``,
``ALPHA``, ``WEIGHT``, ...) are declared once below and listed by each entry that uses them, with
the entry's own default where it differs (``BETA.with_default(2.5)``); an option may also be named by
its string (``options=("beta",)``). Other packages add losses through the ``dppo.losses``
entry-point group (:func:`load_entry_points`): each entry point names a :class:`LossSpec`, registered
under the entry point's name.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "LOSSES", "BUILTIN", "Option", "LossSpec", "LossConfig", "register_loss", "loss_spec", "known_options",
    "option_users", "option_help", "load_entry_points", "ENTRY_POINT_GROUP", "YgenPlan", "ygen_plan", "ygen_free",
    "BETA", "ALPHA", "WEIGHT", "ZETA", "VOTE", "VOTE_CLIP", "VOTE_NORM", "DETACH_WEIGHT",
    "WEIGHTS", "VOTES", "VOTE_NORMS", "PENALTY_NORMS",
]

WEIGHTS = ("linear", "quadratic", "sqrt", "expectile")
VOTES = ("policy", "ref")
VOTE_NORMS = ("clip", "tanh")
PENALTY_NORMS = ("mean", "sum")

ENTRY_POINT_GROUP = "dppo.losses"

_UNSET: Any = object()
_TYPES = (float, int, str, bool)
_RESERVED = frozenset({"method", "values", "defaults"})


# --------------------------------------------------------------------------------------------------
# Option declarations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One hyperparameter of a loss: its type, default, valid values and help, declared once.

    Attributes:
        name: the option's name: a ``LossConfig`` attribute, the ``--name-with-dashes`` flag of
            ``dppo train``, the key in ``RUN/config.json`` and in a ``--config`` TOML file.
        type: ``float``, ``int``, ``str`` or ``bool`` (a float option takes ints, stored as floats).
        default: the value when the user gives none; an entry may override it (:meth:`with_default`).
        help: one line for ``dppo train --help`` (defaults, choices and range are added to it).
        choices: the allowed values of a ``str`` option.
        low, high: the valid range of a number (inclusive; ``low_open``/``high_open`` exclude the
            bound). Numbers must be finite.
        paper: the paper's value, where there is one (shown in the help).
        when: ``(other, value)``: the option only applies when option ``other`` has ``value``
            (zeta with weight expectile); given otherwise it is refused, and recorded as None.
        words: names a number option also takes, resolved by the trainer (``vote_clip auto``).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    paper: Any = None
    when: tuple[str, Any] | None = None
    words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name) or self.name in _RESERVED:
            raise ValueError(f"option name {self.name!r}: use lowercase letters, digits and '_' (not {sorted(_RESERVED)})")
        if self.type not in _TYPES:
            raise ValueError(f"option {self.name}: type must be float, int, str or bool, got {self.type!r}")
        if self.choices and self.type is not str:
            raise ValueError(f"option {self.name}: choices apply to str options")
        try:
            object.__setattr__(self, "default", self.check(self.default))
        except ValueError as e:
            raise ValueError(f"the default of option {self.name}: {e}") from None

    @property
    def flag(self) -> str:
        """``--name-with-dashes``."""
        return "--" + self.name.replace("_", "-")

    def with_default(self, default: Any, *, paper: Any = _UNSET) -> Option:
        """The same option with another default (an entry's own), and optionally the paper's value."""
        return dataclasses.replace(self, default=default, paper=self.paper if paper is _UNSET else paper)

    def kind(self) -> tuple:
        """What two declarations of one name must agree on (defaults, help and paper values may differ)."""
        return (self.type, self.choices, self.low, self.high, self.low_open, self.high_open, self.when, self.words)

    def check(self, value: Any) -> Any:
        """``value`` checked against the declaration (ints stored as floats for a float option);
        ``ValueError`` starting with the option's name otherwise."""
        name = self.name
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise ValueError(f"{name} must be one of {self.choices}, got {value!r}")
            return value
        if isinstance(value, str) and self.words:  # a named value, or a number as text (the command line)
            if value in self.words:
                return value
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name} must be a number or {'|'.join(self.words)}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if self.type is int:
            if not isinstance(value, int) and not (math.isfinite(value) and value == int(value)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        bad = not math.isfinite(value)
        if self.low is not None:
            bad = bad or (value <= self.low if self.low_open else value < self.low)
        if self.high is not None:
            bad = bad or (value >= self.high if self.high_open else value > self.high)
        if bad:
            raise ValueError(f"{name} must be finite{self.describe_range(' and ')}, got {value!r}")
        return value

    def describe_range(self, prefix: str = "") -> str:
        """``" > 0"``-like text of the valid range (empty without bounds)."""
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return prefix + " and ".join(parts) if parts else ""


# The options several losses share, declared once (docs/method.md). Defaults are those of most users;
# an entry lists the option with its own default where it differs.
BETA = Option("beta", float, 0.01, "Inverse temperature of the sigmoid", low=0.0, low_open=True, paper=0.01)
ALPHA = Option("alpha", float, 0.0, "Penalty strength; 0 gives exactly DPO", low=0.0)
WEIGHT = Option("weight", str, "quadratic", "Weight f(r) of the y_gen penalty", choices=WEIGHTS)
ZETA = Option("zeta", float, 0.5, "Expectile level of the expectile weight", low=0.0, high=1.0,
              when=("weight", "expectile"))
VOTE = Option("vote", str, "policy", "Whose log-probs form the vote r = logp(y_w) - logp(y_l) (the policy's carry "
              "gradient, the frozen reference's are constants)", choices=VOTES)
VOTE_CLIP = Option("vote_clip", float, 2000.0, "C of the vote normalization, or auto: the 95th percentile of |r| under "
                   "the reference on the training pairs (RUN/config.json: vote_clip_auto)", low=0.0, low_open=True,
                   words=("auto",))
VOTE_NORM = Option("vote_norm", str, "clip", "Vote normalization, clamp(r,-C,C)/C or tanh(r/C)", choices=VOTE_NORMS)
DETACH_WEIGHT = Option("detach_weight", bool, False, "Treat f(r) as a constant: no gradient through the weight")

LABEL_SMOOTHING = Option(
    "label_smoothing", float, 0.0, "Label smoothing eps: conservative DPO (dpo), the label-flip rate (robust, "
    "< 0.5), EXO's eps (exo_pair, > 0), aot and aot_unpaired", low=0.0, high=1.0, high_open=True)
DISCOPOP_TAU = Option("discopop_tau", float, 0.05, "DiscoPOP's temperature tau", low=0.0, low_open=True, paper=0.05)
BCO_RUNNING_MEAN = Option(
    "bco_running_mean", bool, False, "Shift bco_pair's rewards by the running mean of the steps' mean rewards "
    "(the BCO paper's delta; kept in checkpoints; TRL 1.16 has none)")
ORPO_NLL = Option(
    "orpo_nll", str, "sequence", "Tokens of orpo's NLL: the chosen sequence's prompt and answer (TRL's ORPOTrainer "
    "and the ORPO authors' code) or the chosen answer's alone", choices=("sequence", "answer"))
LOSS_WEIGHTS = Option("loss_weights", str, "", "A combination's weight of each term, comma-separated in the order "
                      "of --method A+B[+C]")

_PENALTY = (BETA, ALPHA, WEIGHT, ZETA, VOTE, VOTE_CLIP, VOTE_NORM, DETACH_WEIGHT)
_SHARED = {o.name: o for o in _PENALTY}


# --------------------------------------------------------------------------------------------------
# Registry entries
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
        options: the options the loss reads, as :class:`Option` declarations or names of the shared
            ones (``"beta"``); resolved to declarations. ``dppo train`` refuses the others.
        defaults: this entry's defaults by option name, applied over the declarations' (the same as
            listing ``OPTION.with_default(value)``).
        reduction: how a step's per-example losses become the step's loss. ``"example"``: their mean
            over the step's examples. ``"token"``: their sum divided by the step's counted
            (response) tokens, for losses that return per-example sums over tokens (SFT: the mean
            negative log-likelihood over every assistant token of the step). Either way the result
            does not depend on how the step is split into micro-batches.
        without_ygen: the method that evaluates this one on data without y_gen (an evaluation set
            prepared without ``--ygen``), called with the option values the two share; None: such
            data is refused. The DPPO methods name ``"dpo"``: the preference term and its rewards.
        token_part: the loss also returns ``token_loss``, per-example sums over the chosen answer's
            tokens reduced over the step's chosen tokens (orpo's NLL, an ``sft`` term of a
            combination), beside ``loss`` reduced by ``reduction``.
        prompt_tokens: ``(option, value)``: when the option has that value, the token part also
            covers the chosen sequence's prompt tokens (all but its first, which nothing predicts):
            the trainer scores them (``LogProbs.prompt_chosen``) and the step's token count, the
            token part's denominator, includes them (orpo's NLL with ``orpo_nll`` "sequence").
        step_context: ``"module:function"`` or callable ``(cfg, logps, state) -> (context, state)``:
            the loss compares each example with the rest of its step (aot sorts over the step) or
            keeps a state across steps (bco_pair's running mean). The trainer evaluates it on the
            whole step's detached log-probs, every rank's, before the step's forwards with
            gradients, passes each example's values (``context``: ``{name: [B] tensor}``) in
            ``LogProbs.context``, and keeps the returned JSON-able ``state`` for the next step and
            in checkpoints.
        context_option: the boolean option that switches ``step_context`` on (None: always on).
    """

    fn: Callable[..., Any] | str
    data: str = "pairs"
    needs_reference: bool = True
    needs_ygen: bool = False
    needs_ref_ygen: bool = False
    options: tuple[Option | str, ...] = ()
    defaults: Mapping[str, object] = field(default_factory=dict)
    reduction: str = "example"
    without_ygen: str | None = None
    token_part: bool = False
    prompt_tokens: tuple[str, Any] | None = None
    step_context: Callable[..., Any] | str | None = None
    context_option: str | None = None

    def __post_init__(self) -> None:
        if self.data not in ("sft", "pairs"):
            raise ValueError(f"LossSpec.data must be 'sft' or 'pairs', got {self.data!r}")
        if self.reduction not in ("example", "token"):
            raise ValueError(f"LossSpec.reduction must be 'example' or 'token', got {self.reduction!r}")
        if self.data == "sft" and (self.needs_ygen or self.needs_reference):
            raise ValueError("an SFT loss reads the response alone: no reference, no y_gen")
        options: list[Option] = []
        for opt in self.options:
            if isinstance(opt, str):
                if opt not in _SHARED and opt not in known_options():
                    raise ValueError(f"LossSpec.options: no option {opt!r} is declared (known: {sorted(known_options())}); "
                                     "declare it with Option(...)")
                opt = _SHARED.get(opt) or known_options()[opt]
            if not isinstance(opt, Option):
                raise ValueError(f"LossSpec.options: expected Option declarations or names, got {opt!r}")
            options.append(opt)
        names = [o.name for o in options]
        if len(set(names)) != len(names):
            raise ValueError(f"LossSpec.options: an option is listed twice ({names})")
        unknown = sorted(set(self.defaults) - set(names))
        if unknown:
            raise ValueError(f"LossSpec.defaults {unknown} are not options of this loss ({names})")
        options = [o.with_default(self.defaults[o.name]) if o.name in self.defaults else o for o in options]
        for o in options:
            if o.when is not None and o.when[0] not in names:
                raise ValueError(f"option {o.name} applies when {o.when[0]} is {o.when[1]!r}: list {o.when[0]} too")
        object.__setattr__(self, "options", tuple(options))
        object.__setattr__(self, "_by_name", {o.name: o for o in options})

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(self._by_name)  # type: ignore[attr-defined]

    def option(self, name: str) -> Option | None:
        """This entry's declaration of ``name`` (None where it does not use it)."""
        return self._by_name.get(name)  # type: ignore[attr-defined]

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

    def scores_prompt(self, cfg: LossConfig) -> bool:
        """Whether a step of ``cfg`` scores the chosen prompts' tokens (:attr:`prompt_tokens`)."""
        return self.prompt_tokens is not None and getattr(cfg, self.prompt_tokens[0]) == self.prompt_tokens[1]

    def uses_context(self, cfg: LossConfig) -> bool:
        """Whether a step of ``cfg`` needs :attr:`step_context` (its whole step, before the forwards)."""
        return self.step_context is not None and (self.context_option is None or bool(getattr(cfg, self.context_option)))

    def context_function(self) -> Callable[..., Any] | None:
        if self.step_context is None or callable(self.step_context):
            return self.step_context
        module, _, name = self.step_context.partition(":")
        return getattr(importlib.import_module(module), name)

    def step_weights(self, counted_tokens: np.ndarray) -> np.ndarray:
        """Each example's weight in its step's loss (``reduction``), from its counted tokens [B].

        [B], or [B, 2] with ``token_part``: column 0 weighs ``loss``, column 1 ``token_loss``.
        """
        n = len(counted_tokens)
        per_token = np.full(n, 1.0 / max(float(np.sum(counted_tokens)), 1.0))
        main = per_token if self.reduction == "token" else np.full(n, 1.0 / max(n, 1))
        return np.stack([main, per_token], axis=1) if self.token_part else main

    def weighted(self, out: Any, weights: Any) -> Any:
        """The weighted sum of a micro-batch's losses (a scalar tensor), ``weights`` a slice of
        :meth:`step_weights` as a tensor."""
        if not self.token_part:
            return (out.loss * weights).sum()
        return (out.loss * weights[:, 0]).sum() + (out.token_loss * weights[:, 1]).sum()


_L = "dppo.train.losses:"

LOSSES: dict[str, LossSpec] = {
    "sft": LossSpec(_L + "sft_loss", data="sft", needs_reference=False, reduction="token"),
    "dpo": LossSpec(_L + "dpo_loss", options=(BETA,)),
    # The paper's SimPO grid (Table 1) scored best with gamma 1, beta 2.5 (win rate 0.688), and the
    # author's SimPO script defaults to them. They sit in the SimPO authors' own range
    # (princeton-nlp/SimPO README: beta 2.0 or 2.5 in the preprint, gamma = c * beta with c about
    # 0.25-0.5; here c = 0.4). method.md's gamma is an absolute margin, not a gamma/beta ratio.
    "simpo": LossSpec(_L + "simpo_loss", needs_reference=False, options=(
        BETA.with_default(2.5, paper=2.5),
        Option("gamma", float, 1.0, "SimPO's target reward margin", low=0.0, paper=1.0),
    )),
    # Paper section 5: alpha 10 for minll (expectile, zeta 0.5), 0.1 for unll and conll.
    "minll": LossSpec(_L + "minll_loss", needs_ygen=True, without_ygen="dpo", options=(
        BETA, ALPHA.with_default(10.0, paper=10.0), WEIGHT.with_default("expectile", paper="expectile"),
        *_PENALTY[3:],
        Option("penalty_norm", str, "mean", "Penalize the mean (length-normalized) or the sum log-prob of y_gen",
               choices=PENALTY_NORMS),
    )),
    "unll": LossSpec(_L + "unll_loss", needs_ygen=True, without_ygen="dpo", options=(
        BETA, ALPHA.with_default(0.1, paper=0.1), *_PENALTY[2:],
    )),
    # method.md names no conll weight; the author's conll script defaults to quadratic.
    "conll": LossSpec(_L + "conll_loss", needs_ygen=True, needs_ref_ygen=True, without_ygen="dpo", options=(
        BETA, ALPHA.with_default(0.1, paper=0.1), *_PENALTY[2:5], VOTE_CLIP.with_default(700.0), *_PENALTY[6:],
    )),
}
"""The losses by method name (``--method``). :func:`register_loss` adds one."""

# TRL's pair losses (trl/trainer/dpo_trainer.py, 1.16) at TRL's defaults: DPOConfig's beta 0.1,
# label_smoothing 0, discopop_tau 0.05; dpo keeps the DPPO paper's beta and gains cDPO's smoothing.
_P = "dppo.train.losses_pairs:"
_TRL_BETA = BETA.with_default(0.1, paper=None)
LOSSES["dpo"] = dataclasses.replace(LOSSES["dpo"], options=(BETA, LABEL_SMOOTHING))
for _name, _options in (
    ("ipo", (_TRL_BETA,)),
    ("hinge", (_TRL_BETA,)),
    ("robust", (_TRL_BETA, LABEL_SMOOTHING)),
    # TRL refuses exo_pair at its default label_smoothing 0 and recommends the EXO paper's 1e-3
    ("exo_pair", (_TRL_BETA, LABEL_SMOOTHING.with_default(1e-3, paper=1e-3))),
    ("nca_pair", (_TRL_BETA,)),
    ("bco_pair", (_TRL_BETA, BCO_RUNNING_MEAN)),
    ("sppo_hard", (_TRL_BETA,)),
    ("aot", (_TRL_BETA, LABEL_SMOOTHING)),
    ("aot_unpaired", (_TRL_BETA, LABEL_SMOOTHING)),
    ("apo_zero", (_TRL_BETA,)),
    ("apo_down", (_TRL_BETA,)),
    ("discopop", (_TRL_BETA, DISCOPOP_TAU)),
    ("sigmoid_norm", (_TRL_BETA,)),
):
    LOSSES[_name] = LossSpec(
        _P + _name + "_loss", options=_options,
        step_context=_P + "pair_context" if _name in ("aot", "aot_unpaired", "bco_pair") else None,
        context_option="bco_running_mean" if _name == "bco_pair" else None,
    )
# ORPO: no reference; ORPOConfig's beta (the paper's lambda) is 0.1
# The NLL covers the chosen sequence's prompt and answer by default, as TRL's ORPOTrainer (its
# labels are the input ids wherever the attention mask is 1); orpo_nll "answer" keeps the answer's.
LOSSES["orpo"] = LossSpec(_P + "orpo_loss", needs_reference=False, options=(_TRL_BETA, ORPO_NLL), token_part=True,
                          prompt_tokens=("orpo_nll", "sequence"))

BUILTIN = tuple(LOSSES)


_known: tuple[tuple, dict[str, Option]] = ((), {})
# --------------------------------------------------------------------------------------------------
# Combinations: --method A+B[+C] --loss-weights wA,wB[,wC]
# --------------------------------------------------------------------------------------------------

PENALTY_TERMS = ("minll", "unll")
"""In a combination these name the DPPO penalty alone, ``alpha * f(r) * penalty(y_gen)`` (alone,
minll and unll are DPO plus that term, so ``dpo+unll`` is ``unll``)."""


def _combination(method: str) -> LossSpec:
    """The :class:`LossSpec` of ``"A+B[+C]"``: the weighted sum of its terms' losses
    (:func:`dppo.train.combine.combined_loss`)."""
    terms = method.split("+")
    if len(terms) < 2 or any(not t for t in terms):
        raise ValueError(f"method {method!r}: a combination is two or more methods joined by '+'")
    if len(set(terms)) != len(terms):
        raise ValueError(f"method {method!r} names a term twice (weigh it with --loss-weights instead)")
    for t in terms:
        if t not in LOSSES:
            raise ValueError(f"method {method!r}: {t!r} is not a method; known: {'|'.join(LOSSES)}")
        if t == "conll":
            raise ValueError(f"method {method!r}: conll's penalty lives inside DPO's sigmoid and does not combine; "
                             "use --method conll, or minll / unll as penalty terms (ipo+unll)")
        if LOSSES[t].fn == "dppo.train.combine:combined_loss":
            raise ValueError(f"method {method!r}: {t!r} is itself a combination")
    if all(t in PENALTY_TERMS for t in terms):
        raise ValueError(f"method {method!r}: a combination needs a preference loss or sft beside the penalty terms")
    if len([t for t in terms if t in PENALTY_TERMS]) > 1:
        raise ValueError(f"method {method!r}: one penalty term at most (minll or unll)")
    specs = [LOSSES[t] for t in terms]
    options: dict[str, Option] = {}
    for t, spec in zip(terms, specs, strict=True):
        for o in spec.options:
            assert isinstance(o, Option)
            if t in PENALTY_TERMS and o.name == "beta":
                continue  # the penalty alone: beta belongs to the preference terms
            options.setdefault(o.name, o)  # the first term that reads an option gives its default
    contexts = [spec for spec in specs if spec.step_context is not None]
    kept = [t for t in terms if t not in PENALTY_TERMS]
    return LossSpec(
        "dppo.train.combine:combined_loss",
        data="pairs",
        needs_reference=any(spec.needs_reference for t, spec in zip(terms, specs, strict=True) if t not in PENALTY_TERMS),
        needs_ygen=any(t in PENALTY_TERMS for t in terms),
        options=(*options.values(), LOSS_WEIGHTS.with_default(",".join("1" for _ in terms))),
        token_part=any(spec.token_part or spec.reduction == "token" for spec in specs),
        prompt_tokens=next((spec.prompt_tokens for spec in specs if spec.prompt_tokens is not None), None),
        step_context=contexts[0].step_context if contexts else None,
        context_option=None if any(c.context_option is None for c in contexts) else
        next((c.context_option for c in contexts), None),
        without_ygen="+".join(kept) if len(kept) < len(terms) else None,  # the combination without its penalty
    )


class _Registry(dict):
    """``LOSSES``: the registered methods by name; a name ``"A+B"`` of registered methods is their
    combination, built on first use (and not listed)."""

    def __missing__(self, key: str) -> LossSpec:
        if isinstance(key, str) and "+" in key:
            if key not in _COMBINATIONS:
                _COMBINATIONS[key] = _combination(key)
            return _COMBINATIONS[key]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        if super().__contains__(key):
            return True
        if isinstance(key, str) and "+" in key:
            try:
                self[key]
            except ValueError:
                return False
            return True
        return False


_COMBINATIONS: dict[str, LossSpec] = {}
LOSSES = _Registry(LOSSES)


def parse_weights(text: str, n: int, method: str) -> tuple[float, ...]:
    """``"1,0.5"`` -> (1.0, 0.5): one finite weight >= 0 per term of ``method``; ValueError otherwise."""
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"loss_weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != n:
        raise ValueError(f"loss_weights must give one weight per term of {method!r} ({n}), got {len(weights)}: {text!r}")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"loss_weights must be finite numbers >= 0, got {text!r}")
    return weights


def _check_values(method: str, values: Mapping[str, Any]) -> None:
    """The checks that depend on the method as well as the value (ValueError naming the option)."""
    terms = method.split("+")
    eps = values.get("label_smoothing", 0.0)
    if "robust" in terms and not eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust (the label-flip rate), got {eps!r}")
    if "exo_pair" in terms and not eps > 0:
        raise ValueError(f"label_smoothing must be > 0 for exo_pair (the EXO paper uses 1e-3), got {eps!r}")
    if len(terms) > 1:
        parse_weights(values["loss_weights"], len(terms), method)
        if "orpo" in terms and "sft" in terms and values.get("orpo_nll") == "sequence":
            raise ValueError(f"method {method!r}: orpo's NLL (orpo_nll 'sequence') is a mean over the chosen prompts' "
                             "and answers' tokens, sft's over the answers' alone; one step has one token count: "
                             "use orpo_nll 'answer' with sft")
        spec = LOSSES[method]
        if values.get("vote") == "ref" and spec.needs_ygen and not spec.needs_reference:
            raise ValueError(f"vote 'ref' needs the reference's log-probs and {method} has no reference model: "
                             "use vote 'policy'")


def known_options() -> dict[str, Option]:
    """Every option a registered loss declares, by name, in registration order (the first
    declaration of a name stands for it: its help and kind; defaults are per entry). Cached until
    the registry changes; do not modify the returned dict."""
    global _known
    state = tuple(map(id, LOSSES.values()))
    if state != _known[0]:
        out: dict[str, Option] = {}
        for spec in LOSSES.values():
            for opt in spec.options:
                out.setdefault(opt.name, opt)  # type: ignore[union-attr, arg-type]
        out.setdefault(LOSS_WEIGHTS.name, LOSS_WEIGHTS)  # the combinations' (built on use, not listed)
        _known = (state, out)
    return _known[1]


def option_users(name: str) -> list[str]:
    """The methods whose entries declare option ``name``, in registration order."""
    return [m for m, spec in LOSSES.items() if spec.option(name) is not None]


def option_help(name: str) -> str:
    """``name``'s line of ``dppo train --help``: its help, choices, range, condition, each user's
    default and the paper's values, all from the declarations."""
    opt = known_options()[name]
    users = option_users(name)
    text = opt.help + (f": {'|'.join(opt.choices)}" if opt.choices else "") + opt.describe_range("; ")
    if opt.when is not None:
        text += f"; with --{opt.when[0].replace('_', '-')} {_show(opt.when[1])} only"
    if not users:  # loss_weights: the combinations'
        return text + " (default 1 each)"
    defaults = {m: LOSSES[m].option(name).default for m in users}  # type: ignore[union-attr]
    papers = {m: LOSSES[m].option(name).paper for m in users if LOSSES[m].option(name).paper is not None}  # type: ignore[union-attr]
    text += f" (default {_per_method(defaults)}"
    if papers and papers == {m: defaults[m] for m in papers}:
        text += ", the paper's" if len(papers) == len(users) else f"; the paper's for {', '.join(papers)}"
    elif papers:
        text += f"; paper: {_per_method(papers)}"
    return text + ")"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _per_method(values: Mapping[str, Any]) -> str:
    """``"0.01; simpo 2.5"``: the most common value bare, the others with their methods."""
    groups: dict[Any, list[str]] = {}
    for method, value in values.items():
        groups.setdefault((type(value), value), []).append(method)
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    head, *rest = ordered
    return "; ".join([_show(head[0][1])] + [f"{', '.join(ms)} {_show(v)}" for (_, v), ms in rest])


def register_loss(name: str, spec: LossSpec, *, overwrite: bool = False) -> None:
    """Make ``name`` a method of ``dppo train`` (``--method name``), with the options ``spec`` declares::

        register_loss("scaled", LossSpec(scaled_margin, needs_reference=False,
                                         options=(BETA.with_default(0.1), Option("scale", float, 1.0, "Margin multiplier"))))
        TrainConfig(method="scaled", scale=3.0, data=..., init=..., out=...)

    An option declared by another entry under the same name must agree with it in type, choices,
    range and condition (defaults, help and paper values may differ); an option may not take the
    name of a ``dppo train`` option that is not a loss's (``lr``, ``seed``, ...).
    """
    if not name or not name.replace("_", "").replace("-", "").replace("+", "").isalnum():
        raise ValueError(f"loss name {name!r}: use letters, digits, '-', '_' or '+'")
    if not isinstance(spec, LossSpec):
        raise ValueError(f"loss {name!r}: expected a LossSpec, got {type(spec).__name__}")
    if name in LOSSES and not overwrite:
        raise ValueError(f"loss {name!r} is already registered (pass overwrite=True to replace it)")
    from dppo.train.config import TRAIN_FIELDS  # the run's own options: a loss option may not shadow one

    _COMBINATIONS.clear()

    others = {m: s for m, s in LOSSES.items() if m != name}
    for opt in spec.options:
        assert isinstance(opt, Option)
        if opt.name in TRAIN_FIELDS:
            raise ValueError(f"loss {name!r}: option {opt.name!r} is a dppo train option; name it otherwise")
        for method, other in others.items():
            theirs = other.option(opt.name)
            if theirs is not None and theirs.kind() != opt.kind():
                raise ValueError(f"loss {name!r}: option {opt.name!r} is declared by {method} with another type, "
                                 "choices, range or condition; use its declaration or another name")
    LOSSES[name] = spec


def loss_spec(method: str) -> LossSpec:
    """The registry's entry for ``method``; ``ValueError`` naming the known ones otherwise.

    The one place a method name is resolved (``TrainConfig``, ``LossConfig``, the trainer's
    objective): a composed name (terms of several entries with weights) can resolve here to one
    entry whose options are the union of its terms' declarations, which agree by name.
    """
    if isinstance(method, str) and "+" in method and not dict.__contains__(LOSSES, method):
        return LOSSES[method]  # a combination: its own error names the bad term
    if method not in LOSSES:
        raise ValueError(f"method must be one of {'|'.join(LOSSES)} or a combination A+B, got {method!r}")
    return LOSSES[method]


_entry_points_loaded: set[str] = set()


def load_entry_points() -> list[str]:
    """Register the losses other packages declare in the ``dppo.losses`` entry-point group.

    Each entry point names a :class:`LossSpec` (``myloss = mypackage.losses:SPEC`` in the package's
    ``[project.entry-points."dppo.losses"]``), registered as the method of the entry point's name.
    Loaded once per process (the command line does it before ``dppo train`` parses its options); a
    module that imports torch at its top makes that slower: give ``fn`` as ``"module:function"``.
    Returns the names registered; an entry point that cannot be loaded raises
    :class:`~dppo.errors.ConfigError` naming it and its module.
    """
    from importlib.metadata import entry_points

    from dppo.errors import ConfigError

    added = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _entry_points_loaded:
            continue
        where = f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP} (module {ep.module})"
        try:
            spec = ep.load()
        except Exception as e:  # anything a third-party module may raise on import
            raise ConfigError(f"{where} failed to load: {type(e).__name__}: {_first_line(e)}") from None
        if ep.name in LOSSES:
            raise ConfigError(f"{where}: a loss named {ep.name!r} is already registered")
        try:
            register_loss(ep.name, spec)
        except ValueError as e:
            raise ConfigError(f"{where}: {_first_line(e)}") from None
        _entry_points_loaded.add(ep.name)
        added.append(ep.name)
    return added


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------------------
# The configuration of one loss
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class LossConfig:
    """Option values of one loss, read as attributes (``cfg.beta``). Build it with :meth:`defaults`.

    The values are the method's declared options at their entry's defaults, with the given
    overrides checked by the declarations (``ValueError`` naming the option). Options declared by
    other losses are accepted and checked too, and ignored by this method's loss (``dppo train``
    refuses them); reading an option the method does not declare gives its shared default.
    ``dataclasses.replace(cfg, alpha=0.2)`` works as for any dataclass.

    Attributes:
        method: a name of the registry :data:`LOSSES`.
        values: every option value, by name.
    """

    method: str
    values: Mapping[str, Any]

    def __init__(self, method: str, values: Mapping[str, Any] | None = None, **options: Any) -> None:
        spec = loss_spec(method)
        given = {**(values or {}), **options}
        known = known_options()
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"unknown LossConfig option(s) {unknown}; known: {sorted(known)}")
        resolved = {o.name: o.default for o in spec.options}  # type: ignore[union-attr]
        for name, value in given.items():
            resolved[name] = (spec.option(name) or known[name]).check(value)
        _check_values(method, resolved)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "values", resolved)
        for name, value in resolved.items():
            object.__setattr__(self, name, value)  # plain attributes: a loss reads them at no cost

    @classmethod
    def defaults(cls, method: str, **overrides: Any) -> LossConfig:
        """The configuration of ``method`` at its entry's defaults, with ``overrides`` applied.

        Built in (``docs/method.md``): beta 0.01 (simpo: beta 2.5, gamma 1.0); alpha 10 for minll, 0.1
        for unll and conll; weight expectile (zeta 0.5) for minll, quadratic for unll and conll;
        vote policy; vote_clip 2000 for minll and unll, 700 for conll; vote_norm clip;
        detach_weight False; penalty_norm mean.
        """
        return cls(method, **overrides)

    def __getattr__(self, name: str) -> Any:  # only for names not set in __init__
        if not name.startswith("_") and name not in ("method", "values"):
            opt = known_options().get(name)
            if opt is not None:
                return opt.default
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __hash__(self) -> int:
        return hash((self.method, tuple(sorted(self.values.items()))))


def ygen_free(cfg: LossConfig) -> LossConfig:
    """The configuration that evaluates ``cfg`` on data without y_gen: its entry's ``without_ygen``
    method, with the values of the options the two share (``ConfigError`` where the entry names none)."""
    target = loss_spec(cfg.method).without_ygen
    if target is None:
        from dppo.errors import ConfigError

        raise ConfigError(f"--method {cfg.method} has no evaluation without y_gen: give --eval-data with y_gen "
                          "(`dppo prep prefs --ygen`)")
    shared = {k: cfg.values[k] for k in loss_spec(target).option_names if k in cfg.values}
    if "+" in target and "loss_weights" in shared:  # the weights of the terms kept
        kept = target.split("+")
        weights = parse_weights(cfg.values["loss_weights"], len(cfg.method.split("+")), cfg.method)
        shared["loss_weights"] = ",".join(repr(w) for t, w in zip(cfg.method.split("+"), weights, strict=True) if t in kept)
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

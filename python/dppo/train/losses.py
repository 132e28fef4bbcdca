"""Training losses: SFT, DPO, SimPO and the three DPPO objectives (minll, unll, conll).

Every loss is a pure function of per-sequence log-probabilities, in the manner of torchtune's
``rlhf/loss/dpo.py``: hyperparameters (a :class:`LossConfig`) and log-probabilities (a
:class:`LogProbs`) in, per-example losses and statistics (a :class:`LossOutput`) out. The caller
runs the models and reduces the per-example losses as the method's registry entry says
(``LossSpec.reduction``): the mean over a step's examples for the preference losses, the sum over
examples divided by the step's response tokens for SFT (whose per-example loss is a sum over
tokens). Nothing here touches a model.

    cfg = LossConfig.defaults("unll", alpha=0.2)
    out = LOSSES[cfg.method](cfg, logps)
    out.loss.mean().backward()

The methods are selected through the :data:`LOSSES` registry (:mod:`dppo.train.registry`), whose
entries also declare each method's options and say which inputs it needs (``needs_reference``,
``needs_ygen``, ...), so a trainer never branches on method names. The formulas, options and
defaults follow ``docs/method.md``; the papers are

- DPPO: "Direct Preference and Penalization Optimization" (direct on-policy penalization), the
  project's paper: ``L = L_DPO + alpha * f(r) * penalty(y_gen)`` where y_gen is the reference model's
  greedy response and f(r) switches the penalty on when the policy votes for the rejected response.
- DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
  Model", arXiv:2305.18290.
- SimPO: Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
  arXiv:2405.14734.
- Unlikelihood: Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training",
  arXiv:1908.04319.

Notation (shapes): B examples; ``logp(y)`` is the sum over the response tokens of
``log pi(y_t | x, y_<t)`` (prompt tokens never count), ``mean_logp(y) = logp(y) / |y|``.
Computation happens in float32, or float64 when an input is float64 (never in half precision).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import reduce

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "PENALTY_NORMS",
    "SQRT_WEIGHT_EPS",
    "UL_MIN_ONE_MINUS_P",
    "VOTES",
    "VOTE_NORMS",
    "WEIGHTS",
    "LogProbs",
    "LossConfig",
    "LossOutput",
    "LossSpec",
    "can_skip_ygen",
    "conll_loss",
    "dpo_loss",
    "minll_loss",
    "normalize_vote",
    "per_example_sum",
    "sft_loss",
    "simpo_loss",
    "unlikelihood",
    "unll_loss",
    "register_loss",
    "vote",
    "vote_weight",
]

from dppo.train.registry import (  # noqa: E402  (the registry and the configuration, re-exported)
    LOSSES,
    PENALTY_NORMS,
    VOTE_NORMS,
    VOTES,
    WEIGHTS,
    LossConfig,
    LossSpec,
    register_loss,
)

# The original unlikelihood code clamps 1 - p from below at 1e-5 (docs/method.md), so that a token the
# policy is certain of gives a large but finite UL (-log 1e-5 ~ 11.5) instead of +inf.
UL_MIN_ONE_MINUS_P = 1e-5
_UL_MAX_LOGP = math.log1p(-UL_MIN_ONE_MINUS_P)

# sqrt weight: sqrt(max(-r, eps)) keeps d f / d r_n <= 0.5 / sqrt(eps) = 500 near r = 0. It only
# changes f where |r_n| < 1e-6, i.e. |r| < 2e-3 nats with the default vote clip of 2000.
SQRT_WEIGHT_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogProbs:
    """Per-sequence log-probabilities of one batch of B examples, as the losses consume them.

    Sums are over response tokens only. A method raises ``ValueError`` naming a field it needs and
    did not get; fields it does not use are ignored. For ``sft`` the training response goes in the
    ``chosen`` slot.

    Attributes:
        policy_chosen: [B] logp_pi(y_w | x).
        n_chosen: [B] number of response tokens of y_w (simpo, sft); any integer or float dtype.
        policy_rejected: [B] logp_pi(y_l | x).
        n_rejected: [B] number of response tokens of y_l (simpo).
        ref_chosen: [B] logp_ref(y_w | x) (dpo, minll, unll, conll).
        ref_rejected: [B] logp_ref(y_l | x).
        ygen_token_logps: [N] per-token log pi(y_gen_t | x, y_gen_<t) of the policy, flattened over
            the batch (the packed-row form the trainer produces; from a padded [B, T] tensor with a
            boolean mask use ``logps[mask]`` and ``mask.nonzero()[:, 0]``). Unlikelihood needs
            per-token values; minll and conll reduce them to sums.
        ygen_index: [N] integer tensor: the example (0 .. B-1) each y_gen token belongs to.
            Tokens of examples whose y_gen term is skipped (:func:`can_skip_ygen`) may be left out.
        ref_ygen: [B] logp_ref(y_gen | x) (conll). Entries of skipped examples are ignored.
        context: per-example values computed from the whole step (detached), for losses that
            compare an example with the rest of its step (``aot``: its sorted partner); [B] each.
        prompt_chosen: [B] the sum of log pi over the prompt tokens of the sequence prompt + y_w,
            all but the first (which nothing predicts), for a token part that covers the prompt
            (orpo's NLL as TRL's ORPOTrainer takes it; ``LossSpec.prompt_tokens``).
        n_prompt: [B] the number of those tokens (prompt length - 1).
    """

    policy_chosen: Tensor
    n_chosen: Tensor | None = None
    policy_rejected: Tensor | None = None
    n_rejected: Tensor | None = None
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    ygen_token_logps: Tensor | None = None
    ygen_index: Tensor | None = None
    ref_ygen: Tensor | None = None
    context: Mapping[str, Tensor] | None = None
    prompt_chosen: Tensor | None = None
    n_prompt: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.policy_chosen.shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32, or float64 if any floating field is float64: half precision is always upcast."""
        fields = (getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "context")
        return _compute_dtype(*fields)

    def require(self, method: str, *names: str) -> tuple[Tensor, ...]:
        """The fields ``names``, in order; ``ValueError`` (naming the field) if absent or misshapen."""
        b = self.batch_size
        out = []
        if self.policy_chosen.ndim != 1:
            raise ValueError(f"LogProbs.policy_chosen must have shape [B], got {tuple(self.policy_chosen.shape)}")
        for name in names:
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"method {method!r} needs LogProbs.{name}")
            if name == "ygen_token_logps" or name == "ygen_index":
                if value.ndim != 1:
                    raise ValueError(f"LogProbs.{name} must have shape [N], got {tuple(value.shape)}")
            elif tuple(value.shape) != (b,):
                raise ValueError(f"LogProbs.{name} must have shape [B] = [{b}], got {tuple(value.shape)}")
            out.append(value)
        if "ygen_index" in names:
            tokens, index = self.ygen_token_logps, self.ygen_index
            assert tokens is not None and index is not None
            if index.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"LogProbs.ygen_index must be int32 or int64, got {index.dtype}")
            if index.shape != tokens.shape:
                raise ValueError(
                    f"LogProbs.ygen_index {tuple(index.shape)} and ygen_token_logps "
                    f"{tuple(tokens.shape)} must have the same shape"
                )
        return tuple(out)


@dataclass(frozen=True)
class LossOutput:
    """Per-example loss and statistics; every tensor is [B]. Only ``loss`` carries gradient.

    Statistics a method does not define are ``None``; :meth:`stats` collects the others.

    Attributes:
        loss: the per-example loss; the caller reduces (``loss.mean()``).
        dpo_loss: the preference term: -log sigmoid(beta * margin) for dpo, minll, unll and conll
            (for conll without its y_gen term, for comparison), the SimPO loss for simpo.
        chosen_rewards: beta * (logp_pi(y_w) - logp_ref(y_w)); simpo: beta * mean_logp_pi(y_w).
        rejected_rewards: the same for y_l.
        margins: chosen_rewards - rejected_rewards.
        accuracies: 1.0 where chosen_rewards > rejected_rewards, else 0.0.
        r: the raw vote logp(y_w) - logp(y_l) of ``cfg.vote``'s model (DPPO methods).
        r_norm: the normalized vote in [-1, 1].
        weight: f(r_norm).
        penalty: the y_gen term before alpha and f: minll mean_logp_pi(y_gen) (or logp_pi with
            penalty_norm "sum"), unll UL(y_gen), conll logp_pi(y_gen) - logp_ref(y_gen). Zero for
            examples whose y_gen term is inactive (see ``penalized``), whether or not they were skipped.
        penalized: 1.0 where the y_gen term is active (not :func:`can_skip_ygen`), else 0.0.
        token_loss: a part of the loss reduced over tokens instead of examples: per-example sums
            over the chosen answer's tokens (the NLL of an ``sft`` term in a combination; orpo's
            NLL, which by default covers the chosen prompt's tokens too). A step's loss is
            ``mean(loss)`` over its examples plus ``sum(token_loss)`` over the step's counted
            tokens (``n_tokens``; :meth:`LossSpec.weighted`).
        terms: named per-example parts of the loss (each term of a combination, ORPO's odds-ratio
            term), logged as their mean over the step's examples.
        token_terms: named per-example token sums, logged as their sum over the step's tokens
            (``n_tokens``).
        n_tokens: [B] the token counts ``token_loss`` and ``token_terms`` are reduced over.
    """

    loss: Tensor
    dpo_loss: Tensor | None = None
    chosen_rewards: Tensor | None = None
    rejected_rewards: Tensor | None = None
    margins: Tensor | None = None
    accuracies: Tensor | None = None
    r: Tensor | None = None
    r_norm: Tensor | None = None
    weight: Tensor | None = None
    penalty: Tensor | None = None
    penalized: Tensor | None = None
    token_loss: Tensor | None = None
    terms: Mapping[str, Tensor] | None = None
    token_terms: Mapping[str, Tensor] | None = None
    n_tokens: Tensor | None = None

    def stats(self) -> dict[str, Tensor]:
        """The per-example statistics that are defined, by name (not the loss and its terms)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _NOT_STATS and getattr(self, f.name) is not None
        }


_NOT_STATS = frozenset({"loss", "token_loss", "terms", "token_terms", "n_tokens"})


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32, or float64 if any floating input is float64: half precision is upcast."""
    dtypes = [t.dtype for t in tensors if t is not None and t.is_floating_point()]
    return reduce(torch.promote_types, dtypes, torch.float32)


def per_example_sum(values: Tensor, index: Tensor, batch_size: int) -> Tensor:
    """Sum a flat per-token tensor into per-example totals.

    Args:
        values: [N] per-token values.
        index: [N] integer example id of each token, in [0, batch_size).
        batch_size: B.

    Returns:
        [B] with ``out[b] = sum(values[index == b])``; 0 for an example with no tokens.
    """
    return values.new_zeros(batch_size).index_add(0, index, values)


def vote(cfg: LossConfig, logps: LogProbs) -> Tensor:
    """The raw vote r = logp(y_w | x) - logp(y_l | x) (DPPO paper eq. 6), in the compute dtype.

    With ``cfg.vote == "policy"`` r comes from the policy (and carries its gradient); with "ref" it
    comes from the reference model and is detached: a constant per example, known before any forward
    pass of the policy.

    Returns:
        [B] r, float32 or float64.
    """
    if cfg.vote == "policy":
        chosen, rejected = logps.policy_chosen, *logps.require(cfg.method, "policy_rejected")
    else:
        chosen, rejected = logps.require(cfg.method, "ref_chosen", "ref_rejected")
    dtype = logps.compute_dtype
    r = chosen.to(dtype) - rejected.to(dtype)
    return r.detach() if cfg.vote == "ref" else r


def normalize_vote(cfg: LossConfig, r: Tensor) -> Tensor:
    """Map the raw vote into [-1, 1]: r_n = clamp(r, -C, C) / C ("clip") or tanh(r / C) ("tanh").

    C = ``cfg.vote_clip``. Both keep the sign of r (and r_n = 0 exactly when r = 0).
    """
    c = cfg.vote_clip
    if cfg.vote_norm == "clip":
        return r.clamp(-c, c) / c
    return torch.tanh(r / c)


def vote_weight(cfg: LossConfig, r_norm: Tensor) -> Tensor:
    """The weight function f of the DPPO paper (eq. 7), applied to the normalized vote r_n.

    ========== =====================================
    linear     f(r) = -1{r<0} r
    quadratic  f(r) = 1{r<0} r^2
    sqrt       f(r) = 1{r<0} sqrt(max(-r, eps)), eps = ``SQRT_WEIGHT_EPS``
    expectile  f(r) = (1{r<0} - zeta) r^2
    ========== =====================================

    All but expectile vanish for r >= 0 (the loss is then plain DPO); expectile is negative for
    r > 0, so it *rewards* y_gen when the policy votes correctly. Where the gate 1{r<0} (or the
    expectile's r^2 at r = 0) makes f zero, its autograd gradient is zero too, which is what makes
    :func:`can_skip_ygen` exact. ``cfg.detach_weight`` is applied by the losses, not here.

    Args:
        r_norm: [B] normalized vote.

    Returns:
        [B] f(r_norm).
    """
    negative = (r_norm < 0).to(r_norm.dtype)
    if cfg.weight == "linear":
        return -negative * r_norm
    if cfg.weight == "quadratic":
        return negative * r_norm.square()
    if cfg.weight == "sqrt":
        return negative * torch.sqrt(torch.clamp(-r_norm, min=SQRT_WEIGHT_EPS))
    return (negative - cfg.zeta) * r_norm.square()


def can_skip_ygen(cfg: LossConfig, r: Tensor) -> Tensor:
    """Which examples' y_gen term is exactly zero, in value and gradient, so y_gen's forward may be skipped.

    Args:
        cfg: the loss configuration.
        r: [B] raw vote from :func:`vote` (only its sign matters, so any dtype works).

    Returns:
        [B] bool, True where the y_gen term of the loss is identically zero: for a method without a
        y_gen term (sft, dpo, simpo) every example; for minll, unll and conll

        - every example when alpha == 0;
        - linear, quadratic, sqrt weights: r >= 0;
        - expectile: r == 0 only (it is nonzero, rewarding y_gen, for r > 0), plus r >= 0 when
          zeta == 0 and r < 0 when zeta == 1.

    The losses zero the y_gen inputs of these examples themselves, so a trainer that leaves their
    tokens out of ``ygen_token_logps`` (and puts anything in ``ref_ygen``) gets identical losses,
    gradients and statistics. Where r is known: with ``vote="ref"`` before any policy forward (r is a
    constant of the data); with ``vote="policy"`` after the chosen/rejected forward of the same step,
    so y_gen's forward must come after it. The decision holds for that step's parameters only.
    """
    if not LOSSES[cfg.method].needs_ygen or cfg.alpha == 0:
        return torch.ones(r.shape, dtype=torch.bool, device=r.device)
    if cfg.weight != "expectile":
        return r >= 0
    skip = r == 0
    if cfg.zeta == 0:
        skip = skip | (r >= 0)
    if cfg.zeta == 1:
        skip = skip | (r < 0)
    return skip


def unlikelihood(token_logps: Tensor) -> Tensor:
    """Token-level unlikelihood -log(1 - p) from log p (Welleck et al. 2019), computed stably.

    p is clamped so that 1 - p >= ``UL_MIN_ONE_MINUS_P`` (1e-5), i.e. log p <= log(1 - 1e-5): a
    token with p = 1 gives the finite value -log(1e-5) and zero gradient. log(1 - p) is
    log(-expm1(log p)), which is exact near p = 1; for p < 1/2 the equivalent log1p(-p) is used,
    which is exact near p = 0 (both branches are finite everywhere, so ``torch.where`` passes no NaN
    into the gradient).

    Args:
        token_logps: [...] log-probabilities (<= 0); upcast to at least float32.

    Returns:
        [...] -log(1 - p) >= 0, float32 or float64.
    """
    logp = token_logps.to(_compute_dtype(token_logps)).clamp(max=_UL_MAX_LOGP)
    log1m_p = torch.where(logp > -math.log(2.0), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))
    return -log1m_p


def _dpo_parts(cfg: LossConfig, logps: LogProbs, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Log-ratios logp_pi(y) - logp_ref(y) of chosen and rejected, [B] each."""
    names = ("policy_rejected", "ref_chosen", "ref_rejected")
    policy_rejected, ref_chosen, ref_rejected = logps.require(cfg.method, *names)
    chosen = logps.policy_chosen.to(dtype) - ref_chosen.to(dtype)
    rejected = policy_rejected.to(dtype) - ref_rejected.to(dtype)
    return chosen, rejected


def _preference_stats(beta: float, chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    chosen_rewards = (beta * chosen).detach()
    rejected_rewards = (beta * rejected).detach()
    return {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": chosen_rewards - rejected_rewards,
        "accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
    }


@dataclass(frozen=True)
class _Penalty:
    """The pieces every DPPO loss shares: vote, weight and the y_gen activity mask."""

    r: Tensor
    r_norm: Tensor
    weight: Tensor  # f(r_n), detached if cfg.detach_weight
    active: Tensor  # bool, ~can_skip_ygen

    def mask(self, penalty: Tensor) -> Tensor:
        # Zero (not multiply) inactive entries: they may hold anything, NaN included, when skipped.
        return torch.where(self.active, penalty, torch.zeros((), dtype=penalty.dtype, device=penalty.device))

    def stats(self, penalty: Tensor) -> dict[str, Tensor]:
        return {
            "r": self.r.detach(),
            "r_norm": self.r_norm.detach(),
            "weight": self.weight.detach(),
            "penalty": penalty.detach(),
            "penalized": self.active.to(self.r.dtype),
        }


def _penalty_parts(cfg: LossConfig, logps: LogProbs, dtype: torch.dtype) -> _Penalty:
    r = vote(cfg, logps).to(dtype)
    r_norm = normalize_vote(cfg, r)
    weight = vote_weight(cfg, r_norm)
    if cfg.detach_weight:
        weight = weight.detach()
    return _Penalty(r=r, r_norm=r_norm, weight=weight, active=~can_skip_ygen(cfg, r))


def _ygen_sums(
    cfg: LossConfig, logps: LogProbs, dtype: torch.dtype, per_token: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Per-example sum of ``per_token(log p)`` over y_gen's tokens (default: log p) and token count, [B] each."""
    tokens, index = logps.require(cfg.method, "ygen_token_logps", "ygen_index")
    values = tokens.to(dtype) if per_token is None else per_token(tokens.to(dtype))
    total = per_example_sum(values, index, logps.batch_size)
    count = per_example_sum(torch.ones_like(values), index, logps.batch_size)
    return total, count


def _dppo_output(
    cfg: LossConfig, loss: Tensor, dpo: Tensor, chosen: Tensor, rejected: Tensor, parts: _Penalty, penalty: Tensor
) -> LossOutput:
    stats = _preference_stats(cfg.beta, chosen, rejected)
    return LossOutput(loss=loss, dpo_loss=dpo.detach(), **stats, **parts.stats(penalty))


# --------------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------------


def sft_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """Supervised fine-tuning: the negative log-likelihood of each example's response tokens.

        L_sft(example) = -logp_pi(y | x)         (a sum over the response's tokens)

    Prompt tokens are masked (assistant-only loss). Registered with reduction ``"token"``: a step's
    loss is the sum of these over its examples divided by its response tokens, i.e. the mean
    negative log-likelihood over every assistant token of the step (as TRL's SFT trainer averages),
    however the step is split into micro-batches. For a per-example mean instead, divide by
    ``n_chosen``.

    Args:
        cfg: ``method="sft"``; no hyperparameter is used.
        logps: ``policy_chosen`` [B] (the response's summed log-prob); nothing else is read.

    Returns:
        LossOutput with ``loss`` [B] and no statistics.
    """
    return LossOutput(loss=-logps.policy_chosen.to(logps.compute_dtype))


def dpo_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290, eq. 7).

        L_dpo = -log sigmoid(beta * [(logp_pi(y_w) - logp_ref(y_w)) - (logp_pi(y_l) - logp_ref(y_l))])

    With label smoothing eps (``--label-smoothing``, conservative DPO, Mitchell 2023; TRL's old
    ``sigmoid`` loss with ``label_smoothing``) the loss is
    ``-(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)``; eps = 0 (the default) is DPO.

    Args:
        cfg: uses ``beta`` and ``label_smoothing``.
        logps: ``policy_chosen``, ``policy_rejected``, ``ref_chosen``, ``ref_rejected``, all [B].

    Returns:
        LossOutput with ``loss`` [B], ``dpo_loss`` (= loss), rewards, margins and accuracies.

    Example: beta = 0.1 and equal log-ratios give margin 0 and loss log 2 = 0.6931.
    """
    chosen, rejected = _dpo_parts(cfg, logps, logps.compute_dtype)
    logits = cfg.beta * (chosen - rejected)
    eps = cfg.label_smoothing
    loss = -F.logsigmoid(logits) if eps == 0 else -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return LossOutput(loss=loss, dpo_loss=loss.detach(), **_preference_stats(cfg.beta, chosen, rejected))


def simpo_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """Simple Preference Optimization (Meng et al. 2024, arXiv:2405.14734): no reference model.

        L_simpo = -log sigmoid(beta * [mean_logp_pi(y_w) - mean_logp_pi(y_l)] - gamma)

    with mean_logp(y) = logp(y) / |y| (token counts of 0 are treated as 1).

    Args:
        cfg: uses ``beta`` and ``gamma`` (the target reward margin).
        logps: ``policy_chosen``, ``n_chosen``, ``policy_rejected``, ``n_rejected``, all [B].

    Returns:
        LossOutput with ``loss`` [B], ``dpo_loss`` (= loss); the rewards are SimPO's
        beta * mean_logp_pi(y).
    """
    n_chosen, policy_rejected, n_rejected = logps.require(cfg.method, "n_chosen", "policy_rejected", "n_rejected")
    dtype = logps.compute_dtype
    chosen = logps.policy_chosen.to(dtype) / n_chosen.to(dtype).clamp(min=1)
    rejected = policy_rejected.to(dtype) / n_rejected.to(dtype).clamp(min=1)
    loss = -F.logsigmoid(cfg.beta * (chosen - rejected) - cfg.gamma)
    return LossOutput(loss=loss, dpo_loss=loss.detach(), **_preference_stats(cfg.beta, chosen, rejected))


def minll_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """Minimum likelihood DPPO (DPPO paper eq. 5): DPO plus a vote-weighted log-likelihood of y_gen.

        L_minll = L_dpo + alpha * f(r_n) * mean_logp_pi(y_gen)        (penalty_norm "mean")
        L_minll = L_dpo + alpha * f(r_n) * logp_pi(y_gen)             (penalty_norm "sum")

    r = logp(y_w) - logp(y_l) under ``cfg.vote``'s model, r_n its normalization to [-1, 1]
    (:func:`normalize_vote`), f the weight (:func:`vote_weight`). With f > 0 minimizing the loss
    lowers the policy's likelihood of its own greedy response y_gen; the expectile weight (the
    default, zeta 0.5) is negative for r > 0 and then raises it. Unless ``cfg.detach_weight``, the
    gradient also flows through f(r) into logp_pi(y_w) and logp_pi(y_l).

    Args:
        cfg: uses ``beta``, ``alpha``, ``weight``, ``zeta``, ``vote``, ``vote_clip``, ``vote_norm``,
            ``detach_weight``, ``penalty_norm``.
        logps: DPO's four [B] fields, ``ygen_token_logps`` [N] and ``ygen_index`` [N].

    Returns:
        LossOutput with ``loss`` [B] and every statistic.
    """
    dtype = logps.compute_dtype
    chosen, rejected = _dpo_parts(cfg, logps, dtype)
    parts = _penalty_parts(cfg, logps, dtype)
    total, count = _ygen_sums(cfg, logps, dtype)
    penalty = parts.mask(total / count.clamp(min=1) if cfg.penalty_norm == "mean" else total)
    dpo = -F.logsigmoid(cfg.beta * (chosen - rejected))
    loss = dpo + cfg.alpha * parts.weight * penalty
    return _dppo_output(cfg, loss, dpo, chosen, rejected, parts, penalty)


def unll_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """Unlikelihood DPPO (DPPO paper eq. 8, token-level as in Welleck et al. 2019).

        L_unll = L_dpo + alpha * f(r_n) * UL(y_gen),
        UL(y) = (1 / |y|) * sum_t -log(1 - pi(y_t | x, y_<t))

    The unlikelihood is token-level and averaged over y_gen's tokens: the sequence-level
    log(1 - pi(y_gen | x)) of the paper's eq. 8 has no useful gradient for long responses. Each
    token's term is computed by :func:`unlikelihood` (clamped so that 1 - p >= 1e-5). r, r_n, f
    and the gradient through f are as in :func:`minll_loss`.

    Args:
        cfg: uses ``beta``, ``alpha``, ``weight``, ``zeta``, ``vote``, ``vote_clip``, ``vote_norm``,
            ``detach_weight``.
        logps: DPO's four [B] fields, ``ygen_token_logps`` [N] and ``ygen_index`` [N].

    Returns:
        LossOutput with ``loss`` [B] and every statistic.

    Example: beta 0.1, zero DPO margin, r = -2 with C = 4 (r_n = -0.5, quadratic f = 0.25),
    y_gen = two tokens of p = 1/2 (UL = log 2) and alpha 0.1 give
    loss = log 2 + 0.1 * 0.25 * log 2 = 1.025 log 2 = 0.71048.
    """
    dtype = logps.compute_dtype
    chosen, rejected = _dpo_parts(cfg, logps, dtype)
    parts = _penalty_parts(cfg, logps, dtype)
    total, count = _ygen_sums(cfg, logps, dtype, per_token=unlikelihood)
    penalty = parts.mask(total / count.clamp(min=1))
    dpo = -F.logsigmoid(cfg.beta * (chosen - rejected))
    loss = dpo + cfg.alpha * parts.weight * penalty
    return _dppo_output(cfg, loss, dpo, chosen, rejected, parts, penalty)


def conll_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """Contrastive likelihood DPPO (DPPO paper eq. 9): y_gen's log-ratio enters DPO's sigmoid.

        L_conll = -log sigmoid(beta * [DPO margin] - alpha * beta * f(r_n) * (logp_pi(y_gen) - logp_ref(y_gen)))

    with DPO margin = (logp_pi(y_w) - logp_ref(y_w)) - (logp_pi(y_l) - logp_ref(y_l)). Subtracting
    the reference's log-likelihood of y_gen keeps the policy from drifting far from the reference
    while it lowers y_gen's likelihood. r, r_n, f and the gradient through f are as in
    :func:`minll_loss`. ``penalty_norm`` is not used: the log-ratio is over whole sequences.

    Args:
        cfg: uses ``beta``, ``alpha``, ``weight``, ``zeta``, ``vote``, ``vote_clip``, ``vote_norm``,
            ``detach_weight``.
        logps: DPO's four [B] fields, ``ygen_token_logps`` [N], ``ygen_index`` [N], ``ref_ygen`` [B].

    Returns:
        LossOutput with ``loss`` [B] and every statistic; ``dpo_loss`` is the plain DPO loss of the
        same inputs (not a summand of ``loss``).
    """
    dtype = logps.compute_dtype
    chosen, rejected = _dpo_parts(cfg, logps, dtype)
    parts = _penalty_parts(cfg, logps, dtype)
    total, _ = _ygen_sums(cfg, logps, dtype)
    (ref_ygen,) = logps.require(cfg.method, "ref_ygen")
    penalty = parts.mask(total - ref_ygen.to(dtype))
    logits = cfg.beta * (chosen - rejected)
    loss = -F.logsigmoid(logits - cfg.alpha * cfg.beta * parts.weight * penalty)
    dpo = -F.logsigmoid(logits)
    return _dppo_output(cfg, loss, dpo, chosen, rejected, parts, penalty)


"""The pair losses of TRL's DPOTrainer (and its ORPO trainer), as pure functions of log-probabilities.

Each loss takes a :class:`~dppo.train.losses.LossConfig` and a :class:`~dppo.train.losses.LogProbs`
and returns a :class:`~dppo.train.losses.LossOutput` with per-example losses, like the losses of
:mod:`dppo.train.losses`. The formulas, reductions and defaults are TRL's (``trl/trainer/dpo_trainer.py``
``_compute_loss`` and ``trl/experimental/orpo/orpo_trainer.py``, version 1.16), so that a run of
``dppo train --method ipo`` optimizes what ``DPOTrainer(loss_type="ipo")`` optimizes; ``docs/method.md``
lists each formula, its paper and where TRL departs from the paper.

Notation: ``c = logp_pi(y_w) - logp_ref(y_w)`` and ``r = logp_pi(y_l) - logp_ref(y_l)`` are the
chosen and rejected log-ratios (sums over response tokens), ``d = c - r`` the DPO margin,
``n_w``, ``n_l`` the response token counts (at least 1), ``eps`` the label smoothing and ``s`` the
sigmoid. Every loss is per example; the batch loss is the mean over examples (TRL's
``per_sequence_loss.mean()``), except the NLL part of ``orpo``, which is the mean over the chosen
sequences' tokens, prompt included by default (TRL's ``CrossEntropyLoss``; see
:class:`~dppo.train.losses.LossOutput`'s ``token_loss``).

The two optimal-transport losses (``aot``, ``aot_unpaired``) sort log-ratios over the batch: a
per-example loss needs the batch's sorted values. :func:`aot_context` computes them from the whole
step's (detached) log-probabilities; given that context (``LogProbs.context``) each example's loss
is exact for the step however it is split into micro-batches and ranks. Without a context the
batch passed in is the sorting batch, as in TRL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dppo.train.losses import LogProbs, LossConfig, LossOutput, _dpo_parts, _preference_stats

__all__ = [
    "AOT_CONTEXT_KEYS",
    "aot_context",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "pair_context",
    "discopop_loss",
    "exo_pair_loss",
    "hinge_loss",
    "ipo_loss",
    "log1mexp",
    "nca_pair_loss",
    "orpo_loss",
    "robust_loss",
    "sigmoid_norm_loss",
    "sppo_hard_loss",
]

def _eps(cfg: LossConfig) -> float:
    return float(cfg.label_smoothing)


def _out(cfg: LossConfig, loss: Tensor, chosen: Tensor, rejected: Tensor, **terms: Tensor) -> LossOutput:
    """Output with TRL's logged statistics: rewards beta * log-ratio, margins and accuracies."""
    return LossOutput(
        loss=loss,
        **_preference_stats(cfg.beta, chosen, rejected),
        terms={k: v.detach() for k, v in terms.items()} or None,
    )


def _logratios(cfg: LossConfig, logps: LogProbs) -> tuple[Tensor, Tensor]:
    return _dpo_parts(cfg, logps, logps.compute_dtype)


def _token_counts(cfg: LossConfig, logps: LogProbs, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if logps.n_chosen is None:
        raise ValueError(f"method {cfg.method!r} needs LogProbs.n_chosen")
    (n_rejected,) = logps.require(cfg.method, "n_rejected")
    return logps.n_chosen.to(dtype).clamp(min=1), n_rejected.to(dtype).clamp(min=1)


# --------------------------------------------------------------------------------------------------
# The DPO family (a reference model)
# --------------------------------------------------------------------------------------------------


def hinge_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """SLiC's hinge loss (Zhao et al. 2023, arXiv:2305.10425): L = max(0, 1 - beta d)."""
    chosen, rejected = _logratios(cfg, logps)
    return _out(cfg, torch.relu(1 - cfg.beta * (chosen - rejected)), chosen, rejected)


def ipo_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17) on length-normalized log-ratios, as TRL:

        L = (c / n_w - r / n_l - 1 / (2 beta))^2

    beta is the paper's tau; the target margin is 1 / (2 beta). TRL (with the IPO authors) divides
    each log-ratio by its response's token count; the paper writes sequence log-ratios.
    """
    chosen, rejected = _logratios(cfg, logps)
    n_w, n_l = _token_counts(cfg, logps, chosen.dtype)
    loss = (chosen / n_w - rejected / n_l - 1 / (2 * cfg.beta)) ** 2
    return _out(cfg, loss, chosen, rejected)


def robust_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409, eq. 8), eps the label-flip rate in [0, 0.5):

        L = [-(1 - eps) log s(beta d) + eps log s(-beta d)] / (1 - 2 eps)
    """
    chosen, rejected = _logratios(cfg, logps)
    eps = _eps(cfg)
    if not 0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust, got {eps}")
    logits = cfg.beta * (chosen - rejected)
    loss = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return _out(cfg, loss, chosen, rejected)


def exo_pair_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, eq. 16): KL(q || p) over the pair, eps in (0, 1):

        q_w = s(beta d), q_l = s(-beta d), p = (1 - eps, eps)
        L = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)
    """
    chosen, rejected = _logratios(cfg, logps)
    eps = _eps(cfg)
    if not 0 < eps < 1:
        raise ValueError(f"label_smoothing must be in (0, 1) for exo_pair (the EXO paper uses 1e-3), got {eps}")
    logits = cfg.beta * (chosen - rejected)
    loss = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps)) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - math.log(eps)
    )
    return _out(cfg, loss, chosen, rejected)


def nca_pair_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """NCA (Chen et al. 2024, arXiv:2402.05369), pairwise:

        L = -log s(beta c) - 0.5 log s(-beta c) - 0.5 log s(-beta r)
    """
    chosen, rejected = _logratios(cfg, logps)
    wc, wr = cfg.beta * chosen, cfg.beta * rejected
    loss = -F.logsigmoid(wc) - 0.5 * F.logsigmoid(-wc) - 0.5 * F.logsigmoid(-wr)
    return _out(cfg, loss, chosen, rejected)


def bco_pair_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """BCO on pairs (Jung et al. 2024, arXiv:2404.04656) as TRL 1.16 writes it, without the paper's
    reward shift delta:

        L = -log s(beta c) - log s(-beta r)

    With ``bco_running_mean`` the rewards are shifted by delta, the paper's running mean of the
    rewards (TRL's bco_pair before 1.0, which updated it with each batch's mean reward before the
    loss): ``L = -log s(beta c - delta) - log s(-(beta r - delta))``, delta from
    ``LogProbs.context["bco_delta"]`` (:func:`pair_context`: the mean over the steps so far, this
    one included, of each step's mean of beta c and beta r); without a context, this batch's mean.
    """
    chosen, rejected = _logratios(cfg, logps)
    wc, wr = cfg.beta * chosen, cfg.beta * rejected
    if cfg.bco_running_mean:
        ctx = logps.context
        if ctx is not None and "bco_delta" in ctx:
            delta = ctx["bco_delta"].to(wc.dtype)
        else:
            delta = torch.cat([wc, wr]).mean().detach()
        loss = -F.logsigmoid(wc - delta) - F.logsigmoid(-(wr - delta))
        return _out(cfg, loss, chosen, rejected, bco_delta=delta.expand_as(wc))
    return _out(cfg, -F.logsigmoid(wc) - F.logsigmoid(-wr), chosen, rejected)


def sppo_hard_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """SPPO with hard probabilities (Wu et al. 2024, arXiv:2405.00675, eq. 4.7 with P = 1 and 0):

        L = (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2
    """
    chosen, rejected = _logratios(cfg, logps)
    loss = (chosen - 0.5 / cfg.beta) ** 2 + (rejected + 0.5 / cfg.beta) ** 2
    return _out(cfg, loss, chosen, rejected)


def apo_zero_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7): L = 1 - s(beta c) + s(beta r)."""
    chosen, rejected = _logratios(cfg, logps)
    loss = 1 - torch.sigmoid(cfg.beta * chosen) + torch.sigmoid(cfg.beta * rejected)
    return _out(cfg, loss, chosen, rejected)


def apo_down_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): L = s(beta c) + 1 - s(beta (c - r))."""
    chosen, rejected = _logratios(cfg, logps)
    loss = torch.sigmoid(cfg.beta * chosen) + 1 - torch.sigmoid(cfg.beta * (chosen - rejected))
    return _out(cfg, loss, chosen, rejected)


def discopop_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """DiscoPOP's log-ratio modulated loss (Chan Lu et al. 2024, arXiv:2406.08414, eq. 5):

        x = beta d, m = s(x / tau), L = (1 - m) (-log s(x)) + m exp(-x)
    """
    chosen, rejected = _logratios(cfg, logps)
    tau = cfg.discopop_tau
    x = cfg.beta * (chosen - rejected)
    m = torch.sigmoid(x / tau)
    loss = -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m
    return _out(cfg, loss, chosen, rejected)


def sigmoid_norm_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """DPO on length-normalized log-ratios (TRL's ``sigmoid_norm``): L = -log s(beta (c / n_w - r / n_l))."""
    chosen, rejected = _logratios(cfg, logps)
    n_w, n_l = _token_counts(cfg, logps, chosen.dtype)
    return _out(cfg, -F.logsigmoid(cfg.beta * (chosen / n_w - rejected / n_l)), chosen, rejected)


# --------------------------------------------------------------------------------------------------
# Optimal transport over the batch (AOT, Melnyk et al. 2024, arXiv:2406.05882)
# --------------------------------------------------------------------------------------------------

AOT_CONTEXT_KEYS = ("aot_partner", "aotu_partner", "aotu_partner_rejected")


def _aot_values(x: Tensor, eps: float) -> Tensor:
    return -F.logsigmoid(x) * (1 - eps) - F.logsigmoid(-x) * eps


def _rank(x: Tensor) -> Tensor:
    """Each entry's position in ``torch.sort(x)`` (the permutation torch's sort returns)."""
    order = torch.sort(x, dim=0).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(x), device=x.device)
    return rank


def aot_context(cfg: LossConfig, logps: LogProbs) -> dict[str, Tensor]:
    """The sorted partners of each example in the batch ``logps`` (a whole step), detached.

    aot pairs the k-th smallest policy log-odds ``logp_pi(y_w) - logp_pi(y_l)`` with the k-th
    smallest reference log-odds: ``aot_partner`` is the reference value an example's policy log-odds
    meets. aot_unpaired pairs the k-th smallest chosen log-ratio with the k-th smallest rejected
    log-ratio: ``aotu_partner`` is the rejected value an example's chosen log-ratio meets,
    ``aotu_partner_rejected`` the chosen value its rejected log-ratio meets. Each [B].
    """
    terms = cfg.method.split("+")
    out: dict[str, Tensor] = {}
    if "aot" not in terms and "aot_unpaired" not in terms:
        return out
    with torch.no_grad():
        chosen, rejected = _logratios(cfg, logps)
        if "aot" in terms:
            (policy_rejected,) = logps.require(cfg.method, "policy_rejected")
            policy = logps.policy_chosen.to(chosen.dtype) - policy_rejected.to(chosen.dtype)
            (ref_chosen, ref_rejected) = logps.require(cfg.method, "ref_chosen", "ref_rejected")
            ref = ref_chosen.to(chosen.dtype) - ref_rejected.to(chosen.dtype)
            out["aot_partner"] = torch.sort(ref).values[_rank(policy)]
        if "aot_unpaired" in terms:
            out["aotu_partner"] = torch.sort(rejected).values[_rank(chosen)]
            out["aotu_partner_rejected"] = torch.sort(chosen).values[_rank(rejected)]
    return out


def pair_context(cfg: LossConfig, logps: LogProbs, state: dict | None = None) -> tuple[dict[str, Tensor], dict]:
    """The step context of the pair losses of ``cfg.method`` (a method or a combination), from the
    whole step's log-probs ``logps``, and the state after the step.

    aot / aot_unpaired: :func:`aot_context`. bco_pair with ``bco_running_mean``: ``bco_delta`` [B],
    the running mean of the steps' mean rewards with this step's included; ``state`` carries
    ``{"bco_mean": float, "bco_steps": int}`` from step to step (empty at the start).
    """
    state = dict(state or {})
    ctx = aot_context(cfg, logps)
    if "bco_pair" in cfg.method.split("+") and cfg.bco_running_mean:
        with torch.no_grad():
            chosen, rejected = _logratios(cfg, logps)
            step_mean = float(torch.cat([cfg.beta * chosen, cfg.beta * rejected]).double().mean())
        steps = int(state.get("bco_steps", 0)) + 1
        mean = float(state.get("bco_mean", 0.0))
        mean += (step_mean - mean) / steps
        state.update(bco_mean=mean, bco_steps=steps)
        ctx["bco_delta"] = torch.full((logps.batch_size,), mean, dtype=torch.float64)
    return ctx, state


def _context(cfg: LossConfig, logps: LogProbs, key: str) -> dict[str, Tensor]:
    ctx = logps.context
    if ctx is not None and key in ctx:
        return dict(ctx)
    return aot_context(cfg, logps)


def aot_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """AOT, paired (TRL's ``aot``): policy and reference log-odds sorted over the batch, then DPO with
    label smoothing on the sorted differences:

        u = sort(logp_pi(y_w) - logp_pi(y_l)), v = sort(logp_ref(y_w) - logp_ref(y_l))
        L_k = -(1 - eps) log s(beta (u_k - v_k)) - eps log s(-beta (u_k - v_k))

    Example i's loss is L at its rank in u; the batch mean over i is the mean over k.
    """
    chosen, rejected = _logratios(cfg, logps)
    (policy_rejected,) = logps.require(cfg.method, "policy_rejected")
    dtype = chosen.dtype
    policy = logps.policy_chosen.to(dtype) - policy_rejected.to(dtype)
    partner = _context(cfg, logps, "aot_partner")["aot_partner"].to(dtype)
    loss = _aot_values(cfg.beta * (policy - partner), _eps(cfg))
    return _out(cfg, loss, chosen, rejected)


def aot_unpaired_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """AOT, unpaired (TRL's ``aot_unpaired``): chosen and rejected log-ratios sorted separately,

        u = sort(c), v = sort(r), L_k = -(1 - eps) log s(beta (u_k - v_k)) - eps log s(-beta (u_k - v_k))

    Example i's chosen side sits at rank k of u and its rejected side at rank j of v; its loss has
    the gradient of L_k through c_i plus that of L_j through r_i, and the value (L_k + L_j) / 2,
    so that the batch's sum over examples is the sum over k, in value and gradient.
    """
    chosen, rejected = _logratios(cfg, logps)
    ctx = _context(cfg, logps, "aotu_partner")
    eps = _eps(cfg)
    as_chosen = _aot_values(cfg.beta * (chosen - ctx["aotu_partner"].to(chosen.dtype)), eps)
    as_rejected = _aot_values(cfg.beta * (ctx["aotu_partner_rejected"].to(chosen.dtype) - rejected), eps)
    both = as_chosen + as_rejected
    loss = both - 0.5 * both.detach()
    return _out(cfg, loss, chosen, rejected)


# --------------------------------------------------------------------------------------------------
# ORPO (reference-free)
# --------------------------------------------------------------------------------------------------


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (branch at -log 2)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 6-7), as TRL's ORPOTrainer:

        L = NLL(y_w) - beta * log s(log_odds),
        log_odds = (m_w - m_l) - (log(1 - exp(m_w)) - log(1 - exp(m_l))),

    with m = logp_pi(y) / n the mean token log-prob of each answer. The NLL is the mean over the
    step's tokens of the chosen sequences (``token_loss``, reduced over tokens): with ``orpo_nll``
    "sequence" (the default, TRL's and the ORPO authors' code) the prompt's tokens after its first
    and the answer's (``LogProbs.prompt_chosen`` + ``policy_chosen``), with "answer" the answer's
    alone. The odds-ratio term is the mean over pairs (``loss``). No reference model. Rewards are
    beta * m, as TRL logs them.
    """
    n_w, n_l = _token_counts(cfg, logps, logps.compute_dtype)
    (policy_rejected,) = logps.require(cfg.method, "policy_rejected")
    dtype = logps.compute_dtype
    m_w = logps.policy_chosen.to(dtype) / n_w
    m_l = policy_rejected.to(dtype) / n_l
    log_odds = (m_w - m_l) - (log1mexp(m_w) - log1mexp(m_l))
    odds = -cfg.beta * F.logsigmoid(log_odds)
    nll = -logps.policy_chosen.to(dtype)
    n_tokens = logps.n_chosen.detach().to(dtype)
    if cfg.orpo_nll == "sequence":
        prompt, n_prompt = logps.require(cfg.method, "prompt_chosen", "n_prompt")
        nll = nll - prompt.to(dtype)
        n_tokens = n_tokens + n_prompt.detach().to(dtype)
    stats = _preference_stats(cfg.beta, m_w, m_l)
    return LossOutput(
        loss=odds,
        token_loss=nll,
        **stats,
        terms={"loss/odds_ratio": odds.detach(), "log_odds_chosen": log_odds.detach()},
        token_terms={"nll_loss": nll.detach()},
        n_tokens=n_tokens,
    )

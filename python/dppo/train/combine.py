"""Combinations of losses (``--method ipo+sft --loss-weights 1,0.2``) and the DPPO penalties as terms.

A combination's loss is the weighted sum of its terms' losses, each reduced as it is alone (TRL's
DPOTrainer with several ``loss_type`` values and ``loss_weights``): a pair loss's mean over the
step's pairs, the ``sft`` term's mean over the step's chosen tokens (TRL's ``sft`` loss type: the
negative log-likelihood of the chosen answers). In a combination ``minll`` and ``unll`` stand for
their penalty term alone, ``alpha * f(r) * penalty(y_gen)`` (DPPO paper eqs. 5 and 8), so that the
on-policy penalty rides on any pair loss (``ipo+unll``); alone they are DPO plus that term, and
``dpo+unll`` is exactly ``unll``. With alpha = 0 a penalty term is exactly zero, in value and
gradient. ``conll`` does not combine: its penalty sits inside DPO's sigmoid.

Each term's value is logged as ``loss/NAME`` (the pair terms' mean over pairs, the sft term's mean
over tokens).
"""

from __future__ import annotations

from torch import Tensor

from dppo.train.losses import (
    LOSSES,
    LogProbs,
    LossConfig,
    LossOutput,
    _penalty_parts,
    _ygen_sums,
    unlikelihood,
)
from dppo.train.registry import PENALTY_TERMS, parse_weights

__all__ = ["combined_loss", "penalty_term"]


def penalty_term(kind: str, cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """The y_gen term of minll or unll alone: ``alpha * f(r_n) * penalty`` per example, with the
    statistics of that term (r, r_norm, weight, penalty, penalized). ``kind``: "minll" | "unll"."""
    dtype = logps.compute_dtype
    parts = _penalty_parts(cfg, logps, dtype)
    if kind == "unll":
        total, count = _ygen_sums(cfg, logps, dtype, per_token=unlikelihood)
        raw = total / count.clamp(min=1)
    else:
        total, count = _ygen_sums(cfg, logps, dtype)
        raw = total / count.clamp(min=1) if cfg.penalty_norm == "mean" else total
    penalty = parts.mask(raw)
    return LossOutput(loss=cfg.alpha * parts.weight * penalty, **parts.stats(penalty))


def combined_loss(cfg: LossConfig, logps: LogProbs) -> LossOutput:
    """The weighted sum of the terms of ``cfg.method`` (``"A+B[+C]"``), weights ``cfg.loss_weights``
    (default 1 each). Statistics: the first term's rewards, the penalty term's vote and weight, and
    each term's value in ``terms`` / ``token_terms`` as ``loss/NAME``."""
    names = cfg.method.split("+")
    weights = parse_weights(cfg.loss_weights, len(names), cfg.method) if cfg.loss_weights else (1.0,) * len(names)
    loss: Tensor | None = None
    token_loss: Tensor | None = None
    terms: dict[str, Tensor] = {}
    token_terms: dict[str, Tensor] = {}
    stats: dict[str, Tensor] = {}
    n_tokens: Tensor | None = None
    for name, w in zip(names, weights, strict=True):
        if name in PENALTY_TERMS:
            out = penalty_term(name, cfg, logps)
        elif name == "sft":  # TRL's sft loss type: the NLL of the chosen answers, a mean over their tokens
            nll = -logps.policy_chosen.to(logps.compute_dtype)
            token_loss = w * nll if token_loss is None else token_loss + w * nll
            token_terms["loss/sft"] = nll.detach()
            continue
        else:
            out = LOSSES[name].function(cfg, logps)
        loss = w * out.loss if loss is None else loss + w * out.loss
        terms[f"loss/{name}"] = out.loss.detach()
        if out.token_loss is not None:
            token_loss = w * out.token_loss if token_loss is None else token_loss + w * out.token_loss
            n_tokens = out.n_tokens  # orpo's NLL may count the prompt's tokens too (never beside sft then)
        terms.update(out.terms or {})
        token_terms.update(out.token_terms or {})
        for k, v in out.stats().items():
            stats.setdefault(k, v)
    if loss is None:  # sft and penalty-free: no per-pair term
        loss = logps.policy_chosen.new_zeros(logps.batch_size, dtype=logps.compute_dtype)
    if token_loss is not None and n_tokens is None:
        if logps.n_chosen is None:
            raise ValueError(f"method {cfg.method!r} needs LogProbs.n_chosen")
        n_tokens = logps.n_chosen.detach().to(logps.compute_dtype)
    return LossOutput(loss=loss, token_loss=token_loss, terms=terms, token_terms=token_terms or None,
                      n_tokens=n_tokens, **stats)

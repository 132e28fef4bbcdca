"""Exact log-probabilities of the counted tokens of a packed row, without [T, vocab] logits.

For every sequence ``s`` and every counted token ``t`` (a response token)

    log pi(y_t | x, y_<t) = h_{t-1} . w_{y_t} + b_{y_t} - logsumexp_v (h_{t-1} . w_v + b_v)

where ``h_{t-1}`` is the final hidden state at the position *before* ``t`` inside the same sequence
(:func:`dppo.modeling.attention.packed_hidden_states`) and ``w``/``b`` are the rows of the output
projection (``lm_head``). Only the hidden states that predict a counted token are projected, in
chunks of ``chunk_size`` rows; the backward pass recomputes each chunk's logits instead of keeping
them, so the extra memory is ``chunk_size x vocab`` floats in both passes (or, where memory allows,
``keep_probs_bytes`` keeps the [N, V] softmax and saves the recomputation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dppo.modeling.attention import packed_hidden_states
from dppo.modeling.packing import PackedBatch

__all__ = ["SeqLogps", "segment_sums", "OutputProjection", "chunked_target_logps", "logit_transform", "token_logps", "sequence_logps"]


class _ChunkedTargetLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[i, targets[i]], ``chunk`` rows at a time, in fp32 or wider.

    Uses d logp_i / d z_ij = 1[j = y_i] - softmax(z_i)_j. By default it saves only the inputs and the
    [N] log-normalisers, and backward recomputes each chunk's logits z (one more [N, V, H] matmul).
    With ``keep`` it saves the [N, V] softmax instead (fp32): backward then skips the recomputation,
    a third less work in the vocabulary projection, for N x V x 4 bytes (the caller decides when
    that fits).

    Under autocast the projection runs in the autocast dtype (bf16) in *both* passes: the dtype is
    fixed in forward and autocast is switched off inside, so backward recomputes exactly the logits
    forward normalised (backward would otherwise run in fp32, outside autocast).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, keep, scale=1.0, softcap=None):
        n, acc = hidden.shape[0], _acc_dtype(weight)
        compute = _projection_dtype(hidden, weight)
        keep = keep and softcap is None  # the soft-cap's derivative needs the raw logits: recompute
        logps = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        probs = torch.empty((n, weight.shape[0]), dtype=acc, device=hidden.device) if keep else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(compute), None if bias is None else bias.to(compute)
            for s in range(0, n, chunk):
                h = hidden[s : s + chunk].to(compute)
                direct = keep and compute == acc and b is None
                if direct:  # project straight into the kept buffer
                    logits = torch.mm(h, w.t(), out=probs[s : s + chunk])
                else:
                    logits = F.linear(h, w, b).to(acc)
                logits = _transform_logits(logits, scale, softcap)[0]
                lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
                logps[s : s + chunk] = logits.gather(1, targets[s : s + chunk, None])[:, 0] - lse[s : s + chunk]
                if keep:
                    logits.sub_(lse[s : s + chunk, None]).exp_()
                    if not direct:
                        probs[s : s + chunk] = logits
        if keep:
            ctx.save_for_backward(hidden, weight, bias, targets, lse, probs)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.compute, ctx.keep, ctx.scale, ctx.softcap = chunk, compute, keep, scale, softcap
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse, *kept = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk, acc, compute = ctx.chunk, _acc_dtype(weight), ctx.compute
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulate across chunks in fp32: summing bf16 partial products would lose precision.
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(compute), None if bias is None else bias.to(compute)
            for s in range(0, hidden.shape[0], chunk):
                h, g = hidden[s : s + chunk].to(compute), grad_logps[s : s + chunk, None].to(acc)
                capped = None
                if ctx.keep:  # overwrite the saved softmax: autograd refuses a second backward through it
                    dlogits = kept[0][s : s + chunk].mul_(-g)  # -g * softmax
                else:
                    dlogits, capped = _transform_logits(F.linear(h, w, b).to(acc), ctx.scale, ctx.softcap)
                    dlogits.sub_(lse[s : s + chunk, None]).exp_().mul_(-g)  # -g * softmax
                dlogits.scatter_add_(1, targets[s : s + chunk, None], g)  # + g * onehot
                if capped is not None:  # d(c tanh(l / c)) / dl = 1 - tanh^2
                    dlogits.mul_(1 - capped.square())
                if ctx.scale != 1.0:
                    dlogits.mul_(ctx.scale)
                if need_b:
                    grad_b += dlogits.sum(0)
                dlogits = dlogits.to(compute)
                if need_h:
                    grad_h[s : s + chunk] = dlogits @ w
                if need_w and compute == acc:
                    grad_w.addmm_(dlogits.T, h)
                elif need_w:
                    grad_w += (dlogits.T @ h).to(acc)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _transform_logits(logits: torch.Tensor, scale: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own logit transform: ``logits * scale``, then ``softcap * tanh(logits / softcap)``
    (Gemma 2); returns the transformed logits and, when capped, ``tanh(logits / softcap)``."""
    if scale != 1.0:
        logits = logits.mul_(scale)
    if softcap is None:
        return logits, None
    t = torch.tanh(logits / softcap)
    return t * softcap, t


def _acc_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 weights (logits are upcast as in transformers), fp64 for fp64."""
    return torch.promote_types(weight.dtype, torch.float32)


def _projection_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the vocabulary projection: autocast's where it is on (for fp32 weights), else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and weight.dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return weight.dtype


def chunked_target_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    keep_probs_bytes: int = 0,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """``log_softmax(T(hidden @ weight.T + bias), -1)[i, targets[i]]`` without a [N, V] tensor, where
    ``T(z) = softcap * tanh(z * scale / softcap)`` (or ``z * scale`` without a soft-cap): the logit
    transforms of Gemma 2 (soft-capping), Cohere (``logit_scale``) and Granite (``1 / logits_scaling``).

    Args:
        hidden: [N, H] hidden states that predict the targets.
        weight: [V, H] output projection; bias: [V] or None.
        targets: [N] int64 token ids.
        chunk_size: rows projected at once; peak extra memory is about ``chunk_size x V`` fp32 in
            forward and backward alike.
        keep_probs_bytes: when grad is on and the [N, V] fp32 softmax takes at most this many
            bytes, keep it for backward instead of recomputing the logits (faster; 0: never).

    Returns:
        [N] fp32 log-probabilities (fp64 for fp64 inputs), differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    keep = torch.is_grad_enabled() and hidden.shape[0] * weight.shape[0] * 4 <= keep_probs_bytes
    return _ChunkedTargetLogps.apply(hidden, weight, bias, targets, chunk_size, keep, float(scale),
                                     None if softcap is None else float(softcap))


@dataclass(frozen=True)
class OutputProjection:
    """The LM head as the log-probs need it: ``logits = T(hidden @ weight.T + bias)`` with ``T`` the
    model's logit transform (``scale``, then ``softcap``; see :func:`chunked_target_logps`)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float = 1.0
    softcap: float | None = None


def logit_transform(config: Any) -> tuple[float, float | None]:
    """(scale, softcap) of a model's logits, from its config (the text config of a multimodal one)."""
    config = getattr(config, "text_config", None) or config
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    cap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(cap) if cap else None)


def _output_projection(model: torch.nn.Module) -> OutputProjection:
    """``lm_head`` weight and bias (the embedding matrix itself when tied, so both get gradients),
    with the model's logit transform."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise NotImplementedError(f"output layer {type(head).__name__} is not a torch.nn.Linear")
    scale, cap = logit_transform(model.config)
    return OutputProjection(head.weight, head.bias, scale, cap)


def token_logps(
    model: torch.nn.Module, batch: PackedBatch, chunk_size: int = 1024, kernel: str = "auto", keep_probs_bytes: int = 0
) -> torch.Tensor:
    """log pi(y_t | y_<t) of every counted token of a packed row: [N] fp32, in ``target_pos`` order.

    Differentiable w.r.t. the model's parameters when grad is enabled.
    """
    hidden = packed_hidden_states(model, batch, kernel=kernel)
    head = _output_projection(model)
    predictors = hidden.index_select(0, batch.target_pos - 1)  # never crosses a boundary: see PackedBatch
    targets = batch.input_ids.index_select(0, batch.target_pos)
    return chunked_target_logps(predictors, head.weight, head.bias, targets, chunk_size, keep_probs_bytes,
                                head.scale, head.softcap)


@dataclass(frozen=True)
class SeqLogps:
    """Per-sequence and per-token log-probabilities of the counted tokens.

    Attributes:
        sums: [S] fp32, sum over each sequence's counted tokens of log pi(y_t | x, y_<t).
        counts: [S] int64, counted tokens per sequence.
        token_logps: [N] fp32, one entry per counted token, sequence by sequence, in token order.
        token_seq: [N] int64, the sequence of each entry of ``token_logps``.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    token_logps: torch.Tensor
    token_seq: torch.Tensor

    def means(self) -> torch.Tensor:
        """[S] mean log-probability per counted token (0 for a sequence without counted tokens)."""
        return self.sums / self.counts.clamp(min=1)

    def tokens_of(self, seq: int) -> torch.Tensor:
        """[n_seq] per-token log-probabilities of one sequence."""
        return self.token_logps[self.token_seq == seq]

    def select(self, seqs: Sequence[int]) -> SeqLogps:
        """The sequences ``seqs`` (distinct indices), renumbered ``0 .. len(seqs) - 1`` in that order.

        E.g. with rows laid out as ``[chosen_0, rejected_0, ygen_0, chosen_1, ...]``,
        ``out.select(range(2, 3 * B, 3))`` gives the y_gen token log-probs and their example index.
        """
        device = self.sums.device
        index = torch.as_tensor(list(seqs), dtype=torch.long, device=device)
        renumber = torch.full_like(self.counts, -1)
        renumber[index] = torch.arange(index.numel(), device=device)
        token_seq = renumber[self.token_seq]
        keep = token_seq >= 0
        order = torch.argsort(token_seq[keep], stable=True)
        return SeqLogps(
            sums=self.sums[index],
            counts=self.counts[index],
            token_logps=self.token_logps[keep][order],
            token_seq=token_seq[keep][order],
        )


def segment_sums(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """[n] sums of ``values`` by ``index``, accumulated in float64 and rounded once to ``values``' dtype
    (a sum of hundreds of fp32 log-probs of ~-5 each loses ~1e-5 in float32)."""
    total = torch.zeros(n, dtype=torch.float64, device=values.device)
    return total.index_add(0, index, values.double()).to(values.dtype)


def sequence_logps(
    model: torch.nn.Module, batch: PackedBatch, chunk_size: int = 1024, kernel: str = "auto", keep_probs_bytes: int = 0
) -> SeqLogps:
    """Sums (and token-level values) of log pi(y_t | x, y_<t) over each sequence's counted tokens.

    ``keep_probs_bytes``: see :func:`chunked_target_logps` (a speed/memory trade, same values)."""
    logps = token_logps(model, batch, chunk_size=chunk_size, kernel=kernel, keep_probs_bytes=keep_probs_bytes)
    sums = segment_sums(logps, batch.target_seq, batch.num_seqs)
    counts = torch.bincount(batch.target_seq, minlength=batch.num_seqs)
    return SeqLogps(sums=sums, counts=counts, token_logps=logps, token_seq=batch.target_seq)

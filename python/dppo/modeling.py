"""Exact log-probabilities of packed sequences under a Hugging Face causal LM.

Several sequences (each a prompt followed by a response) are laid end to end in one row with no
padding. For every sequence ``s`` and every counted token ``t`` (a response token) we need

    log pi(y_t | x, y_<t) = h_{t-1} . w_{y_t} + b_{y_t} - logsumexp_v (h_{t-1} . w_v + b_v)

where ``h_{t-1}`` is the final hidden state at the position *before* ``t`` inside the same sequence
and ``w``/``b`` are the rows of the output projection (``lm_head``). Two things make this cheap:

* **Packed attention.** A registered attention function (``PACKED_ATTN``) keeps the sequences of a
  row apart: ``torch.nn.attention.varlen.varlen_attn`` on CUDA in bf16/fp16, one causal SDPA call
  per sequence elsewhere (13x faster than SDPA with a dense block-causal mask on the CPU, measured).
  Restarting ``position_ids`` alone does not keep them apart in transformers 5.24 (the model's
  default ``use_cache=True`` disables its packed-sequence detection), so the boundaries travel as
  the ``cu_seq_lens_q`` / ``max_length_q`` keyword arguments that transformers forwards to every
  attention call.
* **No [T, vocab] logits.** Only the hidden states that predict a counted token are projected, in
  chunks of ``chunk_size`` rows; the backward pass recomputes each chunk's logits instead of keeping
  them, so the extra memory is ``chunk_size x vocab`` floats in both passes (or, where memory allows,
  ``keep_probs_bytes`` keeps the [N, V] softmax and saves the recomputation).

Typical use::

    model = load_model("Qwen/Qwen2.5-0.5B-Instruct")          # bf16 on CUDA, fp32 on CPU
    batch = PackedBatch.from_sequences([(prompt, chosen), (prompt, rejected)]).to(model.device)
    out = sequence_logps(model, batch)                         # out.sums: [2], differentiable
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PACKED_ATTN",
    "KERNELS",
    "PackedBatch",
    "SeqLogps",
    "register_packed_attention",
    "use_packed_attention",
    "packed_attention_forward",
    "packed_hidden_states",
    "chunked_target_logps",
    "token_logps",
    "sequence_logps",
    "sequence_logps_rows",
    "packed_nll",
    "load_model",
    "pad_rows",
    "TESTED_MODEL_TYPES",
    "check_packed_forward",
    "enable_activation_checkpointing",
    "OutputProjection",
    "logit_transform",
]

TESTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3_text", "phi3", "olmo2")
"""Decoder families whose packed log-probs, training step and generation are tested against
transformers' own (tests/test_families.py). Other causal LMs are checked at start by
:func:`check_packed_forward`."""

PACKED_ATTN = "dppo_packed"
"""Name under which the packed attention is registered in transformers' ``AttentionInterface``."""

KERNELS = ("auto", "varlen", "sdpa_loop", "dense")
"""Attention kernels for packed rows. ``auto``: ``varlen`` where it applies (CUDA, bf16/fp16, no
dropout, head dim <= 256), else ``sdpa_loop``. ``dense`` (SDPA with a [T, T] block-causal mask) is
kept as an independent reference for tests."""

Tokens = Sequence[int] | np.ndarray | torch.Tensor


# --------------------------------------------------------------------------------------------------
# Packed batch
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedBatch:
    """Sequences laid end to end in one row, and the tokens whose log-probability counts.

    Token ``input_ids[t]`` at a position ``t`` in ``target_pos`` is predicted from position ``t - 1``,
    which always lies in the same sequence (a counted token is never the first of its sequence).

    Attributes:
        input_ids: [T] int64, all sequences concatenated.
        position_ids: [T] int64, restarting at 0 for each sequence.
        cu_seqlens: [S + 1] int32, sequence ``s`` occupies ``cu_seqlens[s]:cu_seqlens[s + 1]``.
        max_seqlen: length of the longest sequence (a Python int, so kernels need no device sync).
        target_pos: [N] int64, ascending positions of the counted tokens.
        target_seq: [N] int64, the sequence each counted token belongs to (non-decreasing).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    target_pos: torch.Tensor
    target_seq: torch.Tensor

    @classmethod
    def from_sequences(cls, seqs: Sequence[tuple[Tokens, Tokens]]) -> PackedBatch:
        """Pack ``(prompt_ids, response_ids)`` pairs; the response tokens are the counted ones.

        Every prompt needs at least one token (the first response token is predicted from the last
        prompt token). A response may be empty: its sequence then counts no token.
        """
        pieces = []
        for i, (prompt, response) in enumerate(seqs):
            prompt, response = _as_ids(prompt), _as_ids(response)
            if len(prompt) == 0:
                raise ValueError(f"sequence {i}: the prompt is empty, nothing predicts the first response token")
            mask = np.zeros(len(prompt) + len(response), dtype=bool)
            mask[len(prompt) :] = True
            pieces.append((np.concatenate([prompt, response]), mask))
        return cls.from_token_masks(pieces)

    @classmethod
    def from_token_masks(cls, seqs: Sequence[tuple[Tokens, Sequence[bool] | np.ndarray]]) -> PackedBatch:
        """Pack ``(token_ids, counted)`` pairs, ``counted[t]`` saying whether token ``t`` counts.

        The general form, e.g. for multi-turn SFT where every assistant turn counts. ``counted[0]``
        must be false: nothing inside the sequence predicts its first token.
        """
        if len(seqs) == 0:
            raise ValueError("no sequences to pack")
        ids, masks = [], []
        for i, (tokens, counted) in enumerate(seqs):
            tokens, counted = _as_ids(tokens), np.asarray(counted, dtype=bool).reshape(-1)
            if len(tokens) == 0:
                raise ValueError(f"sequence {i} is empty")
            if counted.shape != tokens.shape:
                raise ValueError(f"sequence {i}: {len(tokens)} tokens but {len(counted)} mask entries")
            if counted[0]:
                raise ValueError(f"sequence {i}: its first token cannot count, nothing predicts it")
            ids.append(tokens)
            masks.append(counted)
        lengths = np.array([len(t) for t in ids], dtype=np.int64)
        cu = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu[1:])
        positions = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1], lengths)
        target_pos = np.flatnonzero(np.concatenate(masks))
        target_seq = np.searchsorted(cu, target_pos, side="right") - 1
        return cls(
            input_ids=torch.from_numpy(np.concatenate(ids)),
            position_ids=torch.from_numpy(positions),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            max_seqlen=int(lengths.max()),
            target_pos=torch.from_numpy(target_pos.astype(np.int64)),
            target_seq=torch.from_numpy(target_seq.astype(np.int64)),
        )

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def target_mask(self) -> torch.Tensor:
        """[T] bool, true at the counted tokens."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool, device=self.input_ids.device)
        return mask.index_fill_(0, self.target_pos, True)

    @property
    def labels(self) -> torch.Tensor:
        """[T] int64 in the Hugging Face convention: the token where it counts, -100 elsewhere."""
        return torch.where(self.target_mask, self.input_ids, torch.full_like(self.input_ids, -100))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return PackedBatch(
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens),
            max_seqlen=self.max_seqlen,
            target_pos=move(self.target_pos),
            target_seq=move(self.target_seq),
        )


def _as_ids(tokens: Tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------------
# Attention over packed rows, registered with transformers
# --------------------------------------------------------------------------------------------------

# Set while `packed_hidden_states` runs the model: the attention gets the sequence boundaries from
# `cu_seq_lens_q`, so the [T, T] mask transformers would otherwise build is skipped.
_IN_PACKED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("dppo_in_packed_forward", default=False)


def _packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Mask factory for ``PACKED_ATTN``: none inside a packed forward, the SDPA one otherwise."""
    from transformers.masking_utils import sdpa_mask

    if _IN_PACKED_FORWARD.get():
        return None
    return sdpa_mask(*args, **kwargs)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``AttentionInterface`` (transformers calls it once per layer).

    Args:
        query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] (after RoPE, before GQA expansion).
        kwargs: ``cu_seq_lens_q`` ([S + 1] int32) and ``max_length_q`` mark a packed row;
            ``packed_kernel`` picks one of ``KERNELS``. Without ``cu_seq_lens_q`` this is plain SDPA
            with the usual mask, so ``generate`` and ordinary forwards behave as under ``"sdpa"``.

    Returns:
        ([1, T, Hq, D] attention output, None), the layout transformers' attention functions return.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        if _IN_PACKED_FORWARD.get():
            raise RuntimeError("packed forward but the model did not pass `cu_seq_lens_q` to its attention")
        if kwargs.get("softcap") is not None:  # SDPA takes no soft-cap (Gemma 2 generating): scores by hand
            return _softcap_masked_attention(module, query, key, value, attention_mask, dropout, scaling,
                                             kwargs["softcap"], sliding_window), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cu_k = kwargs.get("cu_seq_lens_k")
    if query.shape[0] != 1 or key.shape[2] != query.shape[2] or (cu_k is not None and cu_k is not cu):
        raise ValueError("packed attention takes one row of self-attention with identical query/key boundaries")
    softcap = kwargs.get("softcap")
    max_len = kwargs.get("max_length_q")
    max_len = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if sliding_window is not None and sliding_window >= max_len:
        sliding_window = None  # the window covers every sequence: plain causal attention
    n_rep = query.shape[1] // key.shape[1]

    kernel = kwargs.get("packed_kernel", "auto")
    if softcap is not None:
        # SDPA and the flash varlen kernel take no soft-cap: the same per-sequence loop, its scores by hand
        if kernel == "varlen":
            raise NotImplementedError("varlen_attn does not soft-cap attention logits: use --kernel sdpa_loop or auto")
        if kernel == "dense":
            return _dense_attention(query, key, value, cu, scaling, sliding_window, n_rep, dropout, softcap), None
        return _softcap_loop_attention(query, key, value, cu, scaling, sliding_window, n_rep, dropout, softcap), None
    options = _varlen_options(query, scaling, sliding_window) if kernel in ("auto", "varlen") and dropout == 0 else None
    if kernel == "auto":
        kernel = "sdpa_loop" if options is None else "varlen"
    if kernel == "varlen":
        if options is None:
            raise NotImplementedError("varlen_attn does not run this input (CUDA, bf16/fp16, no dropout only)")
        out = _varlen_attention(query, key, value, cu, max_len, options, n_rep)
    elif kernel == "sdpa_loop":
        out = _sdpa_loop_attention(query, key, value, cu, scaling, sliding_window, n_rep, dropout)
    elif kernel == "dense":
        out = _dense_attention(query, key, value, cu, scaling, sliding_window, n_rep, dropout)
    else:
        raise ValueError(f"unknown packed kernel {kernel!r}, expected one of {KERNELS}")
    return out, None


@functools.cache
def _varlen_fn() -> tuple[Any, frozenset[str]] | None:
    """``varlen_attn`` and its parameter names, or None where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_device_ok(query: torch.Tensor) -> bool:
    """Flash varlen kernels run on CUDA in bf16/fp16 with head dims up to 256."""
    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 256


def _varlen_options(query: torch.Tensor, scaling: float, sliding_window: int | None) -> dict[str, Any] | None:
    """Keyword arguments for ``varlen_attn`` on this input, or None where it cannot run it."""
    found = _varlen_fn()
    if found is None or not _varlen_device_ok(query):
        return None
    return _varlen_kwargs(found[1], query.shape[-1], scaling, sliding_window)


def _varlen_kwargs(
    params: frozenset[str], head_dim: int, scaling: float, sliding_window: int | None
) -> dict[str, Any] | None:
    """Map causal attention onto the installed ``varlen_attn`` signature (None if it cannot express it).

    The signature moved between torch releases: early ones take ``is_causal`` (and no ``scale``);
    later ones take ``window_size=(left, right)``, ``(-1, 0)`` meaning causal (compared as a tuple
    in some releases, hence a tuple here); ``enable_gqa`` came last (else KV heads are repeated).
    """
    options: dict[str, Any] = {}
    if "is_causal" in params:
        options["is_causal"] = True
    if sliding_window is not None:
        if "window_size" not in params:
            return None
        # transformers' sliding window keeps `q - k < window` tokens, self included
        options["window_size"] = (sliding_window - 1, 0)
    elif "window_size" in params:
        options["window_size"] = (-1, 0)
    elif "is_causal" not in params:
        return None
    if "scale" in params:
        options["scale"] = scaling
    elif scaling != head_dim**-0.5:
        return None
    if "enable_gqa" in params:
        options["enable_gqa"] = True
    return options


def _varlen_attention(q, k, v, cu, max_len, options, n_rep) -> torch.Tensor:
    """Flash varlen kernel: [1, H, T, D] inputs viewed as [T, H, D], output [1, T, Hq, D]."""
    varlen_attn = _varlen_fn()[0]
    q = q[0].transpose(0, 1).contiguous()
    k = k[0].transpose(0, 1)
    v = v[0].transpose(0, 1)
    if not options.get("enable_gqa"):
        k, v = _repeat_heads(k, n_rep, dim=1), _repeat_heads(v, n_rep, dim=1)
    out = varlen_attn(q, k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, **options)
    return out.unsqueeze(0)


def _sdpa_loop_attention(q, k, v, cu, scaling, sliding_window, n_rep, dropout) -> torch.Tensor:
    """One causal SDPA call per sequence: cost sum_s L_s^2 instead of T^2 for a dense mask."""
    # `split`, not slicing: its backward concatenates the pieces' grads once, where each slice's
    # backward would write into a zero-filled tensor of the whole row.
    lengths = (cu[1:] - cu[:-1]).tolist()
    outs = []
    for qs, ks, vs in zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2), strict=True):
        n = qs.shape[2]
        if sliding_window is not None and n > sliding_window:
            pos = torch.arange(n, device=q.device)
            diff = pos[:, None] - pos[None, :]
            mask = (diff >= 0) & (diff < sliding_window)
            ks, vs = _repeat_heads(ks, n_rep, dim=1), _repeat_heads(vs, n_rep, dim=1)
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout, scale=scaling)
        else:
            out = F.scaled_dot_product_attention(
                qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=n_rep > 1
            )
        outs.append(out)
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def _softcap_loop_attention(q, k, v, cu, scaling, sliding_window, n_rep, dropout, softcap) -> torch.Tensor:
    """Attention whose scores are soft-capped (Gemma 2: ``c * tanh(s / c)`` before the mask and the
    fp32 softmax, as its eager attention does), one sequence at a time."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    outs = []
    for qs, ks, vs in zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2), strict=True):
        n = qs.shape[2]
        ks, vs = _repeat_heads(ks, n_rep, dim=1), _repeat_heads(vs, n_rep, dim=1)
        pos = torch.arange(n, device=q.device)
        diff = pos[:, None] - pos[None, :]
        mask = diff >= 0
        if sliding_window is not None:
            mask &= diff < sliding_window
        outs.append(_capped_scores_attention(qs, ks, vs, mask, scaling, dropout, softcap))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def _capped_scores_attention(q, k, v, mask, scaling, dropout, softcap) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout, training=True)
    return torch.matmul(weights, v)


def _softcap_masked_attention(module, q, k, v, attention_mask, dropout, scaling, softcap, sliding_window) -> torch.Tensor:
    """Soft-capped attention outside packed rows (generation, ordinary forwards), with the mask the
    model built: boolean (True attends) or additive; ``None`` means causal (the last queries of the
    keys) within ``sliding_window``. Output [B, T, Hq, D], as transformers' attention functions return."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_heads(k, n_rep, dim=1), _repeat_heads(v, n_rep, dim=1)
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.tanh(torch.matmul(q, k.transpose(2, 3)) * scaling / softcap) * softcap
    kv, tq = k.shape[2], q.shape[2]
    if attention_mask is None:
        qpos = torch.arange(kv - tq, kv, device=q.device)[:, None]
        diff = qpos - torch.arange(kv, device=q.device)[None, :]
        allowed = diff >= 0
        if sliding_window is not None:
            allowed &= diff < sliding_window
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    else:
        mask = attention_mask[:, :, :, :kv]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout and module.training:
        weights = F.dropout(weights, p=dropout, training=True)
    return torch.matmul(weights, v).transpose(1, 2).contiguous()


def _dense_attention(q, k, v, cu, scaling, sliding_window, n_rep, dropout, softcap=None) -> torch.Tensor:
    """SDPA with a [T, T] block-diagonal causal mask (reference kernel); scores by hand when soft-capped."""
    mask = _block_causal_mask(cu, q.shape[2], sliding_window)
    k, v = _repeat_heads(k, n_rep, dim=1), _repeat_heads(v, n_rep, dim=1)
    if softcap is not None:
        return _capped_scores_attention(q, k, v, mask[None, None], scaling, dropout, softcap).transpose(1, 2).contiguous()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _block_causal_mask(cu: torch.Tensor, total: int, sliding_window: int | None = None) -> torch.Tensor:
    lengths = (cu[1:] - cu[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    pos = torch.arange(total, device=cu.device)
    diff = pos[:, None] - pos[None, :]
    mask = (seq[:, None] == seq[None, :]) & (diff >= 0)
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


def _repeat_heads(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    """Repeat each KV head ``n_rep`` times along ``dim`` (the order transformers' ``repeat_kv`` uses)."""
    return x if n_rep == 1 else torch.repeat_interleave(x, n_rep, dim=dim)


def register_packed_attention() -> None:
    """Register ``PACKED_ATTN`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTN, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTN, _packed_mask)


def use_packed_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch ``model`` (a ``PreTrainedModel``) to the packed attention, in place; returns it."""
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTN)
    if model.config._attn_implementation != PACKED_ATTN:
        raise ValueError(f"{type(model).__name__} cannot switch its attention through AttentionInterface")
    return model


# --------------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------------


def packed_hidden_states(model: torch.nn.Module, batch: PackedBatch, kernel: str = "auto") -> torch.Tensor:
    """Final hidden states of the base model (after its last norm) for a packed row: [T, H]."""
    attn = getattr(model.config, "_attn_implementation", None)
    if attn != PACKED_ATTN:
        raise ValueError(
            f"the model uses attention {attn!r}, which would let packed sequences "
            f"see each other: load it with `load_model` or call `use_packed_attention(model)` first"
        )
    if kernel not in KERNELS:
        raise ValueError(f"unknown packed kernel {kernel!r}, expected one of {KERNELS}")
    token = _IN_PACKED_FORWARD.set(True)
    try:
        out = model.base_model(
            input_ids=batch.input_ids[None],
            position_ids=batch.position_ids[None],
            use_cache=False,  # no KV cache during scoring or training
            cu_seq_lens_q=batch.cu_seqlens,
            cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen,
            max_length_k=batch.max_seqlen,
            packed_kernel=kernel,
        )
    finally:
        _IN_PACKED_FORWARD.reset(token)
    return out.last_hidden_state[0]


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


def sequence_logps(
    model: torch.nn.Module, batch: PackedBatch, chunk_size: int = 1024, kernel: str = "auto", keep_probs_bytes: int = 0
) -> SeqLogps:
    """Sums (and token-level values) of log pi(y_t | x, y_<t) over each sequence's counted tokens.

    ``keep_probs_bytes``: see :func:`chunked_target_logps` (a speed/memory trade, same values)."""
    logps = token_logps(model, batch, chunk_size=chunk_size, kernel=kernel, keep_probs_bytes=keep_probs_bytes)
    sums = torch.zeros(batch.num_seqs, dtype=logps.dtype, device=logps.device).index_add(0, batch.target_seq, logps)
    counts = torch.bincount(batch.target_seq, minlength=batch.num_seqs)
    return SeqLogps(sums=sums, counts=counts, token_logps=logps, token_seq=batch.target_seq)


def sequence_logps_rows(
    model: torch.nn.Module,
    seqs: Sequence[tuple[Tokens, Tokens]],
    max_tokens: int,
    chunk_size: int = 1024,
    kernel: str = "auto",
) -> SeqLogps:
    """``sequence_logps`` of many ``(prompt, response)`` pairs, packed into rows of <= ``max_tokens``.

    Results come back in the order of ``seqs``. Rows run one after another, so activation memory is
    bounded by one row only without grad (e.g. reference log-probs); with grad, every row's graph
    stays alive until backward — call ``backward`` per row to bound it. Rows are formed by the
    engine's best-fit decreasing (``dppo.engine.pack_rows``), the packing the trainer uses.
    """
    from dppo.engine import pack_rows

    device = next(model.parameters()).device
    rows = pack_rows([len(_as_ids(p)) + len(_as_ids(r)) for p, r in seqs], max_tokens) if seqs else []
    parts = [
        sequence_logps(model, PackedBatch.from_sequences([seqs[i] for i in row]).to(device), chunk_size, kernel)
        for row in rows
    ]
    # `placed[k]` is the original index of the k-th sequence of the concatenated rows.
    placed = torch.tensor([i for row in rows for i in row], dtype=torch.long, device=device)
    offsets = np.cumsum([0] + [len(row) for row in rows[:-1]])
    inverse = torch.argsort(placed)
    token_seq = placed[torch.cat([p.token_seq + int(o) for p, o in zip(parts, offsets, strict=True)])]
    order = torch.argsort(token_seq, stable=True)
    return SeqLogps(
        sums=torch.cat([p.sums for p in parts])[inverse],
        counts=torch.cat([p.counts for p in parts])[inverse],
        token_logps=torch.cat([p.token_logps for p in parts])[order],
        token_seq=token_seq[order],
    )


def packed_nll(model: torch.nn.Module, batch: PackedBatch, chunk_size: int = 1024, kernel: str = "auto") -> torch.Tensor:
    """Mean negative log-likelihood over all counted (assistant) tokens of a packed row: scalar."""
    logps = token_logps(model, batch, chunk_size=chunk_size, kernel=kernel)
    if logps.numel() == 0:
        raise ValueError("the batch counts no token")
    return -logps.mean()


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows of unequal lengths as one padded [B, W] int64 batch and its attention mask
    (1 on real tokens), padded on the ``right`` (scoring, prefill) or the ``left`` (``generate``)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        n = len(row)
        at = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, at] = torch.as_tensor(list(row) if not isinstance(row, torch.Tensor) else row, dtype=torch.long)
        mask[i, at] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def check_packed_forward(model: torch.nn.Module, tolerance: float = 5e-2) -> str | None:
    """Refuse a model whose packed forward is not each sequence's own forward (one line).

    Runs two short sequences packed in one row and the second one alone (a few tokens: cheap for
    any size) and compares the second one's final hidden states. A model whose layers carry state
    across the row (a recurrent or state-space block, an attention that ignores the sequence
    boundaries) fails here instead of training on sequences that see each other. Returns None for a
    tested family, else a note naming the model type (checked, not in the tested list).
    """
    from dppo.errors import ConfigError

    config = model.config
    kind = getattr(config, "model_type", type(model).__name__)
    device = next(model.parameters()).device
    vocab = int(getattr(getattr(config, "text_config", None) or config, "vocab_size", 0) or 16)
    first = torch.arange(3, dtype=torch.int64) % vocab + 1
    second = (torch.arange(5, dtype=torch.int64) * 7 + 3) % vocab
    try:
        with torch.no_grad():
            both = PackedBatch.from_sequences([(first[:2], first[2:]), (second[:2], second[2:])]).to(device)
            alone = PackedBatch.from_sequences([(second[:2], second[2:])]).to(device)
            packed = packed_hidden_states(model, both)[first.numel():].float()
            single = packed_hidden_states(model, alone).float()
    except (NotImplementedError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise ConfigError(f"model type {kind!r} ({type(model).__name__}) cannot train with dppo's packed forward: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; tested families: "
                          f"{', '.join(TESTED_MODEL_TYPES)}") from None
    scale = float(single.abs().max()) or 1.0
    err = float((packed - single).abs().max()) / scale
    if not math.isfinite(err) or err > tolerance:
        raise ConfigError(f"model type {kind!r} ({type(model).__name__}): packed sequences see each other (the second "
                          f"of two packed sequences differs from its own forward by {err:.2g} relative); dppo trains "
                          f"on packed rows and cannot train it. Tested families: {', '.join(TESTED_MODEL_TYPES)}")
    if kind in TESTED_MODEL_TYPES:
        return None
    return (f"model type {kind!r} is not among dppo's tested families ({', '.join(TESTED_MODEL_TYPES)}); its packed "
            f"forward matched the plain one on a probe (relative difference {err:.1g})")


def enable_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each decoder layer in the backward pass (transformers' own layer checkpointing,
    non-reentrant ``torch.utils.checkpoint``; it wraps the layers' ``forward``, so FSDP2's hooks stay
    outside). The model stays in eval mode (no dropout): only the layers' own switch is turned on,
    which transformers reads to decide whether to checkpoint. In place; returns the model."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from dppo.errors import ConfigError

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not getattr(model, "supports_gradient_checkpointing", False) or not layers:
        raise ConfigError(f"{type(model).__name__}: transformers offers no layer checkpointing for this model "
                          "(drop --gradient-checkpointing)")
    model.activation_checkpointing_enable({"use_reentrant": False})
    for layer in layers:
        layer.training = True  # the layer's flag alone: its submodules (dropout, attention) stay in eval mode
    return model


def import_peft() -> Any:
    """peft, imported when LoRA is used (a dependency only then)."""
    try:
        import peft
    except ImportError:
        from dppo.errors import ConfigError

        raise ConfigError("LoRA needs the peft package: pip install peft (or pip install 'dppo[lora]')") from None
    return peft


def load_adapter_model(path: Any, dtype: Any, device: Any, attn: str = PACKED_ATTN) -> torch.nn.Module:
    """The model an adapter folder stands for: its base (``base_model_name_or_path``) with the
    adapter merged in (``merge_and_unload``), an ordinary causal LM."""
    from dppo.artifacts import adapter_base, resolve_model

    base = load_model(resolve_model(adapter_base(path)), dtype=dtype, device=device, attn=attn)
    return import_peft().PeftModel.from_pretrained(base, str(path)).merge_and_unload().eval()


def load_model(
    path_or_config: Any,
    dtype: str | torch.dtype = "auto",
    device: torch.device | str | None = None,
    attn: str = PACKED_ATTN,
) -> torch.nn.Module:
    """A causal LM from a checkpoint path / hub id or from a config (random weights).

    Args:
        path_or_config: directory or hub id for ``from_pretrained``, or a ``PretrainedConfig``.
        dtype: ``"auto"`` (bf16 on CUDA, fp32 elsewhere), ``"bf16"``, ``"fp16"``, ``"fp32"`` or a dtype.
        device: defaults to CUDA when available.
        attn: the attention implementation; the packed one by default (it behaves as SDPA outside
            packed calls, so the model also generates). Any transformers name is accepted.

    Returns:
        The model on ``device``, in eval mode (call ``.train()`` to train).
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    from dppo.artifacts import resolve_device, resolve_dtype, torch_dtype

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if isinstance(dtype, str):
        dtype = torch_dtype(resolve_dtype(dtype, device))
    if attn == PACKED_ATTN:
        register_packed_attention()
    if not isinstance(path_or_config, PretrainedConfig):
        from dppo.artifacts import is_adapter_dir

        if is_adapter_dir(path_or_config):  # a LoRA adapter folder: its base with the adapter merged
            return load_adapter_model(path_or_config, dtype=dtype, device=device, attn=attn).to(device).eval()
    try:
        if isinstance(path_or_config, PretrainedConfig):
            # from_config records the attention choice on the config it gets: keep the caller's intact
            model = AutoModelForCausalLM.from_config(copy.deepcopy(path_or_config), dtype=dtype, attn_implementation=attn)
        else:
            model = AutoModelForCausalLM.from_pretrained(path_or_config, dtype=dtype, attn_implementation=attn)
    except ValueError as e:
        if attn != PACKED_ATTN or "attention" not in str(e).lower():
            raise
        from dppo.errors import ConfigError

        kind = getattr(path_or_config, "model_type", None) or str(path_or_config)
        raise ConfigError(f"{kind}: this model's attention cannot be replaced by dppo's packed attention "
                          f"({str(e).strip().splitlines()[0]}); tested families: {', '.join(TESTED_MODEL_TYPES)}") from None
    if model.config._attn_implementation != attn:
        raise ValueError(f"{type(model).__name__} did not accept attention {attn!r}")
    return model.to(device).eval()

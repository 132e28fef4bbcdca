"""Attention over packed rows, registered with transformers' ``AttentionInterface`` as ``PACKED_ATTN``.

The attention keeps the sequences of a row apart: ``torch.nn.attention.varlen.varlen_attn`` on CUDA
in bf16/fp16, one causal SDPA call per sequence elsewhere (13x faster than SDPA with a dense
block-causal mask on the CPU, measured). Restarting ``position_ids`` alone does not keep them apart
(the model's default ``use_cache=True`` disables transformers' packed-sequence detection), so the
boundaries travel as the ``cu_seq_lens_q`` / ``max_length_q`` keyword arguments that transformers
forwards to every attention call (:func:`packed_hidden_states`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F

from dppo.modeling.packing import PackedBatch

__all__ = ["PACKED_ATTN", "KERNELS", "packed_attention_forward", "register_packed_attention", "use_packed_attention",
           "packed_hidden_states"]

PACKED_ATTN = "dppo_packed"
"""Name under which the packed attention is registered in transformers' ``AttentionInterface``."""

KERNELS = ("auto", "varlen", "sdpa_loop", "dense")
"""Attention kernels for packed rows. ``auto``: ``varlen`` where it applies (CUDA, bf16/fp16, no
dropout, head dim <= 256), else ``sdpa_loop``. ``dense`` (SDPA with a [T, T] block-causal mask) is
kept as an independent reference for tests."""

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
    options = None
    if kernel in ("auto", "varlen") and dropout == 0:
        # Under autocast with fp32 weights, RoPE hands over fp32 queries and keys (its cos/sin follow the
        # fp32 residual stream) beside bf16 values: attention runs in autocast's dtype, as SDPA would.
        cast = _autocast_dtype(query)
        cq, ck, cv = (query, key, value) if cast is None else (query.to(cast), key.to(cast), value.to(cast))
        options = _varlen_options(cq, scaling, sliding_window)
        if options is not None:
            query, key, value = cq, ck, cv
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


def _autocast_dtype(query: torch.Tensor) -> torch.dtype | None:
    """Autocast's lower-precision dtype where autocast is on for ``query``'s device, else None."""
    device = query.device.type
    if query.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


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


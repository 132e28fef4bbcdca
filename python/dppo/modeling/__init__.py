"""Causal LMs on packed rows: loading them, their attention, and exact log-probabilities.

Several sequences (each a prompt followed by a response) are laid end to end in one row with no
padding, attend only within themselves, and only the positions that predict a counted (response)
token are projected onto the vocabulary, in chunks:

- :mod:`~dppo.modeling.packing`: :class:`PackedBatch`, one row's layout (which sequences share a row
  is decided by :func:`dppo.data.micro_batches`, the one packing function);
- :mod:`~dppo.modeling.attention`: the packed attention registered with transformers (``PACKED_ATTN``,
  its ``KERNELS``) and the packed forward (:func:`packed_hidden_states`);
- :mod:`~dppo.modeling.logprobs`: :func:`sequence_logps`, :func:`token_logps` and the chunked
  vocabulary projection (:func:`chunked_target_logps`);
- :mod:`~dppo.modeling.loading`: :func:`load_model` (packed attention, bf16 on CUDA, fp32 elsewhere),
  LoRA adapter folders, the packed-forward probe, activation checkpointing.

Typical use::

    model = load_model("Qwen/Qwen2.5-0.5B-Instruct")          # bf16 on CUDA, fp32 on CPU
    batch = PackedBatch.from_sequences([(prompt, chosen), (prompt, rejected)]).to(model.device)
    out = sequence_logps(model, batch)                         # out.sums: [2], differentiable
"""

from __future__ import annotations

from dppo.modeling.attention import (
    KERNELS,
    PACKED_ATTN,
    packed_attention_forward,
    packed_hidden_states,
    register_packed_attention,
    use_packed_attention,
)
from dppo.modeling.loading import (
    TESTED_MODEL_TYPES,
    check_packed_forward,
    check_weight_files,
    enable_activation_checkpointing,
    import_peft,
    load_adapter_model,
    load_model,
)
from dppo.modeling.logprobs import (
    OutputProjection,
    SeqLogps,
    chunked_target_logps,
    logit_transform,
    sequence_logps,
    token_logps,
)
from dppo.modeling.packing import PackedBatch

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
    "load_model",
    "load_adapter_model",
    "import_peft",
    "TESTED_MODEL_TYPES",
    "check_packed_forward",
    "check_weight_files",
    "enable_activation_checkpointing",
    "OutputProjection",
    "logit_transform",
]

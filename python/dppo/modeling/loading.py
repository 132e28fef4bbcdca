"""Loading causal LMs with the packed attention, and the checks a model passes before dppo trains it."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch

from dppo.modeling.attention import PACKED_ATTN, packed_hidden_states, register_packed_attention
from dppo.modeling.packing import PackedBatch

__all__ = ["TESTED_MODEL_TYPES", "load_model", "load_adapter_model", "check_packed_forward",
           "enable_activation_checkpointing", "import_peft", "check_weight_files"]

TESTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3_text", "phi3", "olmo2")
"""Decoder families whose packed log-probs, training step and generation are tested against
transformers' own (tests/test_families.py). Other causal LMs are checked at start by
:func:`check_packed_forward`."""


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
    adapter merged in (``merge_and_unload``), an ordinary causal LM: every weight requires gradients
    again (peft froze the base for the adapter), so full fine-tuning can start from an adapter."""
    from dppo.artifacts import adapter_base, resolve_model

    base = load_model(resolve_model(adapter_base(path)), dtype=dtype, device=device, attn=attn)
    merged = import_peft().PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return merged.requires_grad_(True).eval()


def check_weight_files(folder: str | os.PathLike[str]) -> None:
    """Refuse, in one line naming the file, a model folder whose ``*.safetensors`` headers cannot be
    read (a truncated download, a corrupt copy): only the headers are parsed, not the weights."""
    from safetensors import safe_open

    from dppo.errors import SourceError

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError, or OSError)
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"{path}: not a readable safetensors file ({why})") from None


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

        if Path(path_or_config).is_dir():
            check_weight_files(path_or_config)
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

"""LoRA through peft: low-rank adapters on the policy's linear layers, the base weights frozen.

``--lora-r R`` wraps the loaded policy with ``peft.get_peft_model`` (``LoraConfig(r, lora_alpha,
lora_dropout, target_modules)``; ``all-linear``: every linear layer of the decoder, never the LM
head). peft injects its layers into the Hugging Face model in place, so the trainer's packed forward
runs through the same model object, now with ``W x + (alpha / r) B A x`` in each targeted layer; only
the adapters (and ``--lora-modules-to-save``) require gradients, so the optimizer, the gradient
reduction and the checkpoints hold only them.

The reference: B starts at 0, so the policy before its first update *is* the base model; the
reference pass (cached) runs through it then, with no second copy of the model and nothing to
switch off. A ``--ref`` other than ``--init`` is loaded on its own as without LoRA.

Outputs: ``RUN/adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors`` + the tokenizer:
what ``PeftModel.from_pretrained`` loads, and what ``dppo generate`` / ``dppo eval`` accept as a
model) and, unless ``--no-merge``, ``RUN/model/``: the base with the adapters merged
(``merge_and_unload``), an ordinary Hugging Face model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dppo.errors import ConfigError

__all__ = ["apply_lora", "lora_config", "save_adapter", "merge_adapter", "lora_param_count"]


def _peft() -> Any:
    from dppo.modeling import import_peft

    return import_peft()


def _names(value: str | None) -> list[str] | str | None:
    if value is None:
        return None
    value = value.strip()
    if value == "all-linear":
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


def lora_config(cfg: Any, base: str | None = None) -> Any:
    """The ``peft.LoraConfig`` of a run's options (``base``: the base model's folder, absolute, or hub id)."""
    peft = _peft()
    return peft.LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=_names(cfg.lora_targets),
        modules_to_save=_names(cfg.lora_modules_to_save), bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )


def apply_lora(cfg: Any, model: torch.nn.Module, base: str | None = None) -> Any:
    """Inject the adapters into ``model`` in place (B = 0: the model's function is unchanged); returns
    the ``PeftModel`` around it. The adapters' dropout follows ``--lora-dropout`` even though the model
    stays in eval mode (no other dropout, as without LoRA)."""
    peft = _peft()
    if base is not None:  # what peft records as the adapter's base: the model's name_or_path (as given, maybe relative)
        model.name_or_path = base
    try:
        wrapped = peft.get_peft_model(model, lora_config(cfg, base))
    except ValueError as e:  # e.g. a target that matches no module
        raise ConfigError(f"--lora-targets {cfg.lora_targets!r}: {str(e).strip().splitlines()[0]}") from None
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for d in dropouts.values():
                d.train(cfg.lora_dropout > 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ConfigError(f"--lora-targets {cfg.lora_targets!r} left nothing to train")
    return wrapped


def save_adapter(wrapped: Any, out: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """``wrapped``'s adapter into ``out`` (peft's own format); ``state``: the full state dict to take
    it from (gathered from FSDP2 shards), else the model's own."""
    wrapped.save_pretrained(str(out), state_dict=state, safe_serialization=True)


def merge_adapter(adapter_dir: Path, out: Path, dtype: torch.dtype, tok_dir: Path) -> None:
    """``out``: the adapter's base with the adapter merged (``merge_and_unload``), saved in ``dtype``
    with the tokenizer; the base is loaded on the CPU from ``base_model_name_or_path``."""
    from dppo.artifacts import atomic_folder, copy_tokenizer_files
    from dppo.modeling import PACKED_ATTN, load_adapter_model

    model = load_adapter_model(adapter_dir, dtype="fp32", device="cpu", attn=PACKED_ATTN).to(dtype)
    with atomic_folder(out) as work:
        model.save_pretrained(work, safe_serialization=True)
        copy_tokenizer_files(tok_dir, work)


def lora_param_count(config: Any, r: int, targets: str = "all-linear") -> int:
    """Parameters LoRA adds to a model of ``config`` (built on the meta device): r x (in + out) for
    every targeted linear layer of the decoder (the LM head never)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    names = _names(targets)
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if names != "all-linear" and name.rsplit(".", 1)[-1] not in names:
            continue
        total += r * (module.in_features + module.out_features)
    return total

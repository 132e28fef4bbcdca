"""The memory a training run needs on each rank, before it runs: ``dppo train --plan``.

Per rank, for a model (read from its ``config.json``, no weights loaded), a world size, a
parallelism, a precision and a micro-batch's token budget:

- **weights**: fp32 master weights, 4 bytes per parameter; FSDP2 keeps 1/N of them per rank, and
  while a layer computes it gathers that layer's full parameters (in bf16 on CUDA), plus the
  root's (embedding, final norm, output projection) for the whole forward;
- **gradients**: fp32, as the weights (sharded under FSDP2; DDP reduces in place, buckets as views);
- **optimizer state**: AdamW's two moments (8 bytes per parameter), RMSprop's one (4), SGD none;
- **activations**: what autograd keeps for a micro-batch's backward, per token and decoder layer
  ``38 x hidden + 16 x intermediate`` bytes in fp32 (``22 x hidden + 9 x intermediate`` under bf16
  autocast: norm inputs and outputs, q/k/v and the attention output, the MLP's four intermediate
  tensors), plus the vocabulary projection: the kept softmax of the counted tokens
  (``--keep-probs-mb``) and one chunk of logits, or two chunks of logits (``--chunk-size``), and
  ``16 x hidden`` bytes per token around it (the final norm, the hidden states and their gradient).
  With activation checkpointing the layers keep only their fp32 inputs, and the layer being
  recomputed holds its activations plus its backward's buffers (``38 x hidden + 27 x
  intermediate`` bytes per token in fp32, ``22 x hidden + 15 x intermediate`` in bf16).

The fp32 coefficients were fitted to the peak resident memory of dppo's packed forward and
backward on the CPU (four shapes, 4,096 tokens, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
freed tensors leave the resident set; ``benchmarks/activation_fit.py``); the bf16 ones are their
16-bit share, not a GPU measurement. ``tests/test_memory.py`` checks the plan against what a tiny model takes on the CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dppo.errors import ConfigError

__all__ = ["MemoryPlan", "plan_memory", "param_counts", "print_plan", "token_budget", "activation_bytes_per_token",
           "ACT_FP32", "ACT_BF16"]

ACT_FP32 = (38, 16)  # bytes per token and layer, per unit of (hidden, intermediate), fp32
ACT_BF16 = (22, 9)  # the same under bf16 autocast
RECOMPUTE_FP32 = (38, 27)  # the layer being recomputed under checkpointing, with its backward's buffers
RECOMPUTE_BF16 = (22, 15)
HEAD_HIDDEN = 16  # bytes per token and unit of hidden around the vocabulary projection
COUNTED_FRACTION = 0.75  # the share of a packed row's tokens that are response tokens (projected)
_OPTIMIZER_BYTES = {"adamw": 8, "rmsprop": 4, "sgd": 0}


@dataclass(frozen=True)
class ModelShape:
    params: int  # every parameter once (tied tensors once)
    root_params: int  # outside the decoder layers: embedding, final norm, output projection
    layer_params: int  # one decoder layer
    layers: int
    hidden: int
    intermediate: int
    vocab: int


def param_counts(config: Any) -> ModelShape:
    """Parameter counts of a causal LM built from ``config`` on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    layers = model.base_model.layers
    layer = sum(p.numel() for p in layers[0].parameters())
    c = config
    return ModelShape(params=total, root_params=total - layer * len(layers), layer_params=layer, layers=len(layers),
                      hidden=c.hidden_size, intermediate=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
                      vocab=c.vocab_size)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank, by what holds them."""

    world: int
    parallel: str
    precision: str
    tokens: int
    rows: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def table(self) -> list[tuple[str, str]]:
        return [(k, _gib(v)) for k, v in self.rows.items()] + [("total per rank", _gib(self.total))]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _gib(n: float) -> str:
    """Bytes in GiB, or MiB / KiB below one GiB / MiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n / 2**10:,.1f} KiB"


def _layer_bytes_per_token(hidden: int, intermediate: int, precision: str) -> int:
    """What autograd keeps per token in one decoder layer (the fitted coefficients above)."""
    a, b = ACT_BF16 if precision == "bf16" else ACT_FP32
    return a * hidden + b * intermediate


def activation_bytes(shape: ModelShape, tokens: int, precision: str, chunk_size: int = 1024,
                     keep_probs_bytes: int = 1 << 30, checkpointing: bool = False) -> int:
    """Activation memory of one micro-batch of ``tokens`` tokens (see the module docstring).

    With activation checkpointing each layer keeps only its input (the fp32 residual stream) and
    one layer at a time recomputes its activations in the backward pass, after the vocabulary
    projection's backward has freed its buffers: the peak is the layers' inputs plus the larger of
    the two."""
    layer = tokens * _layer_bytes_per_token(shape.hidden, shape.intermediate, precision)
    counted = int(tokens * COUNTED_FRACTION)
    kept = counted * shape.vocab * 4
    chunk = min(chunk_size, counted) * shape.vocab * 4
    head = (kept + chunk if kept <= keep_probs_bytes else 2 * chunk) + tokens * shape.hidden * HEAD_HIDDEN
    if checkpointing:
        ra, rb = RECOMPUTE_BF16 if precision == "bf16" else RECOMPUTE_FP32
        recompute = tokens * (ra * shape.hidden + rb * shape.intermediate)
        return int(tokens * shape.layers * shape.hidden * 4 + max(recompute, head))
    return int(layer * shape.layers + head)


def plan_memory(shape: ModelShape, *, world: int = 1, parallel: str = "none", precision: str = "fp32",
                tokens: int = 16384, optimizer: str = "adamw", chunk_size: int = 1024,
                keep_probs_bytes: int = 1 << 30, checkpointing: bool = False, lora_params: int = 0,
                base_bytes: int = 4) -> MemoryPlan:
    """The :class:`MemoryPlan` of a run (see the module docstring)."""
    shard = world if parallel == "fsdp" else 1
    if lora_params:  # LoRA: the base frozen (no gradients, no optimizer state), the adapters trained in fp32
        base = "bf16" if base_bytes == 2 else "fp32"
        rows = {
            f"base weights (frozen, {base})": int(shape.params * base_bytes / shard),
            "adapter weights (fp32)": int(lora_params * 4 / shard),
            "gradients (fp32, adapters)": int(lora_params * 4 / shard),
            f"optimizer state ({optimizer})": int(lora_params * _OPTIMIZER_BYTES[optimizer] / shard),
        }
    else:
        weights = shape.params * 4 / shard
        rows = {
            "weights (fp32)": int(weights),
            "gradients (fp32)": int(weights),
            f"optimizer state ({optimizer})": int(shape.params * _OPTIMIZER_BYTES[optimizer] / shard),
        }
    if parallel == "fsdp" and world > 1:
        gathered = 2 if precision == "bf16" else 4
        # the root's parameters for the whole forward, and two layers at a time (one prefetched)
        rows["gathered parameters (fsdp)"] = int((shape.root_params + 2 * shape.layer_params) * gathered)
    what = f"activations ({tokens:,} tokens{', checkpointed' if checkpointing else ''})"
    rows[what] = activation_bytes(shape, tokens, precision, chunk_size, keep_probs_bytes, checkpointing)
    return MemoryPlan(world=world, parallel=parallel, precision=precision, tokens=tokens, rows=rows)


def _config_of(init: str) -> Any:
    from transformers import AutoConfig

    path = Path(init).expanduser()
    if (path / "model" / "config.json").is_file():
        path = path / "model"
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path))
    from dppo.artifacts import hub_file

    found = hub_file(str(init), "config.json", what="model")
    if found is None:
        raise ConfigError(f"{init}: no config.json")
    return AutoConfig.from_pretrained(str(found.parent))


def print_plan(cfg: Any, console: Any = None, world: int | None = None) -> MemoryPlan:
    """``dppo train --plan``: the plan of ``cfg`` on ``world`` ranks (default: the world torchrun
    gives it, ``WORLD_SIZE``, else 1), printed as a table, then as one JSON line on stdout; nothing
    is trained."""
    from rich.console import Console
    from rich.table import Table
    from dppo.console import esc, print_table

    console = console or Console()
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    parallel = cfg.parallel if cfg.parallel != "auto" else ("fsdp" if world > 1 else "none")
    import torch

    from dppo.train.precision import training_precision

    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    precision = training_precision(cfg.dtype, "cuda" if cuda else "cpu")
    config = _config_of(cfg.init)
    shape = param_counts(config)
    tokens = cfg.max_tokens_per_batch or 16384
    lora = 0
    if cfg.lora_r:
        from dppo.train.lora import lora_param_count

        lora = lora_param_count(config, cfg.lora_r, cfg.lora_targets)
    plan = plan_memory(shape, world=world, parallel=parallel, precision=precision, tokens=tokens,
                       optimizer=cfg.optimizer, chunk_size=cfg.chunk_size, keep_probs_bytes=cfg.keep_probs_mb << 20,
                       checkpointing=cfg.gradient_checkpointing, lora_params=lora,
                       base_bytes=2 if cfg.lora_r and precision == "bf16" else 4)
    t = Table(title=esc(f"memory per rank: {cfg.init} ({_count(shape.params)} parameters), {world} rank(s), "
                    f"{parallel}, {precision}"), title_justify="left")
    t.add_column("what")
    t.add_column("per rank", justify="right")
    for what, size in plan.table():
        t.add_row(what, size)
    print_table(console, t)
    if not cfg.max_tokens_per_batch:
        console.print("activations at 16,384 tokens per micro-batch: pass --max-tokens-per-batch to plan another budget")
    print(json.dumps({"plan": {**plan.rows, "total": plan.total, "world": world, "parallel": parallel,
                                       "precision": precision, "tokens": tokens}}), flush=True)
    return plan


# -------------------------------------------------------------------------------------------------
# The default token budget of a micro-batch, from the same activation estimate
# -------------------------------------------------------------------------------------------------

_BUDGET_MIN, _BUDGET_MAX, _BUDGET_CPU_FRACTION, _BUDGET_GPU_FRACTION = 2048, 65536, 0.25, 0.6


def activation_bytes_per_token(model: Any, precision: str) -> int:
    """Activation memory per token of a forward + backward pass through ``model``'s decoder layers
    (the per-layer term of :func:`activation_bytes`)."""
    c = model.config
    inter = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    return int(c.num_hidden_layers * _layer_bytes_per_token(c.hidden_size, inter, precision))


def token_budget(model: Any, device: Any, precision: str) -> int:
    """The default ``--max-tokens-per-batch``: the tokens whose activations fit in the memory left.

    On CUDA: 60% of the free memory after the weights, less the gradients and AdamW's two moments
    still to come (3 fp32 copies of the parameters); on the CPU: 25% of the available RAM. Divided
    by :func:`activation_bytes_per_token`, clamped to [2048, 65536], rounded down to a multiple of 256.
    """
    import torch

    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        spare = _BUDGET_GPU_FRACTION * (free - 3 * params)
    else:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 8 << 30
        spare = _BUDGET_CPU_FRACTION * (available - 3 * params)
    tokens = int(spare // max(1, activation_bytes_per_token(model, precision)))
    return max(_BUDGET_MIN, min(_BUDGET_MAX, tokens)) // 256 * 256

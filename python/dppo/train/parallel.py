"""Training on N ranks with PyTorch's own engines: FSDP2 (``fully_shard``) or DDP, and one plan of
micro-batches that every rank can compute alone.

**The rule of the global batch.** An optimizer step's ``batch_size x grad_accum`` examples are the
same whatever the number of ranks. They are dealt to the ranks balanced by their tokens
(:func:`dppo.distributed.split_by_cost`); each rank groups its share into micro-batches under the
token budget (:func:`dppo.data.micro_batches`); each example's term is weighted by its share of the
*step's* loss (the registry's reduction over all the step's examples, not the rank's), and the
loss a rank backpropagates is multiplied by N because DDP and FSDP average gradients over ranks.
The update is then the one a single process makes, up to the order of float sums.

Every rank runs the same number of micro-batches (FSDP gathers each layer's parameters in every
forward, a collective): a rank with fewer gets empty ones, a real example at weight 0. Everything
here is a pure function of the step's examples, so the ranks agree without talking.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dppo.data import micro_batches
from dppo.distributed import Dist, split_by_cost
from dppo.errors import ConfigError

__all__ = ["PARALLEL", "resolve_parallel", "rank_micro_batches", "wrap", "grad_sync", "full_state_dict", "decoder_layers"]

PARALLEL = ("auto", "none", "ddp", "fsdp")
"""``auto``: FSDP2 with several ranks, none in one process (a single torchrun rank may ask for
fsdp or ddp explicitly: the same engine on one device, e.g. to measure its overhead)."""


def resolve_parallel(name: str, d: Dist, launched: bool) -> str:
    if name not in PARALLEL:
        raise ConfigError(f"--parallel must be one of {'|'.join(PARALLEL)}, got {name!r}")
    if name == "auto":
        return "fsdp" if d.active else "none"
    if name in ("ddp", "fsdp") and not launched:
        raise ConfigError(f"--parallel {name} needs a launcher: `torchrun --nproc-per-node N -m dppo train ...` or "
                          "`dppo train --nproc-per-node N ...`; one process without one trains as --parallel none")
    if name == "none" and d.active:
        raise ConfigError("--parallel none with several ranks would train N separate models: use fsdp or ddp")
    return name


def rank_micro_batches(costs: np.ndarray, budget: int, max_items: int, d: Dist) -> list[np.ndarray | None]:
    """This rank's micro-batches of a step, as positions into the step's examples (``costs[i]``:
    the tokens of example i); ``None`` is an empty micro-batch that keeps the ranks in step."""
    shares = split_by_cost(costs, d.world)
    plans = [[share[pos] for pos in micro_batches(costs[share], budget, max_items)] for share in shares]
    rounds = max(1, max(len(p) for p in plans))
    mine: list[np.ndarray | None] = list(plans[d.rank])
    return mine + [None] * (rounds - len(mine))


def decoder_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face causal LM (FSDP2 shards each on its own)."""
    base = getattr(lm, "base_model", lm)
    layers = getattr(base, "layers", None) or getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(lm).__name__}: no `layers` in its base model to shard with FSDP2")
    return list(layers)


def wrap(module: torch.nn.Module, lm: torch.nn.Module, kind: str, device: torch.device, precision: str) -> torch.nn.Module:
    """``module`` (whose forward runs ``lm``) made data-parallel: FSDP2 per decoder layer plus the
    root, with bf16 compute, fp32 master weights and fp32 gradient reduction on CUDA; or DDP; or as is."""
    if kind == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if (
            precision == "bf16" and device.type == "cuda") else MixedPrecisionPolicy()
        for layer in decoder_layers(lm):
            fully_shard(layer, mp_policy=mp)
        # the root's inputs hold no floating-point tensor (the step's inputs, example ids, the token
        # counts it adds to): casting them would copy every dataclass among them, the counts included
        fully_shard(module, mp_policy=dataclasses.replace(mp, cast_forward_inputs=False))
        return module
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    return module


@contextlib.contextmanager
def grad_sync(module: torch.nn.Module, kind: str, sync: bool) -> Iterator[None]:
    """Reduce gradients across ranks only on a step's last micro-batch (they accumulate locally before)."""
    if kind == "ddp" and not sync:
        with module.no_sync():
            yield
        return
    if kind == "fsdp":
        module.set_requires_gradient_sync(sync)
    yield


def reshard(module: torch.nn.Module, kind: str) -> None:
    """Put FSDP2's sharded parameters back in place after a no-grad forward.

    FSDP2 keeps the root's parameters gathered after a forward (backward would gather them again),
    but a no-grad pass (the reference log-probs, an evaluation) has no backward to reshard them:
    until then ``named_parameters()`` would give the gathered copies, not the sharded ones the
    optimizer and the checkpoint hold.
    """
    if kind != "fsdp":
        return
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP (FSDP2 wraps in place)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


def full_state_dict(module: torch.nn.Module, kind: str) -> dict[str, Any]:
    """The full (unsharded) state dict on the CPU, on every rank (a collective under FSDP)."""
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(module).state_dict().items()}


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global 2-norm of the gradients (sharded DTensors included)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

"""The precision rule of training, in one place: which arithmetic a run uses for a ``--dtype`` on a device.

``bf16`` (asked for, or ``auto`` on CUDA) keeps fp32 master weights and runs the matmuls under bf16
autocast: at lr 1e-6 an update is ~1e-4 of a weight, below bf16's resolution, so bf16 weights would
not train at all. Everything else (``fp32``, ``fp16``, ``auto`` off CUDA) trains in fp32. The
reference cache is keyed by this precision, so the trainer, ``dppo curriculum`` and the demo, which
all decide it here, read each other's cached values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

__all__ = ["training_precision", "autocast_for"]


def training_precision(dtype: str, device: Any) -> str:
    """``"bf16"`` or ``"fp32"``: the precision a run with ``--dtype dtype`` trains in on ``device``
    (a torch device or its name)."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return "bf16" if dtype == "bf16" or (dtype == "auto" and kind == "cuda") else "fp32"


def autocast_for(precision: str, device: Any) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of the context the forwards of a ``precision`` run go under: bf16 autocast or nothing."""
    import torch

    if precision != "bf16":
        return contextlib.nullcontext
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return partial(torch.autocast, kind, dtype=torch.bfloat16)

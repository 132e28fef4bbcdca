"""Many processes, on PyTorch's own engine: torchrun launches, ``torch.distributed`` connects.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment) :func:`setup`
joins the process group (NCCL on CUDA, gloo on the CPU) and gives each rank one device; without
it nothing changes: one process, :data:`SINGLE`. The helpers below are what the stages need on top
of ``torch.distributed``: split work across ranks balanced by cost, gather small Python objects,
and let rank 0 alone write. :func:`launch` starts N local processes with torch's own elastic
launcher (``dppo train --nproc-per-node N``), and a rank that dies makes the whole job fail with a
line naming it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dppo.errors import ConfigError

__all__ = ["Dist", "SINGLE", "launched", "world_size", "setup", "teardown", "barrier", "all_gather_objects", "broadcast_object", "on_main",
           "all_reduce_sum", "all_reduce_max", "split_by_cost", "launch"]

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()
"""One process, no process group."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"${name} must be an integer, got {os.environ.get(name)!r}") from None


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher that sets the same variables),
    as one rank of a job of any size (one rank included)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def world_size() -> int:
    """The job's number of ranks (1 outside a launcher)."""
    return _env_int("WORLD_SIZE", 1) if launched() else 1


def setup(device: str | None = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Dist, Any]:
    """Join the job's process group when launched by torchrun; returns this rank's ``Dist`` and device.

    One device per local rank: ``cuda:LOCAL_RANK`` with NCCL when CUDA is used, the CPU with gloo
    otherwise (``device="cpu"`` forces the CPU). More local ranks than GPUs, or a rank that cannot
    join the group within ``timeout_s``, is a one-line error naming the rank.
    """
    import torch
    import torch.distributed as dist

    from dppo.artifacts import resolve_device

    if not launched():
        return SINGLE, resolve_device(device)
    # under torchrun, one rank included: a process group (FSDP2 and DCP need one even of size 1)
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world)
    use_cuda = device not in ("cpu",) and torch.cuda.is_available()
    if device not in (None, "auto", "cpu", "cuda") and not str(device).startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda under torchrun, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"rank {rank}: --device {device} but no CUDA device is available here")
    if use_cuda:
        if local_world > torch.cuda.device_count():
            raise ConfigError(
                f"rank {rank}: {local_world} ranks on this node but {torch.cuda.device_count()} GPU(s): "
                "use --nproc-per-node at most the number of GPUs (one GPU per rank)"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        try:
            kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
            if use_cuda:
                kwargs["device_id"] = dev
            dist.init_process_group(**kwargs)
            # Leave the group before the interpreter's teardown: a gloo/NCCL group still alive when the
            # process exits can abort it ("terminate called without an active exception", SIGABRT)
            # after the work is done. The group itself lasts for the process: a curriculum trains,
            # generates and trains again in it.
            atexit.register(teardown)
        except Exception as e:  # a rendezvous that does not complete, an unreachable master
            from dppo.artifacts import first_line

            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise ConfigError(f"rank {rank}: could not join the process group at {where} within {timeout_s:g} s "
                              f"({type(e).__name__}: {first_line(e)})") from None
    return Dist(rank=rank, world=world, local_rank=local, backend=backend), dev


def teardown(d: Dist | None = None) -> None:
    """Leave the process group (after the last collective); ``setup`` registers it to run at exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # at exit: nothing left to report it to
            dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def all_gather_objects(d: Dist, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable, small: statistics, indices, short results)."""
    if not d.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(d: Dist, obj: Any, src: int = 0) -> Any:
    """``src``'s ``obj`` on every rank."""
    if not d.active:
        return obj
    import torch.distributed as dist

    box = [obj if d.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(d: Dist, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on rank 0 alone (files it writes, checks it makes), its result on every
    rank; an error it raises is raised on every rank, so no rank waits for a rank that failed."""
    result: tuple[str, Any] = ("ok", None)
    if d.main:
        try:
            result = ("ok", fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            result = ("error", e)
    status, value = broadcast_object(d, result)
    if status == "error":
        raise value
    return value


def _reduce(d: Dist, values: Sequence[float], op: str) -> list[float]:
    if not d.active:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64)
    if d.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def all_reduce_sum(d: Dist, *values: float) -> list[float]:
    """The sum over ranks of each value (float64)."""
    return _reduce(d, values, "sum")


def all_reduce_max(d: Dist, *values: float) -> list[float]:
    """The maximum over ranks of each value."""
    return _reduce(d, values, "max")


def split_by_cost(costs: Sequence[float] | np.ndarray, world: int) -> list[np.ndarray]:
    """Positions ``0..len(costs)-1`` dealt to ``world`` ranks so that their total costs balance:
    costliest first, each to the rank with the least so far (ties to the lower rank). Deterministic,
    so every rank computes every rank's share without talking. Each share is ascending."""
    costs = np.asarray(costs, dtype=np.float64).reshape(-1)
    load = np.zeros(world)
    shares: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = int(np.argmin(load))
        shares[r].append(i)
        load[r] += costs[i]
    return [np.array(sorted(s), dtype=np.int64) for s in shares]


# ------------------------------------------------------------------------------------------------
# Launching N local processes with torch's elastic launcher
# ------------------------------------------------------------------------------------------------


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m dppo ARGV`` in ``nproc`` processes on this machine through
    ``torch.distributed.run`` (what ``torchrun --standalone --nproc-per-node N -m dppo ...`` does).

    Returns 0 on success. A failed rank ends the job (torch's launcher stops the others) and is
    reported as one line naming it and its exit code, as :class:`~dppo.errors.ConfigError`.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc}")
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "dppo", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        parts = []
        for rank, failure in sorted(e.failures.items()):
            code = failure.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            parts.append(f"rank {rank} ({how})")
        raise ConfigError(f"the job failed: {', '.join(parts)}; the other ranks were stopped. Its log is above; "
                          "rerun with --resume to continue from the last checkpoint") from None
    return 0

"""Crash tests' harness: the dppo command line in a separate process that kills itself with SIGKILL at
a chosen point (while writing a checkpoint, a generation part, a judge's verdict), so that the tests
can check that nothing is lost and that ``--resume`` ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CLI = "import sys\nfrom dppo.cli.main import app\napp(sys.argv[1:])\n"


def dies_after(target: str, nth: int, rank: int | None = None, prelude: str = "") -> str:
    """Source of a script that runs the dppo command line with ``target`` (``"package.module:name"``)
    wrapped: right after its ``nth`` call in this process returns (or raises), before the caller sees the result,
    the process kills itself with SIGKILL (under torchrun: only on rank ``rank`` when it is given).
    ``prelude`` runs first (e.g. registers a judge whose module ``target`` names)."""
    module, name = target.split(":")
    here = "True" if rank is None else f"os.environ.get('RANK') == '{int(rank)}'"
    return (
        "import os, signal\n"
        f"{prelude}\n"
        f"import {module} as _mod\n"
        f"_orig, _calls = _mod.{name}, []\n"
        "def _then_die(*args, **kwargs):\n"
        "    try:\n"
        "        return _orig(*args, **kwargs)\n"
        "    finally:\n"
        "        _calls.append(1)\n"
        f"        if len(_calls) == {int(nth)} and {here}:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        f"_mod.{name} = _then_die\n" + CLI
    )


def run_cli(args: Sequence[str], code: str = CLI, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -c code ARGS`` with one thread (``env`` adds variables); output captured as text."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=full, capture_output=True, text=True,
                          timeout=timeout)


# -- torchrun on this machine: gloo on loopback, one thread per rank ---------------------------------
TORCHRUN_TIMEOUT = 300


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, script: Path | None = None, rdzv: bool = False,
             **env: str) -> subprocess.CompletedProcess:
    """``--standalone``, or with ``rdzv`` the multi-node form (a c10d rendezvous at an endpoint) on one node."""
    target = [str(script)] if script is not None else ["-m", "dppo"]
    launch = (["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "t"]
              if rdzv else ["--standalone"])
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc-per-node", str(nproc), *target, *args]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)


def one_process(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dppo", *args], env=_env(), capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)

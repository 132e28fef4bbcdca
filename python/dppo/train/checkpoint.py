"""Atomic, verifiable checkpoints: everything an exact resume needs.

``RUN/checkpoints/step_N/`` holds

    model.safetensors   the policy's parameters (fp32 master weights, tied tensors stored once)
    optimizer.pt        the optimizer's state_dict
    rng.pt              the random number generators: torch (CPU and CUDA), numpy, python
    state.json          written last: step, data position, learning-rate schedule position, and the
                        size and CRC-32 of every file above

A checkpoint is assembled in a hidden sibling ``.step_N.partial-PID/`` and renamed into place after
every file is on disk (fsync), so a run killed at any moment leaves either a complete ``step_N`` or
none; leftovers of a dead process are removed by the next run. Loading verifies sizes and checksums
first: a damaged checkpoint raises :class:`CheckpointError` naming the file, never a half-loaded model.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dppo.artifacts import normal_permissions, temp_sibling
from dppo.errors import ConfigError

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "read_state", "latest_checkpoint", "list_checkpoints", "remove_stale",
]

FORMAT = "dppo-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_PARTIAL = re.compile(r"^\.(?:step_\d+|deleting-step_\d+)\.partial-(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete or damaged (a user error: the CLI prints one line)."""


# -- helpers -----------------------------------------------------------------------------------------


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(int, np_state[2:4]), float(np_state[4])],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- listing -----------------------------------------------------------------------------------------


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step_N`` folders) of a run, by step."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_stale(run_dir: str | os.PathLike[str]) -> None:
    """Remove working folders left by a killed process (never those of a live one)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = _PARTIAL.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


# -- save / load -------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Write ``RUN/checkpoints/step_{step}`` atomically; then keep only the ``keep_last`` newest (0: all).

    ``state`` is any JSON-able dict (the trainer's data position, schedule, ...); ``step`` is added.
    """
    from safetensors.torch import save_model

    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step}"
    work = temp_sibling(final, "partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    save_model(model, str(work / "model.safetensors"))
    torch.save(optimizer.state_dict(), work / "optimizer.pt")
    torch.save(_rng_state(), work / "rng.pt")
    normal_permissions(work)
    files = {}
    for name in ("model.safetensors", "optimizer.pt", "rng.pt"):
        path = work / name
        _fsync_file(path)
        files[name] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
    meta = {"format": FORMAT, "version": VERSION, **state, "step": step, "files": files}
    with open(work / "state.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(work)
    if final.exists():  # the same step written again (e.g. a resumed run): replace it
        _remove(final)
    os.rename(work, final)
    _fsync_dir(folder)
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            _remove(old)
    return final


def _remove(path: Path) -> None:
    # Rename first: a crash in the middle of rmtree must not leave a `step_N` that looks complete.
    doomed = temp_sibling(path.with_name(f"deleting-{path.name}"), "partial")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``state.json`` of a checkpoint, after checking that every file is present and intact."""
    path = Path(path)
    hint = f"remove {path} to resume from an earlier checkpoint, or start over without --resume"
    try:
        meta = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: state.json is missing; {hint}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: state.json is unreadable ({e}); {hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"checkpoint {path} is damaged: state.json is not a dppo checkpoint state; {hint}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')}, this dppo reads {VERSION}")
    for name in ("model.safetensors", "optimizer.pt", "rng.pt"):
        want = meta["files"].get(name)
        file = path / name
        if want is None or not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing; {hint}")
        size = file.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {size} bytes, expected {want.get('bytes')}; {hint}")
        if _crc32(file) != want.get("crc32"):
            raise CheckpointError(f"checkpoint {path} is damaged: {name} fails its checksum; {hint}")
    return meta


def load_checkpoint(
    path: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer, verify: bool = True
) -> dict[str, Any]:
    """Restore the model's parameters, the optimizer and the RNG states from a checkpoint.

    ``verify=False`` skips the checksums (for a checkpoint :func:`read_state` already checked).
    Returns the checkpoint's state (``step`` and what the trainer stored).
    """
    from safetensors.torch import load_model

    path = Path(path)
    meta = read_state(path) if verify else json.loads((path / "state.json").read_text())
    device = next(model.parameters()).device
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(f"parameters do not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
        _set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    except CheckpointError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded into this model: {first}") from None
    return meta

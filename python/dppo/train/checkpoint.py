"""Atomic, verifiable checkpoints: everything an exact resume needs, on one rank or many.

``RUN/checkpoints/step_N/`` holds

    model/, optim/      the policy's parameters (fp32 master weights) and the optimizer's state,
                        written by ``torch.distributed.checkpoint``: each rank its own shard, any
                        number of ranks (one included) can read them back
    rng-R.pt            rank R's random number generators: torch (CPU and CUDA), numpy, python
    state.json          written last, by rank 0: step, data position, learning-rate schedule
                        position, the world size, and the size and CRC-32 of every file above

A checkpoint is assembled in a hidden sibling ``.step_N.partial-PID/`` (rank 0's PID) and renamed
into place by rank 0 after every rank's files are on disk (fsync), so a job killed at any moment
leaves either a complete ``step_N`` or none; leftovers of a dead job are removed by the next run.
Loading verifies sizes and checksums first: a damaged checkpoint raises :class:`CheckpointError`
naming the file, never a half-loaded model. With another world size than the one that wrote it,
the parameters and optimizer state are resharded by ``torch.distributed.checkpoint``; the RNG
states of ranks that did not exist start from rank 0's.
"""

from __future__ import annotations

import errno
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
from dppo.distributed import SINGLE, Dist, all_reduce_max, barrier, broadcast_object
from dppo.errors import ConfigError

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "checkpoint_weights", "read_state", "latest_checkpoint", "list_checkpoints", "remove_stale",
]

FORMAT = "dppo-checkpoint"
VERSION = 2  # 2: torch.distributed.checkpoint shards (1: one safetensors file and optimizer.pt)
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


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "state.json"):
        _fsync_file(path)
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
    return files


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int = 0,
    dist: Dist = SINGLE,
    trainable_only: bool = False,
) -> Path:
    """Write ``RUN/checkpoints/step_{step}`` atomically (every rank calls it); then keep only the
    ``keep_last`` newest (0: all).

    ``model`` is the module the optimizer trains (sharded by FSDP2 or not; not a DDP wrapper).
    ``state`` is any JSON-able dict (the trainer's data position, schedule, ...); ``step`` is added.
    ``trainable_only``: store only the parameters that require gradients (LoRA's adapters: the frozen
    base is the run's ``--init`` and is not copied into every checkpoint).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step_{step}"
    pid = broadcast_object(dist, os.getpid())
    work = final.with_name(f".{final.name}.partial-{pid}")
    if dist.main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    barrier(dist)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    model_state = _drop_frozen(model, model_state, trainable_only)
    # -- every rank's files, or none: a failure anywhere (a full disk) leaves the earlier checkpoints as they were
    need = int((_tensor_bytes(model_state) + _tensor_bytes(optim_state)) * 1.01) + (64 << 10)  # + metadata, RNG
    if all_reduce_max(dist, float(_free_bytes(folder) < need))[0] > 0:
        _give_up(work, dist)
        raise _disk_error(None, folder, final, full=True)
    failed: BaseException | None = None
    try:
        dcp.save({"model": model_state}, checkpoint_id=str(work / "model"))
        dcp.save({"optim": optim_state}, checkpoint_id=str(work / "optim"))
        torch.save(_rng_state(), work / f"rng-{dist.rank}.pt")
    except (KeyboardInterrupt, SystemExit):
        raise  # the next run removes the working folder
    except BaseException as e:  # noqa: BLE001 (dcp's CheckpointException is a BaseException)
        failed = e
    if all_reduce_max(dist, float(failed is not None))[0] == 0 and dist.main:
        try:
            _seal(work, final, folder, run_dir, step, state, dist, trainable_only, keep_last)
        except OSError as e:
            failed = e
    if all_reduce_max(dist, float(failed is not None))[0] > 0:
        full = _free_bytes(folder) < (1 << 20)  # measured before the working folder goes
        _give_up(work, dist)
        raise _disk_error(failed, folder, final, full=full) from (failed if isinstance(failed, Exception) else None)
    return final


def _seal(work: Path, final: Path, folder: Path, run_dir: Any, step: int, state: dict[str, Any], dist: Dist,
          trainable_only: bool, keep_last: int) -> None:
    """Rank 0, once every rank's files are on disk: ``state.json`` (sizes and checksums), then the rename
    into place, then the checkpoints beyond ``keep_last`` removed."""
    normal_permissions(work)
    meta = {"format": FORMAT, "version": VERSION, **state, "step": step, "world_size": dist.world,
            "trainable_only": trainable_only, "files": _files(work)}
    with open(work / "state.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(work / "state.json", 0o666 & ~_umask())
    _fsync_dir(work)
    if final.exists():  # the same step written again (e.g. a resumed run): replace it
        _remove(final)
    os.rename(work, final)
    _fsync_dir(folder)
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            _remove(old)


def _tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in a (nested) state dict, this rank's shards of sharded ones."""
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return local.numel() * local.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def _free_bytes(folder: Path) -> int:
    """Bytes this process can still write under ``folder`` (root may use the blocks kept for it)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 1 << 62  # unknown: let the write itself tell
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _give_up(work: Path, dist: Dist) -> None:
    """Remove the working folder of a checkpoint that cannot be completed (every rank waits for it)."""
    if dist.main:
        shutil.rmtree(work, ignore_errors=True)
    barrier(dist)


def _disk_error(error: BaseException | None, folder: Path, final: Path, *, full: bool) -> BaseException:
    """The error a failed checkpoint ends in: one line naming the folder and the cause where it is the
    disk (no space left, read-only, no permission), else the write's own error."""
    found = _os_error(error)
    code = errno.ENOSPC if full else (found.errno if found is not None else None)
    if code is not None:
        why = "no space left on device" if code == errno.ENOSPC else os.strerror(code).lower()
        return OSError(code, f"{why}: checkpoint {final.name} was not written; the earlier checkpoints are intact "
                             f"(free space, then --resume)", str(final))
    if error is None:
        return OSError(errno.EIO, f"another rank could not write its part of checkpoint {final.name}", str(final))
    return error


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind ``error`` (its causes, or a failure dcp collected from a rank), if any."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # dcp's CheckpointException: rank -> (error, trace)
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


def _options(trainable_only: bool, load: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # loading only the trained parameters leaves the frozen ones as --init gave them: not strict
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not (load and trainable_only))


def _drop_frozen(model: torch.nn.Module, state: dict[str, Any], trainable_only: bool) -> dict[str, Any]:
    """``state`` without the frozen parameters (``ignore_frozen_params`` keeps a frozen weight that is
    tied to another, such as a tied LM head: it would put the whole embedding in every checkpoint)."""
    if not trainable_only:
        return state
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    # Rename first: a crash in the middle of rmtree must not leave a `step_N` that looks complete.
    doomed = temp_sibling(path.with_name(f"deleting-{path.name}"), "partial")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``state.json`` of a checkpoint, after checking that every file is present and intact."""
    path = Path(path)
    hint = f"remove {path} to resume from an earlier checkpoint, or start over with --overwrite"
    try:
        meta = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: state.json is missing; {hint}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: state.json is unreadable ({e}); {hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"checkpoint {path} is damaged: state.json is not a dppo checkpoint state; {hint}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')}, this dppo reads {VERSION} "
                              f"(written by another dppo); {hint}")
    for name, want in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing; {hint}")
        size = file.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {size} bytes, expected {want.get('bytes')}; {hint}")
        if _crc32(file) != want.get("crc32"):
            raise CheckpointError(f"checkpoint {path} is damaged: {name} fails its checksum; {hint}")
    for needed in ("model/.metadata", "optim/.metadata", "rng-0.pt"):
        if needed not in meta["files"]:
            raise CheckpointError(f"checkpoint {path} is incomplete: {needed} is missing; {hint}")
    return meta


def checkpoint_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A checkpoint's model parameters as one full state dict (the model's own names, on the CPU),
    whatever number of ranks wrote it: e.g. to export or inspect a checkpoint."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(Path(path) / "model"), f"{tmp}/model.pt")
        state = torch.load(f"{tmp}/model.pt", map_location="cpu", weights_only=True)["model"]
    return {k.removeprefix("lm."): v for k, v in state.items()}


def load_checkpoint(
    path: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer, verify: bool = True,
    dist: Dist = SINGLE, trainable_only: bool = False,
) -> dict[str, Any]:
    """Restore the model's parameters, the optimizer and this rank's RNG states (every rank calls it).

    ``verify=False`` skips the checksums (for a checkpoint :func:`read_state` already checked).
    Returns the checkpoint's state (``step`` and what the trainer stored).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    meta = read_state(path) if verify else json.loads((path / "state.json").read_text())
    if bool(meta.get("trainable_only", False)) != trainable_only:
        kind = "only adapters (LoRA)" if meta.get("trainable_only") else "every weight"
        raise CheckpointError(f"checkpoint {path} holds {kind}; this run trains "
                              f"{'only adapters' if trainable_only else 'every weight'}: resume it with the options it was started with")
    try:
        model_state, optim_state = get_state_dict(model, optimizer, options=_options(trainable_only))
        box = {"model": _drop_frozen(model, model_state, trainable_only)}
        dcp.load(box, checkpoint_id=str(path / "model"))
        optim = {"optim": optim_state}
        dcp.load(optim, checkpoint_id=str(path / "optim"))
        set_state_dict(model, optimizer, model_state_dict=box["model"], optim_state_dict=optim["optim"],
                       options=_options(trainable_only, load=True))
        rng = path / f"rng-{dist.rank}.pt"
        _set_rng_state(torch.load(rng if rng.is_file() else path / "rng-0.pt", map_location="cpu", weights_only=True))
    except CheckpointError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded into this model: {first}") from None
    return meta

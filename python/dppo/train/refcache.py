"""Reference log-probabilities, computed once per (reference model, shards) and cached beside the shards.

DPO and the DPPO objectives need ``logp_ref(y_w | x)``, ``logp_ref(y_l | x)`` and (conll)
``logp_ref(y_gen | x)`` of every training pair. They do not change during training, so instead of
keeping a frozen copy of the model in memory and running it every step (what TRL's DPOTrainer does by
default), one no-grad pass computes them for every example and stores them:

    SHARDS/refcache/<reference fingerprint>-<fp32|bf16>/
        info.json        the reference, its fingerprint, the shards' fingerprint, the precision
        chosen.npy       float32 [examples] (NaN where not computed yet)
        rejected.npy
        ygen.npy

A later run with the same reference weights and the same shards reads them back (any run: DPO,
unll, another seed); a different reference (other weights, so another fingerprint) gets its own
folder, and shards rewritten in place (another fingerprint) invalidate the folder. Entries are
computed only for the examples and columns asked for (``--max-samples``, conll's y_gen) and are never
recomputed once stored, so a resumed run reads exactly the values the interrupted one used.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dppo.artifacts import model_fingerprint, resolve_model, write_atomic, write_json
from dppo.data import Shards
from dppo.distributed import SINGLE, Dist, all_gather_objects, barrier, on_main
from dppo.errors import ConfigError

__all__ = ["RefLogps", "reference_logps", "score_pairs", "COLUMNS"]

COLUMNS = ("chosen", "rejected", "ygen")
_FLUSH_SECONDS = 120.0


@dataclass(frozen=True)
class RefLogps:
    """logp_ref of every example's responses, indexed by example (float32, NaN where not computed).

    Attributes:
        chosen, rejected: [examples] sums of log ref(y_t | x, y_<t) over the response tokens.
        ygen: [examples], or None when y_gen was not asked for.
        cache_dir: where the values are stored.
        hit: every value asked for was already in the cache (no reference forward ran).
    """

    chosen: np.ndarray
    rejected: np.ndarray
    ygen: np.ndarray | None
    cache_dir: Path
    hit: bool

    def batch(self, ids: np.ndarray, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``ref_chosen``, ``ref_rejected`` (and ``ref_ygen``) of examples ``ids`` as [B] tensors."""
        out = {
            "ref_chosen": torch.from_numpy(self.chosen[ids]).to(device),
            "ref_rejected": torch.from_numpy(self.rejected[ids]).to(device),
        }
        if self.ygen is not None:
            out["ref_ygen"] = torch.from_numpy(self.ygen[ids]).to(device)
        return out


def _merge_save(path: Path, array: np.ndarray) -> None:
    """Store ``array``, keeping values another run stored meanwhile (a stored value never changes);
    ``array`` is updated in place to what was stored."""
    with contextlib.suppress(OSError, ValueError):
        stored = np.load(path)
        if stored.shape == array.shape and stored.dtype == array.dtype:
            keep = ~np.isnan(stored)
            array[keep] = stored[keep]
    buf = io.BytesIO()
    np.save(buf, array)
    write_atomic(path, buf.getvalue(), fsync=True)


def _cache_root(shards: Shards, fallback: Path | None) -> Path:
    root = shards.path / "refcache"
    if os.access(shards.path, os.W_OK) and (not root.exists() or os.access(root, os.W_OK)):
        return root
    if fallback is None:
        raise ConfigError(f"{shards.path}: not writable, and no other place for the reference cache was given")
    return fallback


def _open_cache(folder: Path, info: dict[str, Any], n: int, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """The cached columns (NaN-filled where absent); a folder made for other shards is started afresh."""
    old = None
    with contextlib.suppress(OSError, ValueError):
        old = json.loads((folder / "info.json").read_text())
    valid = old is not None and all(old.get(k) == info[k] for k in ("ref_fingerprint", "shards_fingerprint", "precision", "examples"))
    arrays = {}
    for col in columns:
        arr = None
        if valid:
            with contextlib.suppress(OSError, ValueError):
                arr = np.load(folder / f"{col}.npy")
        if arr is None or arr.shape != (n,) or arr.dtype != np.float32:
            arr = np.full(n, np.nan, dtype=np.float32)
        arrays[col] = np.array(arr)  # writable copy
    if not valid:
        folder.mkdir(parents=True, exist_ok=True)
        for col in COLUMNS:
            with contextlib.suppress(FileNotFoundError):
                (folder / f"{col}.npy").unlink()
        write_json(folder / "info.json", info)
    return arrays


def score_pairs(
    model: str | os.PathLike[str],
    shards: Shards | str | os.PathLike[str],
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    need_ygen: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    batch_tokens: int = 16384,
) -> RefLogps:
    """Score the pairs of ``shards`` with ``model`` as the reference: logp(chosen), logp(rejected) (and
    logp(y_gen)) of examples ``indices`` (default: all), summed over response tokens.

    The values are the reference cache a ``dppo train --ref MODEL`` run on these shards with the same
    ``--dtype`` reads (and the reverse), computed for what is missing; the model is loaded only then.
    ``dtype`` decides the precision as training does (:func:`dppo.train.precision.training_precision`).
    """
    from dppo.artifacts import resolve_device
    from dppo.data import open_shards
    from dppo.modeling import load_model
    from dppo.train.precision import autocast_for, training_precision

    if not isinstance(shards, Shards):
        shards = open_shards(shards)
    where = resolve_device(device)
    precision = training_precision(dtype, where)
    ids = np.arange(len(shards)) if indices is None else np.asarray(indices, dtype=np.int64)
    return reference_logps(model, shards, ids, load=lambda: load_model(resolve_model(model), dtype="fp32", device=where),
                           need_ygen=need_ygen, precision=precision, autocast=autocast_for(precision, where),
                           batch_tokens=batch_tokens)


def reference_logps(
    ref: str | os.PathLike[str],
    shards: Shards,
    indices: np.ndarray,
    *,
    load: Callable[[], Any],
    need_ygen: bool,
    precision: str,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    chunk_size: int = 1024,
    kernel: str = "auto",
    batch_tokens: int = 16384,
    fallback_dir: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    dist: Dist = SINGLE,
    lockstep: bool = False,
) -> RefLogps:
    """logp_ref of the responses of examples ``indices`` of ``shards``, from the cache or computed.

    Args:
        ref: the reference model folder (its fingerprint keys the cache).
        shards: pairs shards.
        indices: the examples needed.
        load: returns the reference model (packed attention, no grad needed), or a function from a
            ``PackedBatch`` to its sequences' summed log-probs (a sharded policy's forward); called
            only on a miss, so a cache hit never loads the model.
        need_ygen: also logp_ref(y_gen | x) (conll).
        precision: "fp32" or "bf16": part of the cache key (the values differ).
        autocast: context manager factory the forward runs under (bf16 autocast for "bf16").
        chunk_size, kernel: of the packed forward of a model (``dppo.modeling``).
        batch_tokens: the token budget of a micro-batch of the no-grad pass (:func:`dppo.data.micro_batches`).
        fallback_dir: cache location when the shards folder is not writable.
        on_progress: called with (tokens done, tokens to do), on rank 0.
        dist: under torchrun, the rows are dealt to the ranks; rank 0 gathers the values and writes
            the cache, every rank returns all of them. A cache made by one process serves N ranks
            and the reverse (the values do not depend on who computed them).
        lockstep: every rank runs the same number of rows (a sharded model's forward is a collective).
    """
    n = len(shards)
    columns = ("chosen", "rejected", "ygen") if need_ygen else ("chosen", "rejected")
    if need_ygen and not shards.has_ygen:
        raise ConfigError(f"{shards.path}: the reference log-probs of y_gen are needed but the shards have no y_gen")
    ref_dir = resolve_model(ref)
    info = {
        "ref": os.fspath(ref),
        "ref_fingerprint": model_fingerprint(ref_dir),
        "shards_fingerprint": shards.fingerprint(),
        "precision": precision,
        "examples": n,
    }
    folder = _cache_root(shards, fallback_dir) / f"{info['ref_fingerprint']}-{precision}"
    arrays = on_main(dist, _open_cache, folder, info, n, columns)
    todo = _Missing.of(shards, arrays, indices, columns, batch_tokens)
    if todo.rows:
        score = _scorer(load(), chunk_size, kernel)
        _score_missing(todo, score, shards, arrays, folder, autocast=autocast, on_progress=on_progress, dist=dist,
                       lockstep=lockstep)
    return RefLogps(arrays["chosen"], arrays["rejected"], arrays.get("ygen"), folder, hit=not todo.rows)


@dataclass(frozen=True)
class _Missing:
    """The (example, column) values not in the cache yet, as rows of the no-grad pass: the sequences
    of one example stay in one row, so that its prompt is read once."""

    columns: tuple[str, ...]
    examples: list[int]  # the examples with a missing value
    wanted: dict[int, list[str]]  # example -> its missing columns
    cost: list[int]  # tokens of each example's sequences
    rows: list[list[int]]  # positions into ``examples``, by :func:`dppo.data.micro_batches`

    @classmethod
    def of(cls, shards: Shards, arrays: dict[str, np.ndarray], indices: np.ndarray, columns: Sequence[str],
           batch_tokens: int) -> _Missing:
        from dppo.data import micro_batches

        indices = np.unique(np.asarray(indices, dtype=np.int64))
        wanted: dict[int, list[str]] = {}
        for col in columns:
            for i in indices[np.isnan(arrays[col][indices])].tolist():
                wanted.setdefault(i, []).append(col)
        examples = sorted(wanted)
        lengths = shards.lengths()
        cost = [sum(int(lengths["prompt"][i]) + int(lengths[c][i]) for c in wanted[i]) for i in examples]
        rows = [row.tolist() for row in micro_batches(cost, batch_tokens)]
        return cls(tuple(columns), examples, wanted, cost, rows)

    def sequences(self, shards: Shards, row: list[int]) -> tuple[list, list[tuple[str, int]]]:
        """The row's (prompt, response) sequences and the (column, example) each one fills."""
        seqs, slots = [], []
        for k in row:
            i = self.examples[k]
            ex = shards[i]
            for col in self.wanted[i]:
                seqs.append((ex["prompt_ids"], ex[f"{col}_ids"]))
                slots.append((col, i))
        return seqs, slots


def _scorer(loaded: Any, chunk_size: int, kernel: str) -> Callable[[Any], torch.Tensor]:
    """A packed batch -> its sequences' summed log-probs: through a loaded model, or the given function."""
    if not isinstance(loaded, torch.nn.Module):
        return loaded
    from dppo.modeling import sequence_logps

    device = next(loaded.parameters()).device
    return lambda batch: sequence_logps(loaded, batch.to(device), chunk_size, kernel).sums


def _score_missing(
    todo: _Missing, score: Callable[[Any], torch.Tensor], shards: Shards, arrays: dict[str, np.ndarray], folder: Path, *,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]], on_progress: Callable[[int, int], None] | None,
    dist: Dist, lockstep: bool,
) -> None:
    """Run the missing rows (dealt to the ranks in turn) and store their values in ``arrays`` and the cache.

    Under lockstep every rank runs every round (an empty turn re-runs the first row and keeps nothing).
    One process stores what it has every couple of minutes, so a long pass keeps what it did."""
    from dppo.modeling import PackedBatch

    rows, total, done = todo.rows, sum(todo.cost), 0

    def flush(results: list[tuple[str, int, float]]) -> None:
        for part in all_gather_objects(dist, results):
            for col, i, value in part:
                arrays[col][i] = value
        if dist.main:
            for col in todo.columns:
                _merge_save(folder / f"{col}.npy", arrays[col])

    mine: list[tuple[str, int, float]] = []
    last_flush = time.monotonic()
    with torch.no_grad():
        for k in range(-(-len(rows) // dist.world)):
            at = k * dist.world + dist.rank
            if at >= len(rows) and not lockstep:
                continue
            seqs, slots = todo.sequences(shards, rows[at] if at < len(rows) else rows[0])
            with autocast():
                sums = score(PackedBatch.from_sequences(seqs))
            if at < len(rows):
                mine += [(col, i, float(v)) for (col, i), v in zip(slots, sums.float().cpu().numpy(), strict=True)]
            done += sum(todo.cost[j] for j in rows[min(at, len(rows) - 1)]) * dist.world
            if on_progress is not None and dist.main:
                on_progress(min(done, total), total)
            if not dist.active and time.monotonic() - last_flush > _FLUSH_SECONDS:
                flush(mine)
                mine, last_flush = [], time.monotonic()
    flush(mine)
    barrier(dist)

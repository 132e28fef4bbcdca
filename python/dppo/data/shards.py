"""Reading prepared shards without copying.

``open_shards(DIR)`` memory-maps every shard of a folder written by ``dppo prep`` (format:
``docs/shards.md``) and returns a ``Shards`` object: ``len()``, ``.meta``, and indexing that
gives one example as numpy arrays (views into the mapped files wherever possible):

* SFT: ``input_ids``, ``labels`` (-100 on non-assistant tokens) and ``spans``, the label spans
  ``[start, end)`` in ``input_ids`` (one per assistant turn: one with ``--turns first``, every
  assistant turn of the conversation with ``--turns all``);
* pairs: ``prompt_id``, ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and ``ygen_ids``
  (``None`` without y_gen), plus ``score_chosen`` / ``score_rejected``.

Per-example lengths serve the trainer, and :func:`micro_batches` groups examples into micro-batches
under a token budget: the one packing of dppo (best-fit decreasing, in the Rust engine), used by
training, the reference pass and evaluation alike.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dppo import engine

__all__ = [
    "Shards", "ShardError", "open_shards", "micro_batches",
    "SEG_PROMPT", "SEG_RESPONSE", "SEG_CHOSEN", "SEG_REJECTED", "SEG_YGEN",
]

SEG_PROMPT, SEG_RESPONSE, SEG_CHOSEN, SEG_REJECTED, SEG_YGEN = 0, 1, 2, 3, 4
FLAG_PROMPT_TRUNCATED, FLAG_RESPONSE_TRUNCATED, FLAG_BOUNDARY_RESPLIT, FLAG_EXCHANGES_DROPPED = 1, 2, 4, 8
SHARD_VERSION = 3

_SECTION_DTYPES = {"u64": np.uint64, "u32": np.uint32, "f32": np.float32, "u8": np.uint8}


ShardError = engine.ShardError
"""A shard folder that is missing, incomplete, corrupt or of an older format (the message names the file)."""


@dataclass
class _Shard:
    name: str
    tokens: np.ndarray
    arrays: dict[str, np.ndarray]
    n_examples: int

    def segments(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = int(self.arrays["ex_seg_off"][i]), int(self.arrays["ex_seg_off"][i + 1])
        return self.arrays["seg_kind"][a:b], self.arrays["seg_tok_off"][a:b], self.arrays["seg_len"][a:b]

    def prompt_id(self, i: int) -> str:
        a, b = int(self.arrays["id_off"][i]), int(self.arrays["id_off"][i + 1])
        return bytes(self.arrays["id_bytes"][a:b]).decode("utf-8")


def _map_shard(dir: Path, name: str, verify: bool) -> tuple[_Shard, dict[str, Any]]:
    idx_path = dir / f"{name}.idx"
    info = engine.open_shard_index(str(idx_path), verify)
    header = info["header"]
    idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
    arrays = {
        sec: np.frombuffer(idx, dtype=_SECTION_DTYPES[dtype], count=count, offset=offset)
        for sec, (offset, dtype, count) in info["sections"].items()
    }
    n_tokens = header["n_tokens"]
    tok_path = dir / f"{name}.tok"
    tokens = np.memmap(tok_path, dtype=np.uint32, mode="r") if n_tokens else np.zeros(0, dtype=np.uint32)
    return _Shard(name, tokens, arrays, header["n_examples"]), header


class Shards:
    """All shards of one prepared folder, indexed as one sequence of examples."""

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not self.path.is_dir():
            raise ShardError(f"{self.path}: no such folder (prepare it with `dppo prep`)")
        if not meta_path.is_file():
            raise ShardError(f"{meta_path}: missing; {self.path} is not a complete prepared folder (was `dppo prep` interrupted?)")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ShardError(f"{meta_path}: unreadable ({e})") from None
        if self.meta.get("format") != "dppo-shards":
            raise ShardError(f"{meta_path}: not a dppo shard folder")
        version = self.meta.get("version")
        if version != SHARD_VERSION:
            newer = isinstance(version, int) and version > SHARD_VERSION
            raise ShardError(
                f"{self.path}: written by {'a newer' if newer else 'an older'} dppo (shard format version {version}; "
                f"this dppo reads version {SHARD_VERSION}): "
                + ("upgrade dppo" if newer else "prepare the data again with `dppo prep ... --overwrite`")
            )
        self.kind: str = self.meta["kind"]
        self._shards: list[_Shard] = []
        headers = []
        for s in self.meta["shards"]:
            shard, header = _map_shard(self.path, s["name"], verify)
            if header["n_examples"] != s["examples"]:
                raise ShardError(f"{self.path / (s['name'] + '.idx')}: holds {header['n_examples']} examples, meta.json says {s['examples']}")
            self._shards.append(shard)
            headers.append(header)
        self.has_ygen: bool = bool(self.meta["counts"].get("has_ygen")) if self.kind == "pairs" else False
        self._starts = np.cumsum([0] + [s.n_examples for s in self._shards])

    # -- examples -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[_Shard, int]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} out of range for {n} examples")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._shards[k], i - int(self._starts[k])

    def _parts(self, shard: _Shard, j: int) -> dict[int, np.ndarray]:
        kinds, offs, lens = shard.segments(j)
        return {int(k): shard.tokens[int(o) : int(o) + int(n)] for k, o, n in zip(kinds, offs, lens)}

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, j = self._locate(int(i))
        parts = self._parts(shard, j)
        prompt = parts[SEG_PROMPT]
        row = int(shard.arrays["ex_row"][j])
        if self.kind == "sft":
            kinds, offs, lens = shard.segments(j)
            a, b = int(offs[0]), int(offs[-1]) + int(lens[-1])  # an example's segments are contiguous
            input_ids = shard.tokens[a:b].astype(np.int64)
            labels = np.full(len(input_ids), -100, dtype=np.int64)
            starts = offs.astype(np.int64) - a
            spans = [(int(s), int(s + n)) for k, s, n in zip(kinds, starts, lens) if k == SEG_RESPONSE]
            for s, e in spans:
                labels[s:e] = input_ids[s:e]
            return {"input_ids": input_ids, "labels": labels, "spans": spans, "source_row": row}
        scores = shard.arrays["ex_scores"][2 * j : 2 * j + 2]
        return {
            "prompt_id": shard.prompt_id(j),
            "prompt_ids": prompt,
            "chosen_ids": parts[SEG_CHOSEN],
            "rejected_ids": parts[SEG_REJECTED],
            "ygen_ids": parts.get(SEG_YGEN),
            "score_chosen": float(scores[0]),
            "score_rejected": float(scores[1]),
            "source_row": row,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def lengths(self) -> dict[str, np.ndarray]:
        """Per-example segment lengths (int64), e.g. ``{"prompt": ..., "chosen": ..., ...}``. For a
        whole SFT conversation, ``prompt`` is the sum of its context segments and ``response`` the
        sum of its label spans (the tokens its loss counts)."""
        names = {SEG_PROMPT: "prompt", SEG_RESPONSE: "response", SEG_CHOSEN: "chosen", SEG_REJECTED: "rejected", SEG_YGEN: "ygen"}
        out: dict[str, list[np.ndarray]] = {}
        for shard in self._shards:
            kinds = shard.arrays["seg_kind"]
            lens = shard.arrays["seg_len"].astype(np.int64)
            owner = np.repeat(np.arange(shard.n_examples), np.diff(shard.arrays["ex_seg_off"].astype(np.int64)))
            for code, name in names.items():
                sel = kinds == code
                if sel.any():
                    out.setdefault(name, []).append(np.bincount(owner[sel], weights=lens[sel], minlength=shard.n_examples).astype(np.int64))
        return {k: np.concatenate(v) for k, v in out.items()}

    def spans(self, i: int) -> list[tuple[int, int]]:
        """The label spans ``[start, end)`` of SFT example ``i`` in its ``input_ids``."""
        if self.kind != "sft":
            raise ValueError(f"{self.path}: {self.kind} shards have no label spans (chosen and rejected are whole responses)")
        return self[i]["spans"]

    def fingerprint(self) -> str:
        """16 hex digits identifying the folder's contents: the index headers carry the checksums of
        every token and index byte, so hashing them (and the tokenizer) is enough, and instant."""
        import hashlib

        h = hashlib.blake2b(digest_size=8)
        h.update(json.dumps(self.meta.get("tokenizer", {}), sort_keys=True).encode())
        for s in self.meta["shards"]:
            with open(self.path / f"{s['name']}.idx", "rb") as f:
                h.update(f.read(128))
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"Shards({str(self.path)!r}, kind={self.kind!r}, examples={len(self)}, has_ygen={self.has_ygen})"


def micro_batches(lengths: np.ndarray | list[int], max_tokens: int, max_items: int = 0) -> list[np.ndarray]:
    """Group items into micro-batches of at most ``max_tokens`` tokens and ``max_items`` items (0: any).

    ``lengths[i]`` is the number of tokens item i puts through the model. Best-fit decreasing
    (longest first, each into the fullest micro-batch it still fits), never splitting an item; an
    item longer than ``max_tokens`` gets a micro-batch of its own. Returns positions into
    ``lengths`` (int64, ascending within a micro-batch), micro-batches in the order they were opened.
    """
    sizes = [int(n) for n in np.asarray(lengths, dtype=np.int64).reshape(-1)]
    if not sizes:
        return []
    return [np.asarray(row, dtype=np.int64) for row in engine.pack_rows(sizes, int(max_tokens), int(max_items))]


def open_shards(path: str | os.PathLike[str], *, verify: bool = True) -> Shards:
    """Open a folder written by ``dppo prep`` (checksums verified unless ``verify=False``)."""
    return Shards(path, verify=verify)

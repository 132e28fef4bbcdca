"""Packed rows: several sequences laid end to end in one row with no padding, and the tokens whose
log-probability counts (:class:`PackedBatch`). Which sequences share a row is decided by the one
packing function, :func:`dppo.data.micro_batches`; this module only lays a row out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PackedBatch", "Tokens", "as_ids"]

Tokens = Sequence[int] | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class PackedBatch:
    """Sequences laid end to end in one row, and the tokens whose log-probability counts.

    Token ``input_ids[t]`` at a position ``t`` in ``target_pos`` is predicted from position ``t - 1``,
    which always lies in the same sequence (a counted token is never the first of its sequence).

    Attributes:
        input_ids: [T] int64, all sequences concatenated.
        position_ids: [T] int64, restarting at 0 for each sequence.
        cu_seqlens: [S + 1] int32, sequence ``s`` occupies ``cu_seqlens[s]:cu_seqlens[s + 1]``.
        max_seqlen: length of the longest sequence (a Python int, so kernels need no device sync).
        target_pos: [N] int64, ascending positions of the counted tokens.
        target_seq: [N] int64, the sequence each counted token belongs to (non-decreasing).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    target_pos: torch.Tensor
    target_seq: torch.Tensor

    @classmethod
    def from_sequences(cls, seqs: Sequence[tuple[Tokens, Tokens]]) -> PackedBatch:
        """Pack ``(prompt_ids, response_ids)`` pairs; the response tokens are the counted ones.

        Every prompt needs at least one token (the first response token is predicted from the last
        prompt token). A response may be empty: its sequence then counts no token.
        """
        pieces = []
        for i, (prompt, response) in enumerate(seqs):
            prompt, response = as_ids(prompt), as_ids(response)
            if len(prompt) == 0:
                raise ValueError(f"sequence {i}: the prompt is empty, nothing predicts the first response token")
            mask = np.zeros(len(prompt) + len(response), dtype=bool)
            mask[len(prompt) :] = True
            pieces.append((np.concatenate([prompt, response]), mask))
        return cls.from_token_masks(pieces)

    @classmethod
    def from_token_masks(cls, seqs: Sequence[tuple[Tokens, Sequence[bool] | np.ndarray]]) -> PackedBatch:
        """Pack ``(token_ids, counted)`` pairs, ``counted[t]`` saying whether token ``t`` counts.

        The general form, e.g. for multi-turn SFT where every assistant turn counts. ``counted[0]``
        must be false: nothing inside the sequence predicts its first token.
        """
        if len(seqs) == 0:
            raise ValueError("no sequences to pack")
        ids, masks = [], []
        for i, (tokens, counted) in enumerate(seqs):
            tokens, counted = as_ids(tokens), np.asarray(counted, dtype=bool).reshape(-1)
            if len(tokens) == 0:
                raise ValueError(f"sequence {i} is empty")
            if counted.shape != tokens.shape:
                raise ValueError(f"sequence {i}: {len(tokens)} tokens but {len(counted)} mask entries")
            if counted[0]:
                raise ValueError(f"sequence {i}: its first token cannot count, nothing predicts it")
            ids.append(tokens)
            masks.append(counted)
        lengths = np.array([len(t) for t in ids], dtype=np.int64)
        cu = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu[1:])
        positions = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1], lengths)
        target_pos = np.flatnonzero(np.concatenate(masks))
        target_seq = np.searchsorted(cu, target_pos, side="right") - 1
        return cls(
            input_ids=torch.from_numpy(np.concatenate(ids)),
            position_ids=torch.from_numpy(positions),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            max_seqlen=int(lengths.max()),
            target_pos=torch.from_numpy(target_pos.astype(np.int64)),
            target_seq=torch.from_numpy(target_seq.astype(np.int64)),
        )

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def target_mask(self) -> torch.Tensor:
        """[T] bool, true at the counted tokens."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool, device=self.input_ids.device)
        return mask.index_fill_(0, self.target_pos, True)

    @property
    def labels(self) -> torch.Tensor:
        """[T] int64 in the Hugging Face convention: the token where it counts, -100 elsewhere."""
        return torch.where(self.target_mask, self.input_ids, torch.full_like(self.input_ids, -100))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return PackedBatch(
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens),
            max_seqlen=self.max_seqlen,
            target_pos=move(self.target_pos),
            target_seq=move(self.target_seq),
        )



def as_ids(tokens: Tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


"""Batched autoregressive decoding with a KV cache: the engine behind ``dppo generate``.

``Decoder(model, stop_ids).run(prompts, sampling, batch_size=...)`` yields lists of
``Completion`` as responses finish. Three engines produce the same output:

* ``"dppo"`` (default where the architecture is supported: Qwen2, Qwen3, Llama, Mistral without a
  sliding window). Our own loop over the Hugging Face model's own submodules (embedding, norms,
  projections, MLP, rotary embedding: the weights and the arithmetic stay those of
  ``transformers``); only the attention over the cache and the loop itself are ours:

  - continuous batching over ``batch_size`` slots: a slot whose response ends takes the next
    prompt at once, so the batch stays full and no finished row keeps computing. Prompts go
    longest first; a run of prompts at least half as long as its longest shares one cache of
    capacity "longest prompt + max_new_tokens" (one row per slot, no padding inside);
  - new prompts are prefilled in groups of similar length (right-padded, plain causal attention,
    at most ``prefill_tokens`` per call) straight into their slots; the LM head runs only on each
    row's last position; greedy decoding is the ``argmax`` of fp32 logits, as in ``transformers``;
  - a decode step writes each row's key and value in place at its own position (no
    ``torch.cat`` per step) and reads only the positions in use;
  - on CUDA the decode step of a slot set is captured once as a CUDA graph over the whole cache
    and replayed; when no prompt is left, the last rows move to a slot set half the size each time
    half the slots are idle.

* ``"hf"``: ``model.generate`` on the same longest-first, left-padded batches: any architecture.
* ``"vllm"``: vLLM's offline ``LLM.generate`` on token ids, when vLLM is installed.

Greedy ``"dppo"`` output in fp32 on the CPU is token-identical to ``transformers``' greedy
``generate`` (tests/test_generate.py). Sampling (``temperature > 0``, optional ``top_p``) draws one
uniform number per generated token from a stream seeded by ``(seed, prompt key)``, so a prompt's
sample does not depend on its batch or on a resumed run.

``run(..., samples=K)`` draws K responses per prompt in the same call: sample ``j`` of a prompt
with key ``k`` is the single-sample run of that prompt under key ``sample_key(k, j)``, whatever the
batch, the order or the other prompts. With the ``dppo`` engine the K slots of a prompt admitted
together share one prefill (the prompt is run once and its cache rows copied).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dppo.errors import ConfigError

__all__ = ["ENGINES", "SamplingConfig", "Completion", "Decoder", "supports_fast_decoding", "pad_rows", "sample_key"]

ENGINES = ("auto", "dppo", "hf", "vllm")
"""``auto``: ``dppo`` where the architecture is supported, else ``hf``."""

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows of unequal lengths as one padded [B, W] int64 batch and its attention mask
    (1 on real tokens), padded on the ``right`` (scoring, prefill) or the ``left`` (``generate``)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        n = len(row)
        at = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, at] = torch.as_tensor(list(row) if not isinstance(row, torch.Tensor) else row, dtype=torch.long)
        mask[i, at] = 1
    return ids, mask


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen: ``max_new_tokens`` at most, greedy when ``temperature == 0`` (``top_p``
    and ``seed`` unused), else sampled at ``temperature`` within the ``top_p`` nucleus, each prompt
    from its own stream seeded by ``(seed, prompt)``. The one sampling configuration of dppo
    (``dppo generate`` and ``dppo eval`` carry it inside their ``DecodeConfig``), validated here."""

    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        # ConfigError is a ValueError: the messages name the command-line options
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One generated response.

    Attributes:
        index: position of its prompt in the list given to ``Decoder.run``.
        token_ids: the generated ids, without the stop token.
        finish_reason: ``"stop"`` (a stop token), ``"length"`` (``max_new_tokens``) or
            ``"context"`` (the model's maximum context was reached first).
        stop_token: the stop token that ended it (``finish_reason == "stop"``), else None.
        sample: which of the prompt's ``samples`` responses this is (0 .. K-1).
    """

    index: int
    token_ids: list[int]
    finish_reason: str
    stop_token: int | None = None
    sample: int = 0


def sample_key(key: int, sample: int) -> int:
    """The sampling key of response ``sample`` of a prompt whose key is ``key`` (64 bits): what
    ``Decoder.run(..., samples=K)`` seeds that response's stream with."""
    import hashlib

    data = (int(key) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + int(sample).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def supports_fast_decoding(model: torch.nn.Module) -> str | None:
    """None if the ``dppo`` engine runs ``model``, else the reason it cannot."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "unexpected module layout"
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "sliding-window attention"
    for layer in base.layers:
        if getattr(layer.self_attn, "sliding_window", None) is not None:
            return "sliding-window attention"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return "the output layer is not a torch.nn.Linear"
    return None


def _rope_fn(attn: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The model's own ``apply_rotary_pos_emb`` (same arithmetic as its forward)."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    return fn if fn is not None else _apply_rope


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class _KVCache:
    """Per-layer keys and values ``[slots, kv_heads, capacity, head_dim]``. Slot ``b`` holds its
    sequence at positions ``0 .. length_b - 1`` (no padding inside the cache)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        self.k, self.v = k, v

    @classmethod
    def empty(cls, layers: int, slots: int, heads: int, capacity: int, dim: int, dtype, device) -> _KVCache:
        shape = (slots, heads, capacity, dim)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
        )

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def copy_slots_(self, other: _KVCache, src: torch.Tensor, dst: torch.Tensor, upto: int) -> None:
        """Copy ``other``'s slots ``src`` (positions ``:upto``) into our slots ``dst``."""
        for a, b in zip(self.k + self.v, other.k + other.v, strict=True):
            a[dst, :, :upto] = b[src, :, :upto]


class _Forward:
    """The model's decoder run over our KV cache. Every submodule and its arithmetic is the model's
    own; only attention (reading and writing the cache) is done here."""

    def __init__(self, model: torch.nn.Module) -> None:
        base = model.model
        self.embed, self.layers, self.norm, self.rotary = base.embed_tokens, list(base.layers), base.norm, base.rotary_emb
        self.head = model.get_output_embeddings()
        attn = self.layers[0].self_attn
        cfg = model.config
        self.head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.rope = _rope_fn(attn)
        self.qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")

    def new_cache(self, slots: int, capacity: int, dtype, device) -> _KVCache:
        return _KVCache.empty(len(self.layers), slots, self.kv_heads, capacity, self.head_dim, dtype, device)

    def _qkv(self, i: int, x: torch.Tensor, cos, sin):
        attn = self.layers[i].self_attn
        b, t, _ = x.shape
        shape = (b, t, -1, self.head_dim)
        q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        return attn, q, k, v

    def prefill(self, ids: torch.Tensor, last: torch.Tensor, cache: _KVCache, slots: torch.Tensor) -> torch.Tensor:
        """Prompts ``ids`` [n, w], right-padded, into cache ``slots`` [n]; fp32 logits [n, vocab] at
        each row's last real position ``last`` [n].

        Causal attention alone is exact here: a real token never sees a later position, so the
        padding after it is invisible (padded positions compute garbage that decoding overwrites
        before any query can see it).
        """
        n, w = ids.shape
        positions = torch.arange(w, device=ids.device)[None, :].expand(n, w)
        h = self.embed(ids)
        cos, sin = self.rotary(h, positions)
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            attn, q, k, v = self._qkv(i, x, cos, sin)
            cache.k[i][slots, :, :w] = k
            cache.v[i][slots, :, :w] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=self.n_rep > 1)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(n, w, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = h[torch.arange(n, device=ids.device), last]
        return self.head(self.norm(h[:, None]))[:, 0].float()

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, cache: _KVCache, slots: torch.Tensor | None, read: int, mask) -> torch.Tensor:
        """One token per row: ``tokens`` [n] at cache position ``pos`` [n] of ``slots`` [n] (None:
        every slot, in order). Attention reads positions ``:read`` under ``mask`` [n, 1, 1, read]
        (True = attend; None = all). fp32 logits [n, vocab]."""
        n = tokens.shape[0]
        h = self.embed(tokens[:, None])
        cos, sin = self.rotary(h, pos[:, None])
        rows = torch.arange(n, device=tokens.device) if slots is None else slots
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            attn, q, k, v = self._qkv(i, x, cos, sin)
            kc, vc = cache.k[i], cache.v[i]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            if slots is None:
                keys, values = kc[:, :, :read], vc[:, :, :read]
            else:
                keys, values = kc[slots, :, :read], vc[slots, :, :read]
            if self.n_rep > 1:
                # One query per row: the query heads of a KV group attend as n_rep "positions" of
                # that group (transformers' pack_gqa), so the cache is read once, never repeated.
                out = F.scaled_dot_product_attention(
                    q.reshape(n, self.kv_heads, self.n_rep, self.head_dim), keys, values, attn_mask=mask, scale=self.scaling
                ).reshape(n, -1, 1, self.head_dim)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(n, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.head(self.norm(h))[:, 0].float()


@dataclass
class _Request:
    """One prompt being answered (host side)."""

    index: int
    budget: int  # new tokens allowed before "length" / "context"
    reason_at_budget: str
    uniforms: np.ndarray | None  # one per generated token, sampling only
    tokens: list[int] = field(default_factory=list)


class _Slots:
    """``n`` decoding slots over one KV cache: which request each holds and its cache length.

    ``static`` (CUDA graphs): the decode step always runs every slot over the whole capacity,
    captured once as a CUDA graph; idle slots compute garbage that is never read. Otherwise the
    step runs only the live slots over the positions in use.
    """

    def __init__(self, fwd: _Forward, n: int, capacity: int, dtype, device, static: bool) -> None:
        self.fwd, self.static, self.device = fwd, static, device
        self.cache = fwd.new_cache(n, capacity, dtype, device)
        self.req: list[_Request | None] = [None] * n
        self.length = [0] * n  # tokens in the cache (host mirror of what decode needs)
        self.next_token = [0] * n  # the token each live slot feeds next
        self.graph: _GraphStep | None = None

    @property
    def n(self) -> int:
        return len(self.req)

    def live(self) -> list[int]:
        return [s for s, r in enumerate(self.req) if r is not None]

    def free(self) -> list[int]:
        return [s for s, r in enumerate(self.req) if r is None]

    def step(self) -> tuple[list[int], torch.Tensor]:
        """Decode one token for every live slot: (the live slots, their logits)."""
        live = self.live()
        dev = self.device
        if self.static:
            if self.graph is None:
                self.graph = _GraphStep(self.fwd, self.cache)
            tokens = [self.next_token[s] if self.req[s] is not None else 0 for s in range(self.n)]
            pos = [self.length[s] if self.req[s] is not None else 0 for s in range(self.n)]
            logits = self.graph.run(torch.tensor(tokens), torch.tensor(pos))
            logits = logits[torch.tensor(live, device=dev)] if len(live) < self.n else logits
        else:
            slots = None if len(live) == self.n else torch.tensor(live, device=dev)
            lengths = [self.length[s] for s in live]
            read = max(lengths) + 1
            pos = torch.tensor(lengths, device=dev)
            mask = None
            if min(lengths) + 1 < read:
                mask = (torch.arange(read, device=dev)[None, :] <= pos[:, None])[:, None, None, :]
            tokens = torch.tensor([self.next_token[s] for s in live], device=dev)
            logits = self.fwd.decode(tokens, pos, self.cache, slots, read, mask)
        for s in live:
            self.length[s] += 1
        return live, logits


class _GraphStep:
    """The decode step of a fixed set of slots over the whole cache, as a function of tensors only
    (tokens, positions), so that it has fixed shapes and no host-side branching. On CUDA it is
    captured as a CUDA graph on first use and replayed; elsewhere it runs eagerly (the tests
    compare it with the dynamic step)."""

    def __init__(self, fwd: _Forward, cache: _KVCache) -> None:
        self.fwd, self.cache = fwd, cache
        dev = cache.k[0].device
        self.cuda = dev.type == "cuda"
        self.tokens = torch.zeros(cache.slots, dtype=torch.long, device=dev)
        self.pos = torch.zeros(cache.slots, dtype=torch.long, device=dev)
        self.arange = torch.arange(cache.capacity, device=dev)
        self.graph: Any = None
        self.logits: torch.Tensor | None = None

    def _step(self) -> torch.Tensor:
        mask = (self.arange[None, :] <= self.pos[:, None])[:, None, None, :]
        return self.fwd.decode(self.tokens, self.pos, self.cache, None, self.cache.capacity, mask)

    def run(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens, non_blocking=True)
        self.pos.copy_(pos, non_blocking=True)
        if not self.cuda:
            return self._step()
        if self.graph is None:
            # Warm up on a side stream, then capture. The warm-up writes this step's keys, which
            # the replay below writes again with the same values.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
        self.graph.replay()
        return self.logits


class Decoder:
    """Generate with a causal LM (see the module docstring for the engines).

    Args:
        model: a ``transformers`` causal LM in eval mode (None for ``vllm``).
        stop_ids: token ids that end a response (not included in it).
        engine: one of ``ENGINES``.
        pad_id: id used to pad prompts in a prefill group (any valid id: never attended to).
        prefill_tokens: at most this many tokens (rows x longest row) per prefill call.
        cuda_graphs: capture the decode step as CUDA graphs (default: on CUDA with the ``dppo``
            engine). On the CPU ``True`` runs the same fixed-shape step eagerly (for tests).
        model_path: the model folder, needed by the ``vllm`` engine; ``dtype`` its dtype name.
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        stop_ids: Sequence[int],
        *,
        engine: str = "auto",
        pad_id: int = 0,
        prefill_tokens: int = 32768,
        cuda_graphs: bool | None = None,
        model_path: str | None = None,
        dtype: str = "auto",
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}, expected one of {ENGINES}")
        if engine == "auto":
            engine = "dppo" if model is not None and supports_fast_decoding(model) is None else "hf"
        elif engine == "dppo" and model is not None and (why := supports_fast_decoding(model)) is not None:
            raise ValueError(f"the dppo engine does not support this model: {why}; use engine 'hf'")
        if engine in ("dppo", "hf") and model is None:
            raise ValueError(f"the {engine} engine needs a model")
        self.model, self.engine = model, engine
        self.stop_ids = sorted({int(s) for s in stop_ids})
        self._stop_set = frozenset(self.stop_ids)
        self.pad_id = int(pad_id)
        self.prefill_tokens = int(prefill_tokens)
        self.model_path, self.dtype = model_path, dtype
        self.device = next(model.parameters()).device if model is not None else torch.device("cpu")
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) if model is not None else 0
        if engine == "dppo":
            self._fwd = _Forward(model)
            self._dtype = next(model.parameters()).dtype
        self.cuda_graphs = (self.device.type == "cuda" and engine == "dppo") if cuda_graphs is None else bool(cuda_graphs)
        self._slot_sets: OrderedDict[tuple[int, int], _Slots] = OrderedDict()

    # -- public ----------------------------------------------------------------------------------
    def run(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig = SamplingConfig(),
        *,
        batch_size: int = 32,
        keys: Sequence[int] | None = None,
        on_tokens: Callable[[int], None] | None = None,
        samples: int = 1,
    ) -> Iterator[list[Completion]]:
        """Yield the completions of ``prompts``, ``batch_size`` at a time as they finish.

        Args:
            prompts: token ids of each prompt (chat template already applied).
            sampling: greedy or sampled decoding, and the token budget.
            batch_size: sequences decoded at once (the number of slots).
            keys: per-prompt integers that seed sampling (default: the prompt's position).
            on_tokens: called with the number of tokens generated by each decode step.
            samples: responses per prompt (K). With K > 1, response ``j`` of prompt ``i`` is
                seeded by ``sample_key(keys[i], j)`` and comes back as ``Completion(index=i,
                sample=j)``; its K sequences are decoded side by side in the one call.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        keys = list(range(len(prompts))) if keys is None else [int(k) for k in keys]
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        source = None
        if samples > 1:  # one sequence per (prompt, sample), a prompt's K sequences side by side
            k = samples
            source = [i for i in range(len(prompts)) for _ in range(k)]
            keys = [sample_key(keys[i], j) for i in range(len(prompts)) for j in range(k)]
            prompts = [prompts[i] for i in source]
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        if self.engine == "vllm":
            out = self._run_vllm(prompts, order, sampling, batch_size, keys, on_tokens)
        elif self.engine == "hf":
            out = (self._hf_batch(prompts, order[s : s + batch_size], sampling, on_tokens) for s in range(0, len(order), batch_size))
        else:
            out = self._run_dppo(prompts, order, sampling, batch_size, keys, on_tokens, source)
        if source is None:
            yield from out
            return
        for done in out:
            yield [dataclasses.replace(c, index=c.index // samples, sample=c.index % samples) for c in done]

    # -- the dppo engine ---------------------------------------------------------------------------
    def _budget(self, n: int, sampling: SamplingConfig) -> tuple[int, str]:
        room = self.max_positions - n if self.max_positions else sampling.max_new_tokens
        if room < sampling.max_new_tokens:
            return max(room, 0), "context"
        return sampling.max_new_tokens, "length"

    def _segments(self, prompts, order: list[int], batch_size: int) -> Iterator[list[int]]:
        """Runs of the longest-first order whose prompts are at least half the run's longest, so
        that a slot set's capacity (longest prompt + budget) fits everything in its run."""
        start = 0
        while start < len(order):
            longest = len(prompts[order[start]])
            end = start + 1
            while end < len(order) and (2 * len(prompts[order[end]]) >= longest or end - start < 4 * batch_size):
                end += 1
            yield order[start:end]
            start = end

    @torch.inference_mode()
    def _run_dppo(self, prompts, order, sampling: SamplingConfig, batch_size: int, keys, on_tokens, source=None) -> Iterator[list[Completion]]:
        done: list[Completion] = []
        for i in order:  # no room left in the model's context: nothing to generate
            if self._budget(len(prompts[i]), sampling)[0] == 0:
                done.append(Completion(i, [], "context"))
        order = [i for i in order if self._budget(len(prompts[i]), sampling)[0] > 0]
        for segment in self._segments(prompts, order, batch_size):
            capacity = len(prompts[segment[0]]) + sampling.max_new_tokens
            if self.max_positions:
                capacity = min(capacity, self.max_positions)
            if self.cuda_graphs:
                capacity = -(-capacity // 128) * 128  # so that runs of similar lengths share a graph
            slots = self._slots(min(batch_size, len(segment)), capacity)
            queue = deque(segment)
            refill_at = max(1, slots.n // 8)
            while queue or slots.live():
                free = slots.free()
                if queue and (len(free) >= refill_at or len(free) == slots.n):
                    admit = [queue.popleft() for _ in range(min(len(free), len(queue)))]
                    self._admit(slots, free[: len(admit)], admit, prompts, sampling, keys, done, on_tokens, source)
                if not slots.live():
                    continue
                live, logits = slots.step()
                self._advance(slots, live, logits, sampling, done)
                if on_tokens is not None:
                    on_tokens(len(live))
                if not queue and self.cuda_graphs:
                    slots = self._shrink(slots)
                while len(done) >= batch_size:
                    yield done[:batch_size]
                    done = done[batch_size:]
        if done:
            yield done

    def _admit(self, slots: _Slots, free: list[int], admit: list[int], prompts, sampling, keys, done, on_tokens, source=None) -> None:
        """Prefill ``admit`` (longest first) into the ``free`` slots, in groups of similar length.
        Sequences of one prompt (same ``source``) in a group share its prefill: the prompt runs
        once and its cache rows and logits are copied to the others' slots."""
        dev = self.device
        start = 0
        while start < len(admit):
            w = len(prompts[admit[start]])
            end = start + 1
            while end < len(admit) and len(prompts[admit[end]]) >= 0.8 * w and (end + 1 - start) * w <= self.prefill_tokens:
                end += 1
            group, where = admit[start:end], free[start:end]
            first: dict[int, int] = {}  # prompt -> its row among those prefilled
            row_of = [first.setdefault(i if source is None else source[i], len(first)) for i in group]
            run = [r for r, g in enumerate(row_of) if g == len(set(row_of[:r]))]  # each prompt's first sequence
            ids, _ = pad_rows([prompts[group[r]] for r in run], self.pad_id, side="right")
            last = torch.tensor([len(prompts[group[r]]) - 1 for r in run], device=dev)
            logits = self._fwd.prefill(ids.to(dev), last, slots.cache, torch.tensor([where[r] for r in run], device=dev))
            if len(run) < len(group):
                firsts = set(run)
                copies = [r for r in range(len(group)) if r not in firsts]
                src = torch.tensor([where[run[row_of[r]]] for r in copies], device=dev)
                slots.cache.copy_slots_(slots.cache, src, torch.tensor([where[r] for r in copies], device=dev), ids.shape[1])
                logits = logits[torch.tensor(row_of, device=dev)]
            for s, i in zip(where, group, strict=True):
                budget, reason = self._budget(len(prompts[i]), sampling)
                slots.req[s] = _Request(i, budget, reason, None if sampling.greedy else _uniforms(keys[i], sampling.seed, budget))
                slots.length[s] = len(prompts[i])
            self._advance(slots, where, logits, sampling, done)
            if on_tokens is not None:
                on_tokens(len(where))
            start = end

    def _advance(self, slots: _Slots, live: list[int], logits: torch.Tensor, sampling: SamplingConfig, done: list[Completion]) -> None:
        """Choose each live slot's next token; finished requests leave their slot."""
        u = None
        if not sampling.greedy:
            u = torch.tensor([slots.req[s].uniforms[len(slots.req[s].tokens)] for s in live], dtype=torch.float64)
        chosen = _select(logits, sampling, u).tolist()
        for s, tok in zip(live, chosen, strict=True):
            req = slots.req[s]
            if tok in self._stop_set:
                done.append(Completion(req.index, req.tokens, "stop", tok))
                slots.req[s] = None
                continue
            req.tokens.append(tok)
            if len(req.tokens) >= req.budget:
                done.append(Completion(req.index, req.tokens, req.reason_at_budget))
                slots.req[s] = None
            else:
                slots.next_token[s] = tok

    def _slots(self, n: int, capacity: int) -> _Slots:
        """A slot set; with CUDA graphs, kept per shape (at most 8) so its graph is captured once."""
        if not self.cuda_graphs:
            return _Slots(self._fwd, n, capacity, self._dtype, self.device, static=False)
        key = (n, capacity)
        if key in self._slot_sets:
            self._slot_sets.move_to_end(key)
            return self._slot_sets[key]
        while len(self._slot_sets) >= 8:
            self._slot_sets.popitem(last=False)
        slots = self._slot_sets[key] = _Slots(self._fwd, n, capacity, self._dtype, self.device, static=True)
        return slots

    def _shrink(self, slots: _Slots) -> _Slots:
        """With no prompt left to admit, move the live requests to a slot set half the size once at
        most half the slots are live (a graph replays every slot, live or not)."""
        live = slots.live()
        n = slots.n
        while n >= 16 and len(live) <= n // 2:
            n //= 2
        if n == slots.n or not live:
            return slots
        small = self._slots(n, slots.cache.capacity)
        upto = max(slots.length[s] for s in live)
        dev = self.device
        small.cache.copy_slots_(slots.cache, torch.tensor(live, device=dev), torch.arange(len(live), device=dev), upto)
        small.req = [slots.req[s] for s in live] + [None] * (n - len(live))
        small.length = [slots.length[s] for s in live] + [0] * (n - len(live))
        small.next_token = [slots.next_token[s] for s in live] + [0] * (n - len(live))
        slots.req = [None] * slots.n
        return small

    # -- the hf engine -----------------------------------------------------------------------------
    @torch.inference_mode()
    def _hf_batch(self, prompts, batch: list[int], sampling: SamplingConfig, on_tokens) -> list[Completion]:
        lengths = [len(prompts[i]) for i in batch]
        budget, reason = zip(*(self._budget(n, sampling) for n in lengths), strict=True)
        ids, mask = pad_rows([prompts[i] for i in batch], self.pad_id, side="left")
        kwargs: dict[str, Any] = {"do_sample": not sampling.greedy}
        if not sampling.greedy:
            torch.manual_seed(sampling.seed)
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        steps = max(budget)
        out = []
        if steps > 0:
            gen = self.model.generate(
                ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=steps,
                eos_token_id=self.stop_ids or None,
                pad_token_id=self.pad_id,
                **kwargs,
            )[:, ids.shape[1]:].tolist()
        else:
            gen = [[] for _ in batch]
        made = 0
        for r, i in enumerate(batch):
            toks, why, stop = gen[r][: budget[r]], reason[r], None
            for t, tok in enumerate(toks):
                if tok in self._stop_set:
                    toks, why, stop = toks[:t], "stop", tok
                    break
            made += len(toks) + (why == "stop")
            out.append(Completion(i, toks, why, stop))
        if on_tokens is not None:
            on_tokens(made)
        return out

    # -- the vllm engine ---------------------------------------------------------------------------
    def _run_vllm(self, prompts, order, sampling: SamplingConfig, batch_size: int, keys, on_tokens):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ValueError("the vllm engine needs vLLM installed (pip install vllm)") from None
        if self.model_path is None:
            raise ValueError("the vllm engine needs the model folder")
        llm = LLM(model=self.model_path, dtype="auto" if self.dtype == "auto" else self.dtype, seed=sampling.seed)
        # vLLM schedules its own batches; hand it larger chunks so parts stay resumable
        chunk = max(batch_size, 1024)
        for s in range(0, len(order), chunk):
            part = order[s : s + chunk]
            params, inputs = [], []
            for i in part:
                budget, _ = self._budget(len(prompts[i]), sampling)
                params.append(
                    SamplingParams(
                        max_tokens=max(budget, 1),
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        seed=None if sampling.greedy else (sampling.seed * 1_000_003 + keys[i]) % (1 << 31),
                        stop_token_ids=self.stop_ids,
                        skip_special_tokens=False,
                    )
                )
                inputs.append({"prompt_token_ids": list(map(int, prompts[i]))})
            results = llm.generate(inputs, params, use_tqdm=False)
            out = []
            for i, res in zip(part, results, strict=True):
                o = res.outputs[0]
                toks, stop = list(o.token_ids), None
                if toks and toks[-1] in self._stop_set:
                    stop = toks.pop()
                why = "stop" if o.finish_reason == "stop" else self._budget(len(prompts[i]), sampling)[1]
                out.append(Completion(i, toks, why, stop))
            if on_tokens is not None:
                on_tokens(sum(len(c.token_ids) for c in out))
            yield out


def _uniforms(key: int, seed: int, n: int) -> np.ndarray:
    """``n`` uniforms in [0, 1): the sampling stream of one prompt, from ``(seed, key)`` alone."""
    return np.random.default_rng([seed & 0xFFFFFFFF, key & 0xFFFFFFFFFFFFFFFF]).random(n)


def _select(logits: torch.Tensor, sampling: SamplingConfig, u: torch.Tensor | None) -> torch.Tensor:
    """Next token per row: argmax, or inverse-CDF sampling with the uniforms ``u`` [B]."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True)
        # nucleus: the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        probs = probs.masked_fill(drop, 0)
    else:
        order = None
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None], right=True)[:, 0]
    idx = idx.clamp_(max=probs.shape[-1] - 1)
    return idx if order is None else order.gather(1, idx[:, None])[:, 0]


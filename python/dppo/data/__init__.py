"""The data stage: raw chat and preference data -> the chat template, truncation and token ids ->
memory-mapped shards (``dppo prep``), and the micro-batches the trainer forms from them.

- :mod:`~dppo.data.sources`: where rows come from (``DataSource``: a hub id with its split, config and
  revision, or local parquet / jsonl / json / arrow files) and reading them as Arrow batches;
- :mod:`~dppo.data.prep`: one preparation run through the native engine (``PrepConfig``, ``prepare``);
- :mod:`~dppo.data.shards`: reading shards without copying (``open_shards``) and ``micro_batches``,
  the one packing of dppo.
"""

from dppo._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "Shards": "shards", "ShardError": "shards", "open_shards": "shards", "micro_batches": "shards",
    "SEG_PROMPT": "shards", "SEG_RESPONSE": "shards", "SEG_CHOSEN": "shards", "SEG_REJECTED": "shards",
    "SEG_YGEN": "shards", "SHARD_VERSION": "shards", "FLAG_PROMPT_TRUNCATED": "shards",
    "FLAG_RESPONSE_TRUNCATED": "shards", "FLAG_BOUNDARY_RESPLIT": "shards",
    "PrepConfig": "prep", "prepare": "prep", "prepare_defaults": "prep", "DEFAULTS": "prep",
    "DataSource": "sources", "Source": "sources", "open_source": "sources",
})

"""The native data engine (Rust, ``dppo._native``), as the library uses it: the one module that imports it.

Everything here is the engine's own, re-exported with types (``_native.pyi``): the tokenizer, the
preparation run, chat-template rendering, the prompts of rows (``prompt_rows``: the one parser
of rows into prompts, shared by prep, generate, eval and curriculum; ``ROW_COLUMNS``: the columns
each row reader reads, ``sft``, ``prefs`` and ``prompts``), prompt encoding, the packing of
micro-batches and shard indexes, and the engine's exceptions, all subclasses of :class:`DppoError`:

=================== ==========================================================================
``InputError``      a row, file, option or data set the user can fix
``ShardError``      a shard folder that is missing, incomplete, corrupt or of another version
``TokenizerError``  a tokenizer or chat template that cannot be loaded or applied
``StorageError``    a file that cannot be read or written
=================== ==========================================================================

Calls are coarse (a whole batch of rows or prompts per call) and run with the GIL released.
"""

from __future__ import annotations

from dppo._native import (
    DppoError,
    InputError,
    Preparer,
    ROW_COLUMNS,
    ShardError,
    StorageError,
    Tokenizer,
    TokenizerError,
    __version__,
    encode_prompts,
    open_shard_index,
    pack_rows,
    prompt_rows,
    render_chat,
    render_chats,
)

__all__ = [
    "DppoError",
    "InputError",
    "ShardError",
    "TokenizerError",
    "StorageError",
    "Tokenizer",
    "Preparer",
    "render_chat",
    "render_chats",
    "encode_prompts",
    "pack_rows",
    "prompt_rows",
    "ROW_COLUMNS",
    "open_shard_index",
    "__version__",
]

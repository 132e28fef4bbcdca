"""``dppo generate``: responses of a model to the prompts of a data set, written to parquet or jsonl.

This produces y_gen (the reference model's greedy response to every training prompt, read by
``dppo prep prefs --ygen FILE``) and the responses that ``dppo eval`` judges.

* **Prompts** are the first user turn of each row, with an optional leading system message,
  rendered with the tokenizer's chat template plus the generation prompt, exactly as ``dppo prep``
  renders them (same native template engine and tokenizer). Rows are read from ``chosen``,
  ``messages`` or a ``prompt`` string column; ``prompt_id`` comes from the data (else the engine
  derives it as prep does, see ``docs/shards.md``: the sha256 of the text of a prompt that is one
  user turn, UltraFeedback's convention, else of the whole history).
  ``turns="all"`` takes the whole history up to the last user turn. A prepared pair-shard folder
  works too: its (possibly truncated) prompt ids are used as they are.
* **Output**: one row per prompt with ``prompt_id``, ``prompt`` (the user turn), ``response``,
  ``response_ids`` (the generated token ids, stop token excluded: what ``dppo prep --ygen`` stores
  as y_gen, never a re-tokenization of the text), ``prompt_tokens``, ``response_tokens`` and
  ``finish_reason`` (``stop``, ``length``, ``context``); the settings that made it (model and
  tokenizer fingerprints, sampling) go to ``OUT.meta.json``.
* **Long prompts** (``max_prompt_len``) are shortened as ``dppo prep`` shortens them: a history's
  earliest exchanges go whole, then content of the last user turn goes, the template's tokens (the
  generation header last) stay.
* **Resumable**: every finished batch is written at once as a part file in ``OUT.parts/``; a rerun
  skips the prompt_ids already in ``OUT`` or in a part, and the parts are merged into ``OUT``
  atomically at the end. A crash loses at most the batch in flight. Rerunning with other settings
  is refused (``overwrite=True`` starts over).
* **Fast**: see ``dppo.generate.decoding`` (length-sorted batches, in-place KV cache, finished rows
  dropped, CUDA graphs on CUDA; ``engine="vllm"`` where installed).

Typical use::

    generate(GenConfig(model="runs/sft", out=Path("ygen.parquet"),
                       data=DataSource("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs"),
                       decode=DecodeConfig(sampling=SamplingConfig(max_new_tokens=512))))
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from dppo.artifacts import (
    chat_fingerprint,
    config_record,
    meta_path_of,
    model_fingerprint,
    model_tokenizer_dir,
    read_json,
    resolve_device,
    resolve_dtype,
    torch_dtype,
    resolve_model,
    tokenizer_fingerprint,
    write_atomic,
    write_json,
)
from dppo.console import esc, print_table
from dppo.data.sources import DataSource
from dppo.errors import ConfigError
from dppo.generate.decoding import ENGINES, SamplingConfig

__all__ = [
    "GenConfig",
    "DecodeConfig",
    "FlatOptions",
    "PromptRow",
    "OUTPUT_COLUMNS",
    "END_TOKENS",
    "generate",
    "generate_rows",
    "load_prompts",
    "render_prompts",
    "stop_token_ids",
    "read_generations",
    "generation_settings",
]

OUTPUT_COLUMNS = ("prompt_id", "prompt", "response", "response_ids", "prompt_tokens", "response_tokens", "finish_reason")

END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>", "<end_of_turn>", "<|end|>")
"""Special tokens that end a turn or a text in the common chat vocabularies; those present in a
tokenizer (as added tokens) stop generation, with the model's own ``eos_token_id``."""

@dataclass(frozen=True)
class DecodeConfig:
    """How responses are produced, whatever the model and the prompts: the part of a run that
    ``dppo generate`` and ``dppo eval`` share. Validated once, here; passed whole to the callee.

    Attributes:
        sampling: tokens chosen (greedy by default), see :class:`~dppo.generate.decoding.SamplingConfig`.
        batch_size: prompts decoded together (None: 128 on CUDA, 32 on the CPU).
        engine: ``auto`` (dppo's decoder where the architecture is supported, else hf), ``dppo``,
            ``hf`` (transformers' generate) or ``vllm``.
        dtype: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``bf16``, ``fp16`` or ``fp32``.
        device: ``auto``/None (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        max_prompt_len: shorten longer prompts as prep does (a history's earliest exchanges go
            whole, then user-turn content; the template stays), None keeps all.
        tokenizer: a tokenizer folder or hub id (None: the model's).
    """

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int | None = None
    engine: str = "auto"
    dtype: str = "auto"
    device: str | None = None
    max_prompt_len: int | None = None
    tokenizer: str | None = None

    @classmethod
    def from_options(cls, **options: Any) -> DecodeConfig:
        """From flat options (``max_new_tokens=..., batch_size=...``): the sampling ones go to ``sampling``."""
        fields = {f.name for f in dataclasses.fields(SamplingConfig)}
        sampling = SamplingConfig(**{k: v for k, v in options.items() if k in fields})
        return cls(sampling=sampling, **{k: v for k, v in options.items() if k not in fields})

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingConfig):
            raise ConfigError(f"DecodeConfig.sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.dtype != "auto":
            resolve_dtype(self.dtype, "cpu")  # names are checked here, resolved on the device
        if self.max_prompt_len is not None and self.max_prompt_len < 1:
            raise ConfigError(f"--max-prompt-len must be positive, got {self.max_prompt_len}")


class FlatOptions:
    """``from_options`` of a run's configuration (``GenConfig``, ``EvalConfig``): flat options, as on
    the command line, sorted into the run's own fields, its :class:`~dppo.data.sources.DataSource`
    (``data``, ``split``, ``config``, ``revision``) and its :class:`DecodeConfig` (the rest:
    decoding's and sampling's). ``default_split`` is the split of a source named by a plain string."""

    default_split: ClassVar[str | None] = None

    @classmethod
    def from_options(cls, **options: Any) -> Any:
        from dppo.data.sources import DataSource

        names = {f.name for f in dataclasses.fields(cls)} - {"data", "decode"}  # type: ignore[arg-type]
        source_names = {f.name for f in dataclasses.fields(DataSource)}
        source = {"split": cls.default_split, **{k: v for k, v in options.items() if k in source_names}}
        own = {k: v for k, v in options.items() if k in names}
        rest = {k: v for k, v in options.items() if k not in names and k not in source_names}
        return cls(**own, data=DataSource(**source), decode=DecodeConfig.from_options(**rest))


@dataclass(frozen=True)
class GenConfig(FlatOptions):
    """One ``dppo generate`` run: the model, the prompts' source (a plain string names one), the
    output file and how to decode; saved (flat) into ``OUT.meta.json``."""

    model: str
    data: DataSource
    out: Path
    limit: int | None = None
    turns: str = "first"  # the prompt: the first user turn, or the whole history ("all"), as prep takes it
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", DataSource.of(self.data, split=self.default_split))
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be positive, got {self.limit}")
        if Path(self.out).suffix not in (".parquet", ".jsonl"):
            raise ConfigError(f"--out must end in .parquet or .jsonl, got {Path(self.out).name}")


@dataclass(frozen=True)
class PromptRow:
    """A prompt to answer: its id, the user turn's text, and the messages the template renders
    (or, from shards, the prompt's token ids as prep wrote them)."""

    prompt_id: str
    prompt: str
    messages: tuple[tuple[str, str], ...] = ()
    ids: tuple[int, ...] | None = None


# ------------------------------------------------------------------------------------------------
# Stop tokens
# ------------------------------------------------------------------------------------------------


def stop_token_ids(tok_dir: Path, model_dir: Path | None = None) -> list[int]:
    """Ids that end a response: the model's ``eos_token_id`` (generation_config.json, config.json),
    the tokenizer's ``eos_token`` and every added token of ``END_TOKENS`` it has."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    ids: set[int] = set()
    names = list(END_TOKENS)
    eos = read_json(tok_dir / "tokenizer_config.json").get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str):
        names.append(eos)
        if (i := tok.token_to_id(eos)) is not None:
            ids.add(i)
    ids.update(added[n] for n in names if n in added)
    if model_dir is not None:
        for name in ("generation_config.json", "config.json"):
            value = read_json(model_dir / name).get("eos_token_id")
            ids.update([value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)])
    if not ids:
        raise ConfigError(f"{tok_dir}: the tokenizer has no end-of-turn or end-of-text token; cannot tell when to stop")
    return sorted(ids)


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------


def _prompts_of(batch: Any, first_row: int, turns: str) -> list[tuple[int, str | None, list[tuple[str, str]] | None, str | None]]:
    """The prompt of each row of a batch, by the engine's one rule set (``dppo.engine.prompt_rows``,
    the parser ``dppo prep`` uses): from ``chosen``, else ``messages``, else a ``prompt`` string;
    ``turns="all"`` takes the whole history up to the last user turn, as ``prep --turns all``."""
    from dppo import engine

    try:
        return engine.prompt_rows(batch, first_row, turns)
    except engine.InputError as e:
        raise ConfigError(str(e)) from None


def _is_shards(path: Path) -> bool:
    meta = read_json(path / "meta.json") if path.is_dir() else {}
    return meta.get("format") == "dppo-shards"


def load_prompts(
    source: DataSource | str, *, limit: int | None = None, turns: str = "first"
) -> tuple[list[PromptRow], dict[str, Any]]:
    """The distinct prompts of a data source (first ``limit`` in source order) and a summary
    (``description``, ``rows_in``, ``skipped``, ``duplicates``). A plain string names a source.

    Rows are parsed by the engine (``dppo.engine.prompt_rows``); ``turns="all"`` takes the whole
    history up to the last user turn, as ``dppo prep --turns all``. A row without a ``prompt_id``
    is named by the engine as prep names it (the sha256 of a lone user turn's text, UltraFeedback's
    convention, else of the whole history; see ``docs/shards.md``), so y_gen joins such rows too."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be positive, got {limit}")
    if turns not in ("first", "all"):
        raise ConfigError(f"--turns must be first or all, got {turns!r}")
    source = DataSource.of(source)
    data = source.data
    if _is_shards(Path(data)):
        return _shard_prompts(Path(data), limit)
    from dppo import engine

    src = source.open(columns=engine.ROW_COLUMNS["prompts"])
    prompts: list[PromptRow] = []
    seen: set[str] = set()
    rows_in = skipped = duplicates = 0
    for batch in src.batches:
        for _row, pid, messages, _reason in _prompts_of(batch, rows_in, turns):
            rows_in += 1
            if messages is None:
                skipped += 1
                continue
            if pid is None:  # an engine built before it named rows itself
                raise ConfigError("dppo._native is older than this library (rows without prompt_id); rebuild the engine")
            text = messages[-1][1]
            if pid in seen:
                duplicates += 1
                continue
            seen.add(pid)
            prompts.append(PromptRow(pid, text, tuple(messages)))
            if limit is not None and len(prompts) >= limit:
                break
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ConfigError(f"{data}: no usable prompts ({rows_in} rows read, {skipped} without a user turn)")
    return prompts, {"description": src.description, "rows_in": rows_in, "skipped": skipped, "duplicates": duplicates}


def _shard_prompts(path: Path, limit: int | None) -> tuple[list[PromptRow], dict[str, Any]]:
    from dppo.data import open_shards

    shards = open_shards(path)
    if shards.kind != "pairs":
        raise ConfigError(f"{path}: {shards.kind} shards have no prompt ids; generate from preference shards or raw data")
    prompts, seen = [], set()
    for i in range(len(shards)):
        ex = shards[i]
        if ex["prompt_id"] in seen:
            continue
        seen.add(ex["prompt_id"])
        prompts.append(PromptRow(ex["prompt_id"], "", ids=tuple(int(t) for t in ex["prompt_ids"])))
        if limit is not None and len(prompts) >= limit:
            break
    desc = {"type": "shards", "path": str(path.resolve()), "tokenizer": shards.meta.get("tokenizer", {})}
    return prompts, {"description": desc, "rows_in": len(shards), "skipped": 0, "duplicates": len(shards) - len(seen)}


def render_prompts(
    rows: Sequence[PromptRow], tok_dir: Path, max_prompt_len: int | None = None, truncate_prompt: str = "start"
) -> list[list[int]]:
    """Token ids of each prompt: the chat template with the generation prompt, tokenized (as prep).

    With ``max_prompt_len``, a longer prompt loses, as a pair's prompt in prep, the earliest
    exchanges of its history (whole), then content of its last user turn (its end, or with
    ``truncate_prompt="end"`` its start), never the template's tokens: the generation header stays
    last. Prompts from shards are used as prep stored them.
    """
    from dppo import engine

    convs = [list(r.messages) for r in rows if r.ids is None]
    try:
        encoded = iter(engine.encode_prompts(str(tok_dir), convs, max_prompt_len, truncate_prompt) if convs else [])
    except engine.InputError as e:
        raise ConfigError(f"--max-prompt-len {max_prompt_len}: {e}") from None
    out = []
    for r in rows:
        ids = list(r.ids) if r.ids is not None else next(encoded)
        out.append(ids)
    return out


# ------------------------------------------------------------------------------------------------
# Output files
# ------------------------------------------------------------------------------------------------


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _meta_path(out: Path) -> Path:
    return meta_path_of(out)


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt", pa.string()),
            ("response", pa.string()),
            ("response_ids", pa.list_(pa.int32())),
            ("prompt_tokens", pa.int32()),
            ("response_tokens", pa.int32()),
            ("finish_reason", pa.string()),
        ]
    )


def _read_table(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            table = pa.Table.from_pylist(rows, schema=_schema()) if rows else _schema().empty_table()
    except Exception as e:
        raise ConfigError(f"{path}: cannot read generations ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if "response_ids" not in table.column_names and table.num_rows:  # written before response_ids existed
        table = table.append_column("response_ids", pa.nulls(table.num_rows, pa.list_(pa.int32())))
    missing = [c for c in OUTPUT_COLUMNS if c not in table.column_names]
    if missing:
        raise ConfigError(f"{path}: not a generations file (no {', '.join(missing)})")
    return table.select(list(OUTPUT_COLUMNS)).cast(_schema())


def read_generations(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a file written by ``generate`` (parquet or jsonl), as dicts."""
    return _read_table(Path(path)).to_pylist()


def _write_table(table: Any, path: Path) -> None:
    """A generations table as parquet or jsonl, written atomically."""
    import io

    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        buf = io.BytesIO()
        pq.write_table(table, buf)
        write_atomic(path, buf.getvalue())
    else:
        write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in table.to_pylist()))


def _existing(out: Path) -> Any:
    """The rows already generated for ``out``: the merged file, then every part (newest last)."""
    import pyarrow as pa

    tables = [_read_table(out)] if out.is_file() else []
    parts = _parts_dir(out)
    if parts.is_dir():
        tables += [_read_table(p) for p in sorted(parts.glob("part-*.parquet"))]
    return pa.concat_tables(tables) if tables else _schema().empty_table()


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


def generation_settings(model_dir: Path, tok_dir: Path, decode: DecodeConfig, dtype: str, turns: str = "first") -> dict[str, Any]:
    """What decides the responses (and nothing else): a file is resumed only under equal settings.
    ``turns`` is the prompt rule the rows were read with (the first user turn or the whole history)."""
    sampling = decode.sampling
    return {
        "turns": turns,
        "model_fingerprint": model_fingerprint(model_dir),
        "tokenizer_fingerprint": chat_fingerprint(tok_dir),
        "stop_ids": stop_token_ids(tok_dir, model_dir),
        "max_new_tokens": sampling.max_new_tokens,
        "max_prompt_len": decode.max_prompt_len,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p if not sampling.greedy else None,
        "seed": sampling.seed if not sampling.greedy else None,
        "dtype": dtype,
    }


def generate(cfg: GenConfig, *, console: Console | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Generate a response to every prompt of ``cfg.data`` (resuming ``cfg.out``); returns a summary."""
    model_dir = resolve_model(cfg.model)
    tok_dir = model_tokenizer_dir(model_dir, cfg.decode.tokenizer)
    rows, source = load_prompts(cfg.data, limit=cfg.limit, turns=cfg.turns)
    shard_tok = source["description"].get("tokenizer", {}).get("fingerprint") if source["description"].get("type") == "shards" else None
    if shard_tok is not None and tokenizer_fingerprint(tok_dir) != shard_tok:
        raise ConfigError(f"{cfg.data}: the shards were tokenized with another tokenizer than {tok_dir}")
    return generate_rows(cfg.model, rows, Path(cfg.out), cfg.decode, overwrite=cfg.overwrite, turns=cfg.turns,
                         extra_meta={"config": config_record(cfg), "source": source}, console=console,
                         show_progress=show_progress)


def generate_rows(
    model: str,
    rows: Sequence[PromptRow],
    out: Path,
    decode: DecodeConfig,
    *,
    overwrite: bool = False,
    turns: str = "first",
    extra_meta: dict[str, Any] | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    show_summary: bool = True,
    label: str = "generate",
) -> dict[str, Any]:
    """Generate responses for ``rows`` into ``out`` (resuming it) as ``decode`` says; the library core
    of ``generate`` (and of ``dppo eval``'s answers). ``turns`` names the prompt rule ``rows`` were
    read with (``load_prompts``): one of the settings, so a file is never resumed under another.

    The phases, in this order on every rank (each collective is reached by every rank, whatever
    its share of the prompts, and an error on rank 0 is raised on all):

    1. resolve the model, the tokenizer and the settings that decide the responses (``_resolve``);
    2. rank 0 checks the output against them and decides what is left to do (``_plan_rest``);
    3. each rank decodes its share, balanced by prompt length, longest first, one part file per
       batch in ``OUT.parts/`` (``_decode_share``): a crash loses at most the batch in flight;
    4. the counts meet (``_gather_counts``), then rank 0 merges every part into ``out`` atomically
       with ``OUT.meta.json`` (``_merge_parts``). Greedy output equals one process's, row for row.
    """
    from dppo.distributed import barrier, on_main
    from dppo.distributed import setup as setup_distributed

    if out.suffix not in (".parquet", ".jsonl"):
        raise ConfigError(f"--out must end in .parquet or .jsonl, got {out.name}")
    dist, device = setup_distributed(decode.device)
    console = console or Console(stderr=True)
    if not dist.main:
        console, show_progress = Console(stderr=True, quiet=True), False
    t0 = time.perf_counter()
    run = _resolve(model, out, decode, device, turns)
    plan = on_main(dist, _plan_rest, run, rows, overwrite)
    made = _decode_share(run, rows, plan, dist, device, console, show_progress, label)
    counts = _gather_counts(dist, made)
    barrier(dist)  # every rank's parts are on disk
    merged = on_main(dist, _merge_parts, run, rows, counts["engine"], extra_meta)
    summary = {"out": str(out), "prompts": len(rows), "already_done": len(rows) - len(plan.pending), **counts,
               "rows": merged, "seconds": round(time.perf_counter() - t0, 2), "merged": True}
    if summary["engine"] is None:
        del summary["engine"]
    if show_progress:
        _report(console, summary, show_summary, label)
    return summary


@dataclass(frozen=True)
class _Run:
    """One generation, resolved once: the model's and tokenizer's folders, the dtype, the settings
    that decide the responses, and the output."""

    model: str
    model_dir: Path
    tok_dir: Path
    dtype: str
    settings: dict[str, Any]
    decode: DecodeConfig
    out: Path

    @property
    def parts(self) -> Path:
        return _parts_dir(self.out)


@dataclass(frozen=True)
class _Plan:
    """What is left, decided on rank 0 and the same on every rank: the positions of the prompts
    still to answer (in ``rows``) and the number of the first new part file."""

    pending: list[int]
    first_part: int


def _resolve(model: str, out: Path, decode: DecodeConfig, device: Any, turns: str) -> _Run:
    model_dir = resolve_model(model)
    tok_dir = model_tokenizer_dir(model_dir, decode.tokenizer)
    dtype = resolve_dtype(decode.dtype, device)
    return _Run(model, model_dir, tok_dir, dtype, generation_settings(model_dir, tok_dir, decode, dtype, turns), decode, out)


def _plan_rest(run: _Run, rows: Sequence[PromptRow], overwrite: bool) -> _Plan:
    """(Rank 0.) Refuse an output made with other settings, then skip the prompts already answered:
    in ``out`` or in a part, with the same prompt text (shard prompts: the same id)."""
    _check_output(run.out, run.parts, _meta_path(run.out), run.settings, overwrite)
    existing = _existing(run.out)
    wanted = {r.prompt_id: r for r in rows}
    done_ids = set()
    for pid, prompt in zip(existing.column("prompt_id").to_pylist(), existing.column("prompt").to_pylist(), strict=True):
        r = wanted.get(pid)
        if r is None or r.ids is not None or r.prompt == prompt:
            done_ids.add(pid)
    pending = [i for i, r in enumerate(rows) if r.prompt_id not in done_ids]
    first_part = max((int(p.stem.split("-")[1]) for p in run.parts.glob("part-*.parquet")), default=-1) + 1
    if pending:
        run.parts.mkdir(exist_ok=True)
        write_json(run.parts / "settings.json", run.settings)
    return _Plan(pending, first_part)


def _decode_share(run: _Run, rows: Sequence[PromptRow], plan: _Plan, dist: Any, device: Any, console: Console,
                  show_progress: bool, label: str) -> dict[str, Any]:
    """This rank's share of the pending prompts (balanced by prompt length), decoded batch by batch,
    each batch written at once as a part file; returns what was made. A rank with no share loads
    no model and decodes nothing."""
    from dppo.distributed import split_by_cost

    pending = [rows[i] for i in plan.pending]
    ids = render_prompts(pending, run.tok_dir, run.decode.max_prompt_len) if pending else []
    if dist.active and pending:
        share = split_by_cost([len(x) for x in ids], dist.world)[dist.rank].tolist()
        pending, ids = [pending[i] for i in share], [ids[i] for i in share]
    made: dict[str, Any] = {"generated": 0, "generated_tokens": 0, "finish_reasons": Counter(), "seconds": 0.0, "engine": None}
    if not pending:
        return made
    import torch
    from tokenizers import Tokenizer

    from dppo.generate.decoding import Decoder

    suffix = f"-r{dist.rank:03d}" if dist.active else ""
    detok = Tokenizer.from_file(str(run.tok_dir / "tokenizer.json"))
    stop = run.settings["stop_ids"]
    lm = None if run.decode.engine == "vllm" else _load_quietly(run.model_dir, run.dtype, device)
    decoder = Decoder(lm, stop, engine=run.decode.engine, pad_id=stop[0], model_path=str(run.model_dir),
                      dtype=str(torch_dtype(run.dtype)).removeprefix("torch."))
    made["engine"] = decoder.engine
    bs = run.decode.batch_size or (128 if device.type == "cuda" else 32)
    keys = [int(hashlib.blake2b(r.prompt_id.encode(), digest_size=8).hexdigest(), 16) for r in pending]
    t_gen = time.perf_counter()
    with _progress(console, show_progress, label) as (progress, task, on_tokens):
        progress.update(task, total=len(pending))
        batches = decoder.run(ids, run.decode.sampling, batch_size=bs, keys=keys, on_tokens=on_tokens)
        for b, completions in enumerate(batches):
            _write_table(_part_table(pending, ids, completions, detok), run.parts / f"part-{plan.first_part + b:06d}{suffix}.parquet")
            made["finish_reasons"].update(c.finish_reason for c in completions)
            made["generated"] += len(completions)
            made["generated_tokens"] += sum(len(c.token_ids) for c in completions)
            progress.advance(task, len(completions))
    made["seconds"] = time.perf_counter() - t_gen
    del decoder, lm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return made


@contextlib.contextmanager
def _progress(console: Console, show: bool, label: str) -> Iterator[tuple[Progress, Any, Any]]:
    """A progress bar of prompts with the tokens-per-second rate, and the callback that feeds it."""
    progress = Progress(TextColumn(f"[bold]{esc(label)}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not show)
    t0, made = time.perf_counter(), [0]

    def on_tokens(n: int) -> None:
        made[0] += n
        progress.update(task, rate=f"{made[0] / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")

    with progress:
        task = progress.add_task(esc(label), total=None, rate="")
        yield progress, task, on_tokens


def _part_table(pending: Sequence[PromptRow], ids: Sequence[list[int]], completions: Sequence[Any], detok: Any) -> Any:
    """One batch's rows of the output (shard prompts have no text: their decoded ids stand in)."""
    import pyarrow as pa

    return pa.Table.from_pylist(
        [
            {
                "prompt_id": pending[c.index].prompt_id,
                "prompt": pending[c.index].prompt or detok.decode(ids[c.index], skip_special_tokens=False),
                "response": detok.decode(c.token_ids, skip_special_tokens=False),
                "response_ids": c.token_ids,
                "prompt_tokens": len(ids[c.index]),
                "response_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
            }
            for c in completions
        ],
        schema=_schema(),
    )


def _gather_counts(dist: Any, made: dict[str, Any]) -> dict[str, Any]:
    """Every rank's counts summed (every rank calls this, with or without a share): responses,
    tokens, finish reasons, the decoder used and the mean decoding time."""
    from dppo.distributed import all_gather_objects, all_reduce_sum

    reasons: Counter[str] = Counter()
    engines = []
    for r, engine in all_gather_objects(dist, (dict(made["finish_reasons"]), made["engine"])):
        reasons.update(r)
        engines.append(engine)
    generated, tokens, seconds = all_reduce_sum(dist, made["generated"], made["generated_tokens"], made["seconds"])
    seconds /= dist.world
    return {"generated": int(generated), "generated_tokens": int(tokens), "finish_reasons": dict(reasons),
            "engine": next((e for e in engines if e is not None), None),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None}


def _merge_parts(run: _Run, rows: Sequence[PromptRow], engine: str | None, extra_meta: dict[str, Any] | None) -> int:
    """(Rank 0.) The file and every part merged into ``out`` (one row per prompt, in ``rows``' order),
    ``OUT.meta.json`` written, the parts removed; returns the number of rows."""
    meta_path = _meta_path(run.out)
    merged = _merge(_existing(run.out), [r.prompt_id for r in rows])
    _write_table(merged, run.out)
    meta = {
        "format": "dppo-generations",
        "settings": run.settings,
        "model": str(run.model),
        "model_dir": str(run.model_dir.resolve()),
        "tokenizer_dir": str(run.tok_dir.resolve()),
        "tokenizer": {"fingerprint": tokenizer_fingerprint(run.tok_dir)},
        "engine": engine or read_json(meta_path).get("engine") or run.decode.engine,
        "rows": merged.num_rows,
        **(extra_meta or {}),
    }
    write_json(meta_path, meta)
    shutil.rmtree(run.parts, ignore_errors=True)
    return merged.num_rows


def _report(console: Console, summary: dict[str, Any], table: bool, label: str) -> None:
    if table:
        print_table(console, _summary_table(summary))
        return
    speed = f", {summary['tokens_per_s']:,.0f} tokens/s" if summary.get("tokens_per_s") else ""
    console.print(
        f"{esc(label)}: {summary['generated']:,} new responses ({summary['already_done']:,} cached), "
        f"{summary['generated_tokens']:,} tokens{speed}",
        highlight=False,
    )


def _check_output(out: Path, parts: Path, meta_path: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Clear ``out`` for ``overwrite``; refuse to resume a file made with other settings."""
    if overwrite:
        for p in (out, meta_path):
            p.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    old = read_json(meta_path).get("settings") or read_json(parts / "settings.json")
    if (out.exists() or parts.exists()) and old != settings:
        if not old:
            raise ConfigError(f"{out}: exists without {meta_path.name}; pass --overwrite or choose another --out")
        diff = ", ".join(f"{k} {old.get(k)!r} -> {settings[k]!r}" for k in settings if old.get(k) != settings[k])
        raise ConfigError(f"{out}: made with other settings ({diff}); pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)


def _load_quietly(model_dir: Path, dtype: str, device: str) -> Any:
    """``load_model`` without transformers' own progress bars (ours is drawn by rich)."""
    from transformers.utils import logging as hf_logging

    from dppo.modeling import load_model

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_model(str(model_dir), dtype=dtype, device=device, attn="sdpa")
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _merge(table: Any, order: Sequence[str]) -> Any:
    """One row per prompt_id (the newest wins), in ``order`` first, then the others as found."""
    import pyarrow as pa

    ids = table.column("prompt_id").to_pylist()
    last = {pid: i for i, pid in enumerate(ids)}
    rank = {pid: k for k, pid in enumerate(order)}
    keep = sorted(last.values(), key=lambda i: (rank.get(ids[i], len(rank)), i))
    return table.take(pa.array(keep, type=pa.int64())) if keep else table.slice(0, 0)


def _summary_table(s: dict[str, Any]) -> Table:
    t = Table(title="generate", show_header=False, box=None, pad_edge=False)
    t.add_row("output", esc(s["out"]))
    t.add_row("prompts", f"{s['prompts']:,} ({s['already_done']:,} already done)")
    t.add_row("generated", f"{s['generated']:,} responses, {s['generated_tokens']:,} tokens")
    if s.get("tokens_per_s"):
        t.add_row("speed", f"{s['tokens_per_s']:,.0f} tokens/s")
    if s["finish_reasons"]:
        t.add_row("finish", ", ".join(f"{k} {v:,}" for k, v in sorted(s["finish_reasons"].items())))
    t.add_row("time", f"{s['seconds']:.1f} s")
    return t


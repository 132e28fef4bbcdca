"""``dppo prep``: raw chat / preference data to memory-mapped shards.

Python reads the source (polars or pyarrow for local files, ``datasets`` for hub ids) in bounded batches and
hands each batch to the Rust engine as Arrow data in one call; the engine validates, renders the
chat template, tokenizes, truncates and writes the shards (see ``dppo.engine``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from dppo.console import esc, note, print_table

from dppo import engine
from dppo.artifacts import config_record, file_fingerprint, meta_path_of, read_json, resolve_tokenizer, tokenizer_fingerprint
from dppo.data.sources import DataSource
from dppo.errors import SourceError

__all__ = ["PrepConfig", "prepare", "prepare_defaults", "DEFAULTS"]

DEFAULTS = {
    "tokenizer": "Qwen/Qwen2.5-0.5B",
    "sft": {"data": "HuggingFaceTB/smol-smoltalk", "split": "train"},
    "prefs": {"data": "HuggingFaceH4/ultrafeedback_binarized", "splits": ["train_prefs", "test_prefs"]},
    "out": "data",
}


@dataclass(frozen=True)
class PrepConfig:
    """Everything one preparation run needs; saved (flat) into ``meta.json`` as ``config``.
    ``data`` is a :class:`~dppo.data.sources.DataSource` (a plain string names one)."""

    kind: Literal["sft", "prefs"]
    data: DataSource
    tokenizer: str
    out: Path
    ygen: Path | None = None
    pair_ids: Path | None = None  # a parquet file of prompt_id, chosen_ids, rejected_ids (generated ids)
    max_len: int | None = None  # None: the `percentile` of full-sequence lengths
    percentile: float = 95.0
    max_prompt_len: int | None = None
    truncate_prompt: Literal["start", "end"] = "start"  # which part of a too-long user turn is kept
    turns: Literal["first", "all"] = "first"  # the first exchange (the paper's reading) or the whole conversation
    strict: bool = False
    allow_missing_ygen: bool = False
    ygen_subset: bool = False  # only the pairs the y_gen file answers (a curriculum round's): the rest are not rows of this run
    overwrite: bool = False
    batch_rows: int = 4096
    tokenizer_fallback: bool = False
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", DataSource.of(self.data))


def _read_ygen(path: Path, tokenizer_fingerprint: str, console: Console) -> tuple[Any, str]:
    """The y_gen rows (``prompt_id``, ``response`` and, where usable, ``response_ids``) and which
    of the two the engine will use.

    ``response_ids`` (the ids the model generated, as ``dppo generate`` writes them) are used when
    the file's meta (``FILE.meta.json``) names the same tokenizer as the preparation's; otherwise
    the responses are tokenized from their text, and a note says why."""
    import pyarrow as pa

    if not path.is_file():
        raise SourceError(f"{path}: no such y_gen file (write it with `dppo generate`)")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            table = pa.Table.from_pylist(rows)
        else:
            raise SourceError(f"{path}: y_gen must be a .parquet or .jsonl file")
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{path}: cannot read y_gen file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing = [c for c in ("prompt_id", "response") if c not in table.column_names]
    if missing:
        raise SourceError(f"{path}: y_gen file lacks column(s) {', '.join(missing)} (has {', '.join(table.column_names)})")
    if "response_ids" not in table.column_names:
        note(console, f"{path} has no response_ids: y_gen is tokenized from its text")
        return table.select(["prompt_id", "response"]), "text"
    made_with = (read_json(meta_path_of(path)).get("tokenizer") or {}).get("fingerprint")
    if made_with != tokenizer_fingerprint:
        why = "its meta names no tokenizer" if made_with is None else f"it was generated with another tokenizer ({made_with})"
        note(console, f"{path}: response_ids not used ({why}; this preparation's tokenizer is "
                      f"{tokenizer_fingerprint}): y_gen is tokenized from its text")
        return table.select(["prompt_id", "response"]), "text"
    return table.select(["prompt_id", "response", "response_ids"]), "ids"


def _read_pair_ids(path: Path, tokenizer_fingerprint: str, console: Console) -> tuple[Any, str]:
    """The generated ids of pairs' responses (``prompt_id``, ``chosen_ids``, ``rejected_ids``), as
    ``dppo curriculum --pairs judge`` writes them in ``pairs.parquet``, and whether the engine will
    use them: only when the file's meta names the preparation's tokenizer (else the responses are
    tokenized from their text, and a note says why)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise SourceError(f"{path}: no such pair-ids file")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise SourceError(f"{path}: cannot read the pair ids: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing = [c for c in ("prompt_id", "chosen_ids", "rejected_ids") if c not in table.column_names]
    if missing:
        raise SourceError(f"{path}: pair-ids file lacks column(s) {', '.join(missing)} (has {', '.join(table.column_names)})")
    made_with = (read_json(meta_path_of(path)).get("tokenizer") or {}).get("fingerprint")
    if made_with != tokenizer_fingerprint:
        why = "its meta names no tokenizer" if made_with is None else f"it was generated with another tokenizer ({made_with})"
        console.print(f"[yellow]note:[/] {path}: chosen_ids/rejected_ids not used ({why}; this preparation's tokenizer is "
                      f"{tokenizer_fingerprint}): the responses are tokenized from their text", highlight=False)
        return None, "text"
    return table.select(["prompt_id", "chosen_ids", "rejected_ids"]), "ids"


def _summary_table(title: str, s: dict[str, Any]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    t.add_row("rows in", f"{s['rows_in']:,}" + (f"  (and {s['outside_ygen']:,} pairs outside this y_gen, not part of this run)" if s.get("outside_ygen") else ""))
    t.add_row("rows kept", f"{s['rows_kept']:,}")
    dropped = {k: v for k, v in s["dropped"].items() if v}
    t.add_row("rows dropped", f"{s['rows_dropped']:,}" + (f"  ({', '.join(f'{k} {v:,}' for k, v in dropped.items())})" if dropped else ""))
    t.add_row(
        "truncated",
        f"{s['truncated']:,} examples: {s['truncated_prompt']:,} prompts lost {s['prompt_tokens_removed']:,} tokens "
        f"(at most {s['prompt_tokens_removed_max']:,}, user-turn {s['truncate_prompt']} kept), "
        f"{s['truncated_responses']:,} responses lost {s['response_tokens_removed']:,}",
    )
    src = s["max_len_from"]
    how = f"p{src['auto']['percentile']:g} of full-sequence lengths" if isinstance(src, dict) else "fixed"
    if s.get("exchanges_dropped"):
        t.add_row("exchanges dropped", f"{s['exchanges_dropped']:,} (earliest first) from {s['conversations_shortened']:,} conversations, "
                  f"{s['exchange_tokens_removed']:,} tokens" + (f"; {s['label_spans_dropped']:,} label spans with them" if s.get("label_spans_dropped") else ""))
    if s.get("ygen_truncated"):
        t.add_row("y_gen truncated", f"{s['ygen_truncated']:,} lost {s['ygen_tokens_removed']:,} tokens (keep-start, to the room the pair leaves)")
    t.add_row("max_len", f"{s['max_len']:,} ({how}); prompt <= {s['max_prompt_len']:,}")
    if s.get("boundary_resplit"):
        t.add_row("boundary re-split", f"{s['boundary_resplit']:,}")
    if s.get("template_frame_fallback"):
        t.add_row("template", f"{s['template_frame_fallback']:,} prompts: user turn not found, only the generation header is protected")
    t.add_row("tokens", f"{s['tokens']:,} stored, {s['packed_tokens']:,} through the model (prompt once per response)")
    if s.get("ygen"):
        y = s["ygen"]
        t.add_row("y_gen", f"{y['responses']:,} responses: {y['from_ids']:,} as generated ids, {y['from_text']:,} tokenized from text"
                  + (f", {y['bad_rows']:,} unusable rows" if y["bad_rows"] else ""))
    if s.get("pair_ids"):
        p = s["pair_ids"]
        t.add_row("pair ids", f"{p['from_ids']:,} pairs as generated ids, {p['from_text']:,} tokenized from text"
                  + (f", {p['bad_rows']:,} unusable rows" if p["bad_rows"] else ""))
    t.add_row("speed", f"{s['rows_per_s']:,.0f} rows/s, {s['tokens_per_s']:,.0f} tokens/s ({s['seconds']:.1f} s)")
    return t


def prepare(cfg: PrepConfig, *, console: Console | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Prepare one data set into ``cfg.out``; returns the summary (also in ``meta.json``)."""
    console = console or Console(stderr=True)
    tok_dir = resolve_tokenizer(cfg.tokenizer)
    source = cfg.data.open(cfg.batch_rows, columns=engine.ROW_COLUMNS["sft" if cfg.kind == "sft" else "prefs"])
    prep = engine.Preparer(
        "sft" if cfg.kind == "sft" else "prefs",
        str(tok_dir),
        str(cfg.out),
        max_len=cfg.max_len,
        percentile=cfg.percentile,
        max_prompt_len=cfg.max_prompt_len,
        truncate_prompt=cfg.truncate_prompt,
        strict=cfg.strict,
        allow_missing_ygen=cfg.allow_missing_ygen,
        overwrite=cfg.overwrite,
        tokenizer_fallback=cfg.tokenizer_fallback,
        turns=cfg.turns,
        ygen_subset=cfg.ygen_subset,
    )
    ygen_desc = None
    try:
        if cfg.ygen is not None:
            if cfg.kind != "prefs":
                raise SourceError("--ygen applies to preference data (dppo prep prefs)")
            table, used = _read_ygen(Path(cfg.ygen), tokenizer_fingerprint(tok_dir), console)
            prep.add_ygen(table)
            ygen_desc = {"path": str(Path(cfg.ygen).resolve()), "blake2b": file_fingerprint(Path(cfg.ygen)), "used": used}
        pair_ids_desc = None
        if cfg.pair_ids is not None:
            if cfg.kind != "prefs":
                raise SourceError("pair ids apply to preference data (dppo prep prefs)")
            table, used = _read_pair_ids(Path(cfg.pair_ids), tokenizer_fingerprint(tok_dir), console)
            if table is not None:
                prep.add_pair_ids(table)
            pair_ids_desc = {"path": str(Path(cfg.pair_ids).resolve()), "blake2b": file_fingerprint(Path(cfg.pair_ids)),
                             "used": used}
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console, disable=not show_progress, transient=False) as bar:
            task = bar.add_task(f"tokenize {cfg.kind}", total=source.num_rows, rate="")
            t0, rows = time.perf_counter(), 0
            for batch in source.batches:
                rows += prep.feed(batch, rows)
                bar.update(task, completed=rows, rate=f"{rows / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s")
            bar.update(task, total=rows)
            write = bar.add_task("truncate, pack, write", total=None, rate="")

            def progress(done: int, total: int) -> None:
                bar.update(write, completed=done, total=total)

            meta = {
                "source": source.description,
                "tokenizer_source": str(cfg.tokenizer),
                "ygen_source": ygen_desc,
                **({"pair_ids_source": pair_ids_desc} if pair_ids_desc is not None else {}),
                "config": {k: v for k, v in config_record(cfg).items() if k != "extra_meta"},
                **cfg.extra_meta,
            }
            summary = json.loads(prep.finish(json.dumps(meta), progress))
    except BaseException:
        prep.abort()
        raise
    if show_progress:
        print_table(console, _summary_table(esc(f"{cfg.kind} -> {cfg.out}"), summary))
    return summary


def prepare_defaults(
    out: Path | None = None, *, tokenizer: str | None = None, overwrite: bool = False, console: Console | None = None
) -> list[dict[str, Any]]:
    """Bare ``dppo prep``: the paper's data (SmolTalk SFT, UltraFeedback train/test pairs) with the
    Qwen2.5-0.5B tokenizer (or ``tokenizer``) into ``out`` (default ``data/``)."""
    out = Path(out or DEFAULTS["out"])
    tok = tokenizer or DEFAULTS["tokenizer"]
    sft = DataSource(DEFAULTS["sft"]["data"], split=DEFAULTS["sft"]["split"])
    runs = [PrepConfig("sft", sft, tok, out / "sft", overwrite=overwrite)]
    for split in DEFAULTS["prefs"]["splits"]:
        pairs = DataSource(DEFAULTS["prefs"]["data"], split=split)
        runs.append(PrepConfig("prefs", pairs, tok, out / f"prefs-{split}", overwrite=overwrite))
    return [prepare(r, console=console) for r in runs]

"""Reading data sources: Hugging Face hub ids and local parquet / jsonl / json / arrow files or folders.

Every reader yields Arrow-compatible batches (polars DataFrames or pyarrow tables) of a bounded
number of rows, so that preparing a data set never loads it whole. Failures become one
``SourceError`` line naming the source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["DataSource", "Source", "open_source", "DATA_SUFFIXES", "JSONL_COLUMN"]

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".feather", ".ipc")


from dppo.artifacts import file_fingerprint
from dppo.errors import ConfigError, SourceError


@dataclass(frozen=True)
class DataSource:
    """Where a stage reads its rows: a local file or folder, or a hub data set with its split,
    configuration (subset) and revision. ``dppo prep``, ``generate``, ``eval`` and ``curriculum``
    take one; their saved configurations hold its fields flat (``data``, ``split``, ``config``,
    ``revision``).

    ``split``, ``config`` and ``revision`` choose within a hub data set (an empty name is none: the
    hub's ``train`` split, its default configuration, its main branch); a local source has one
    table and reads the same whatever they are.
    """

    data: str
    split: str | None = None
    config: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, os.PathLike):
            object.__setattr__(self, "data", os.fspath(self.data))
        if not isinstance(self.data, str) or not self.data.strip():
            raise ConfigError(f"--data must name a local file or folder or a hub data set, got {self.data!r}")
        for name in ("split", "config", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"the data set's {name} must be a name, got {type(value).__name__} {value!r}")
            if isinstance(value, str) and not value.strip():  # `--split ""`: none (a command's default cleared)
                object.__setattr__(self, name, None)

    @classmethod
    def of(cls, value: DataSource | str | os.PathLike[str], **defaults: str | None) -> DataSource:
        """``value`` itself if it is a ``DataSource``, else the source it names (with ``defaults``:
        ``split=...`` and the like)."""
        return value if isinstance(value, DataSource) else cls(value, **defaults)  # type: ignore[arg-type]

    def open(self, batch_rows: int = 4096, columns: Sequence[str] | None = None) -> Source:
        """The source's rows in batches (:func:`open_source`)."""
        return open_source(self.data, split=self.split, config=self.config, revision=self.revision, batch_rows=batch_rows,
                           columns=columns)

    def __str__(self) -> str:
        return self.data


@dataclass
class Source:
    """An opened source: a description for ``meta.json`` and an iterator of Arrow batches."""

    description: dict[str, Any]
    batches: Iterator[Any]
    num_rows: int | None = None
    files: list[Path] = field(default_factory=list)


def _saved_dataset(path: Path, split: str | None) -> Path | None:
    """The folder of a data set written by ``datasets``' ``save_to_disk`` (``state.json``,
    ``dataset_info.json``, ``data-*.arrow``), or, for a saved ``DatasetDict``
    (``dataset_dict.json``), the folder of ``split`` (default ``train``); None for other folders."""
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        import json

        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        name = split or "train"
        if name not in splits:
            raise SourceError(f"{path}: a saved DatasetDict without split '{name}' (its splits: {', '.join(splits)}); pass --split")
        return path / name
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return path
    return None


def _saved_files(path: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` folder, in ``state.json``'s order."""
    import json

    state = json.loads((path / "state.json").read_text())
    files = [path / f["filename"] for f in state.get("_data_files", [])]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SourceError(f"{path}: state.json lists {', '.join(missing)}, which are missing")
    return files


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    parquet = [p for p in files if p.suffix == ".parquet"]
    return parquet or files


def _kept(names: Sequence[str], columns: Sequence[str] | None) -> list[str] | None:
    """The columns of ``names`` to read: those of ``columns`` it has (the ones the engine reads), or
    None (read them all) where ``columns`` is None or names none of them, so that the engine's
    error about a missing column lists the columns the data does have."""
    if columns is None:
        return None
    kept = [c for c in names if c in columns]
    return kept or None


def _file_batches(path: Path, batch_rows: int, columns: Sequence[str] | None = None) -> Iterator[Any]:
    """Batches of one local file: polars for parquet and json, pyarrow for jsonl and arrow (so that
    jsonl and arrow sources need no polars). With ``columns``, only those of them the file has are
    read (:func:`_kept`): other columns, whatever their size or type, stay out of the way."""
    suffix = path.suffix
    try:
        if suffix == ".parquet":
            import polars as pl
            import pyarrow.parquet as pq

            scan = pl.scan_parquet(path)
            if (kept := _kept(pq.read_schema(path).names, columns)) is not None:
                scan = scan.select(kept)
            yield from scan.collect_batches(chunk_size=batch_rows)
        elif suffix == ".jsonl":
            yield from _jsonl_batches(path, batch_rows)
        elif suffix == ".json":
            import polars as pl

            df = pl.read_json(path, infer_schema_length=None)
            if (kept := _kept(df.columns, columns)) is not None:
                df = df.select(kept)
            yield from df.iter_slices(batch_rows)
        elif suffix in (".arrow", ".feather", ".ipc"):
            for b in _arrow_file_batches(path, batch_rows):
                kept = _kept(b.column_names, columns)
                yield b if kept is None else b.select(kept)
        else:
            raise SourceError(f"{path}: unsupported file type {suffix!r} (use parquet, jsonl, json or arrow)")
    except SourceError:
        raise
    except Exception as e:  # polars / pyarrow parse errors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{path}: cannot read {suffix[1:]} data: {msg}") from None


JSONL_COLUMN = "__jsonl__"


def _jsonl_batches(path: Path, batch_rows: int, chunk_bytes: int = 8 << 20) -> Iterator[Any]:
    """Raw jsonl lines as Arrow binary, parsed by the engine row by row. Readers that infer a
    schema (polars, pyarrow) silently turn a number into a string or fail the whole file, while a
    field of the wrong type must be a counted skip of its own row."""
    import pyarrow as pa

    rest = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            data = rest + block
            if not block:
                lines, rest = data.split(b"\n"), b""
            else:
                lines = data.split(b"\n")
                rest = lines.pop()
            lines = [ln for ln in lines if ln.strip()]
            for start in range(0, len(lines), batch_rows):
                yield pa.table({JSONL_COLUMN: pa.array(lines[start : start + batch_rows], type=pa.large_binary())})
            if not block:
                break


def _arrow_file_batches(path: Path, batch_rows: int) -> Iterator[Any]:
    import pyarrow as pa

    # `datasets` writes the Arrow *stream* format; feather/IPC files use the file format
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = iter(pa.ipc.open_stream(source))
        for b in batches:
            for start in range(0, b.num_rows, batch_rows):
                yield pa.Table.from_batches([b.slice(start, batch_rows)])


def _count_rows(files: list[Path]) -> int | None:
    """Rows of parquet (from metadata) and jsonl (line count) files, for progress bars; else None."""
    total = 0
    try:
        import pyarrow.parquet as pq

        for p in files:
            if p.suffix == ".parquet":
                total += pq.ParquetFile(p).metadata.num_rows
            elif p.suffix == ".jsonl":
                with open(p, "rb") as f:
                    total += sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))
            else:
                return None
    except Exception:
        return None
    return total


def _hub_error(src: str, e: Exception) -> SourceError:
    from dppo.artifacts import first_line

    return SourceError(
        f"could not load data set '{src}' from the Hugging Face hub ({type(e).__name__}: {first_line(e)}); "
        "check the name (and HF_HUB_OFFLINE: set it to use only the local cache), or pass a local parquet/jsonl file"
    )


def open_source(
    src: str | os.PathLike[str],
    *,
    split: str | None = None,
    config: str | None = None,
    revision: str | None = None,
    batch_rows: int = 4096,
    columns: Sequence[str] | None = None,
) -> Source:
    """Open ``src``: an existing local file or folder, else a Hugging Face hub data set id. With
    ``columns`` (the ones the engine reads, ``dppo.engine.ROW_COLUMNS``), a table's other columns
    (SmolTalk's ``source``, a hub set's extras) are not read: they cost no memory and no reader
    fails on their types. jsonl lines are parsed by the engine, which reads only its own keys."""
    path = Path(src).expanduser()
    if path.exists():
        saved = _saved_dataset(path, split)
        files = _saved_files(saved) if saved is not None else _local_files(path)
        if not files:
            raise SourceError(f"{path}: no parquet, jsonl, json or arrow files found")

        def batches() -> Iterator[Any]:
            for f in files:
                yield from _file_batches(f, batch_rows, columns)

        desc = {
            "type": "local",
            "path": str(path.resolve()),
            "files": [{"name": str(f.relative_to(path)) if path.is_dir() else f.name, "blake2b": file_fingerprint(f)} for f in files],
        }
        if saved is not None:
            desc["format"] = "datasets.save_to_disk"
        return Source(desc, batches(), _count_rows(files), files)

    if str(src).startswith((".", "/", "~")) or str(src).endswith(DATA_SUFFIXES):
        raise SourceError(f"{src}: no such file or folder")
    from dppo.artifacts import check_hub_access, hub_offline

    if not hub_offline():  # offline, `datasets` reads its own cache (and fails at once without it)
        check_hub_access("data set", str(src))
    try:
        import datasets

        ds = datasets.load_dataset(str(src), name=config, split=split or "train", revision=revision)
    except Exception as e:
        raise _hub_error(str(src), e) from None
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    if (kept := _kept(table.column_names, columns)) is not None:
        table = table.select(kept)

    def hub_batches() -> Iterator[Any]:
        import pyarrow as pa

        for b in table.to_batches(max_chunksize=batch_rows):
            yield pa.Table.from_batches([b])

    desc = {
        "type": "hub",
        "id": str(src),
        "config": config,
        "split": split or "train",
        "revision": revision,
        "fingerprint": getattr(ds, "_fingerprint", None),
    }
    return Source(desc, hub_batches(), len(ds))

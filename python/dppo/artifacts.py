"""What every stage does to files: find a model, tokenizer or data set (a local path or a Hugging
Face hub id), fingerprint it, write results atomically, and name dtypes and devices.

One definition each, shared by every stage: a model folder has one fingerprint whichever stage
computes it (the reference cache, the generation settings, a judge's cache key), an output is
written beside its final path and renamed into place, and ``bf16`` means the same dtype everywhere.

Hub look-ups fail fast and say what to do. A hub id is first looked up in the local Hugging Face
cache; only when it is not there is the hub asked, and only after a quick check (a TCP connection,
3 s at most) that the hub can be reached at all, so an offline machine gets one line naming
``HF_HUB_OFFLINE`` and local paths within seconds instead of a minute of retries and a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dppo.errors import ConfigError, SourceError

__all__ = [
    "HubError", "hub_offline", "hub_reachable", "hub_snapshot", "hub_file", "check_hub_access", "first_line",
    "resolve_model", "resolve_tokenizer", "model_tokenizer_dir", "meta_path_of", "read_json", "copy_tokenizer_files", "write_tokenizer_config", "TOKENIZER_FILES",
    "file_fingerprint", "model_fingerprint", "tokenizer_fingerprint", "chat_fingerprint", "WEIGHT_SUFFIXES",
    "config_record", "temp_sibling", "write_atomic", "write_json", "atomic_folder", "normal_permissions",
    "DTYPES", "torch_dtype", "resolve_dtype", "resolve_device",
]

HUB_PROBE_SECONDS = 3.0


class HubError(SourceError):
    """A hub id that cannot be resolved (offline, unreachable, unknown): one line, what to do."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for the local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.cache
def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds (checked once per process)."""
    host, port = _endpoint()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _unreachable(what: str, name: str) -> HubError:
    host, port = _endpoint()
    if hub_offline():
        return HubError(
            f"{what} '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            f"pass a local path, or download it on a machine with network access"
        )
    return HubError(
        f"{what} '{name}': no such local path, and the Hugging Face hub ({host}:{port}) cannot be reached; "
        f"pass a local path, or set HF_HUB_OFFLINE=1 to use only the local cache"
    )


def check_hub_access(what: str, name: str) -> None:
    """Fail fast (one line) when ``name`` would need the hub and the hub cannot be reached."""
    if hub_offline() or not hub_reachable():
        raise _unreachable(what, name)


def hub_snapshot(
    repo_id: str, *, what: str, allow_patterns: list[str] | None = None, revision: str | None = None, repo_type: str = "model"
) -> Path:
    """The local folder of a hub repository: from the cache when it holds it, else downloaded."""
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = dict(allow_patterns=allow_patterns, revision=revision, repo_type=repo_type)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
    except Exception:
        pass
    check_hub_access(what, repo_id)
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:
        raise HubError(
            f"could not fetch {what} '{repo_id}' from the Hugging Face hub ({type(e).__name__}: {first_line(e)}); "
            "check the name (and HF_TOKEN for gated repositories), or pass a local path"
        ) from None


def hub_file(repo_id: str, filename: str, *, what: str, revision: str | None = None) -> Path | None:
    """One file of a hub repository (cache first), or None if the repository has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    except Exception:
        pass
    check_hub_access(what, repo_id)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except EntryNotFoundError:
        return None
    except Exception as e:
        raise HubError(
            f"could not fetch {what} '{repo_id}' from the Hugging Face hub ({type(e).__name__}: {first_line(e)}); "
            "check the name (and HF_TOKEN for gated repositories), or pass a local path"
        ) from None


# ------------------------------------------------------------------------------------------------
# Models and tokenizers
# ------------------------------------------------------------------------------------------------

MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
"""What a model's hub snapshot needs: config, weights (safetensors), tokenizer and template files."""


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """The local folder of a model: ``RUN/model`` for a run folder, the folder itself for a model
    folder (with ``config.json``), or a hub id's snapshot (the local cache first)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "model" / "config.json").is_file():
            return path / "model"
        if (path / "adapter" / "adapter_config.json").is_file():
            return path / "adapter"  # a LoRA run trained with --no-merge (its config.json is the run's)
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return path  # a model folder, or a LoRA adapter folder (loaded with its base merged in)
        raise ConfigError(f"{path}: neither a run folder (with model/ or adapter/) nor a model folder (with "
                          "config.json) nor a LoRA adapter folder (with adapter_config.json)")
    if path.exists():
        raise ConfigError(f"{path}: a file, not a model folder")
    if str(model).startswith((".", "/", "~")) or os.sep in str(model).strip("/").replace("/", "", 1):
        raise ConfigError(f"{model}: no such model folder")
    return hub_snapshot(str(model), what="model", allow_patterns=MODEL_FILES)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "tokenization_dppo.py",
    "vocab.json",
    "merges.txt",
)
"""The files of a tokenizer folder that travel with a saved model."""


def resolve_tokenizer(tok: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local folder holding ``tokenizer.json`` (and ``tokenizer_config.json``) for ``tok``:
    the folder itself, or a hub id's snapshot (the local cache first)."""
    path = Path(tok).expanduser()
    if path.exists():
        if path.is_file():
            path = path.parent
        if not (path / "tokenizer.json").is_file():
            raise SourceError(f"{path}: no tokenizer.json in this folder")
        return path
    local = hub_snapshot(str(tok), what="tokenizer", revision=revision,
                         allow_patterns=["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"])
    if not (local / "tokenizer.json").is_file():
        raise SourceError(f"tokenizer '{tok}' has no tokenizer.json (only fast tokenizers are supported)")
    return local


def model_tokenizer_dir(model_dir: Path, tokenizer: str | None = None) -> Path:
    """The tokenizer of a model: ``tokenizer`` if given, else the model folder's (or its run folder's)."""
    if tokenizer is not None:
        return resolve_tokenizer(tokenizer)
    for d in (model_dir, model_dir.parent):
        if (d / "tokenizer.json").is_file():
            return d
    raise ConfigError(f"{model_dir}: no tokenizer.json beside the model; pass the tokenizer explicitly")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of ``src`` (those it has) into ``dst``, with a ``tokenizer_config.json``
    that makes ``transformers.AutoTokenizer`` load ``tokenizer.json`` as it is (:func:`write_tokenizer_config`)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (dst / "tokenizer.json").is_file():
        write_tokenizer_config(dst)


TOKENIZER_MODULE = "tokenization_dppo.py"
"""The module ``tokenizer_config.json``'s ``auto_map`` names (used only with ``trust_remote_code=True``)."""

_TOKENIZER_MODULE_TEXT = '''"""The tokenizer of this folder is its tokenizer.json, loaded exactly as saved (written by dppo).

transformers reads this module only with trust_remote_code=True; without it, tokenizer_config.json's
tokenizer_class (PreTrainedTokenizerFast) loads the same tokenizer.json.
"""

from transformers import PreTrainedTokenizerFast


class TokenizerFromJson(PreTrainedTokenizerFast):
    """tokenizer.json as saved: its normalizer, pre-tokenizer and post-processor, no class-specific rebuild."""
'''


def write_tokenizer_config(folder: str | os.PathLike[str], base: dict[str, Any] | None = None) -> Path:
    """Write ``folder/tokenizer_config.json`` (``base``, else the folder's own, with its other keys kept)
    so that ``AutoTokenizer.from_pretrained(folder)`` gives the ids of ``tokenizer.json``, the ids dppo
    trained on.

    ``tokenizer_class`` alone does not do it: for a model type transformers 5 lists as having wrong
    tokenizer classes on the hub (``qwen2``, ``phi3``, ...), ``AutoTokenizer`` takes the model type's
    class (``Qwen2Tokenizer``), which rebuilds the tokenizer with its own pre-tokenizer (Qwen2 splits
    digits one by one) whatever ``tokenizer.json`` says. An ``auto_map`` entry is the one thing that
    skips that rule; without ``trust_remote_code`` transformers then loads ``tokenizer_class``
    (``PreTrainedTokenizerFast``: ``TokenizersBackend`` in transformers 5, reading ``tokenizer.json`` as
    it is; the same in transformers 4). With ``trust_remote_code=True`` it imports the ``auto_map``'s
    class from :data:`TOKENIZER_MODULE`, written beside it: a ``PreTrainedTokenizerFast`` too."""
    folder = Path(folder)
    config = dict(base) if base is not None else read_json(folder / "tokenizer_config.json")
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["auto_map"] = {"AutoTokenizer": [None, TOKENIZER_MODULE.removesuffix(".py") + ".TokenizerFromJson"]}
    write_atomic(folder / TOKENIZER_MODULE, _TOKENIZER_MODULE_TEXT)
    return write_json(folder / "tokenizer_config.json", config)


def meta_path_of(path: Path) -> Path:
    """The metadata file beside a data file: ``FILE.meta.json`` (a generations file's settings and
    tokenizer, which ``dppo prep --ygen`` reads)."""
    return path.with_name(path.name + ".meta.json")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, {} when it is absent or unreadable."""
    try:
        value = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ------------------------------------------------------------------------------------------------
# Fingerprints
# ------------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: Path, chunk: int = 1 << 22) -> str:
    """blake2b of a file's bytes (16 hex digits). Remembered per (path, size, mtime) within a process,
    so a multi-GB checkpoint is read once however many stages ask."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.blake2b(digest_size=8)
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """A LoRA adapter folder (peft's ``adapter_config.json``) rather than a full model folder."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def adapter_base(path: str | os.PathLike[str]) -> str:
    """The base model an adapter folder was trained on (its ``base_model_name_or_path``)."""
    try:
        base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}/{ADAPTER_CONFIG}: unreadable ({e})") from None
    if not base:
        raise ConfigError(f"{path}/{ADAPTER_CONFIG}: no base_model_name_or_path: which model does it adapt?")
    return str(base)


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """16 hex digits identifying a model folder's weights: blake2b over the names and fingerprints of
    its ``config.json`` and weight files. The one model identity of dppo (reference cache, generation
    cache, judge cache)."""
    folder = Path(model_dir)
    h = hashlib.blake2b(digest_size=8)
    if is_adapter_dir(folder):  # a LoRA adapter: its own files and its base's identity
        h.update(f"base\0{model_fingerprint(resolve_model(adapter_base(folder)))}\0".encode())
        files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name == "adapter_config.json" or p.suffix in WEIGHT_SUFFIXES))
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ConfigError(f"{folder}: no weight files (*.safetensors, *.bin) in this model folder")
    for p in files:
        h.update(f"{p.name}\0{file_fingerprint(p)}\0".encode())
    return h.hexdigest()


def tokenizer_fingerprint(tok_dir: str | os.PathLike[str]) -> str:
    """The vocabulary's identity: the engine's xxh3 of ``tokenizer.json`` (what ``meta.json`` records;
    two tokenizers with this fingerprint give the same ids)."""
    from dppo.engine import Tokenizer

    return Tokenizer(str(tok_dir)).fingerprint


def chat_fingerprint(tok_dir: str | os.PathLike[str]) -> str:
    """The vocabulary and its chat template: :func:`tokenizer_fingerprint` with the template files'
    fingerprints (two folders with this fingerprint render and tokenize a prompt alike)."""
    folder = Path(tok_dir)
    h = hashlib.blake2b(digest_size=8)
    h.update(tokenizer_fingerprint(folder).encode())
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (folder / name).is_file():
            h.update(f"{name}\0{file_fingerprint(folder / name)}\0".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Writing files
# ------------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(folder: str | os.PathLike[str]) -> None:
    """Give every file under ``folder`` the mode a plain ``open()`` would (0o666 less the umask):
    safetensors writes its files 0600, so a model saved for others to read would not be readable."""
    mode = 0o666 & ~_umask()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


def config_record(cfg: Any) -> dict[str, Any]:
    """A configuration dataclass as the flat JSON object saved beside its results: nested
    configurations (a run's ``decode``, its ``sampling``) are merged into it, paths become strings,
    tuples lists."""
    import dataclasses

    def flat(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out.update(flat(value))
            elif isinstance(value, os.PathLike):
                out[f.name] = os.fspath(value)
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out

    return flat(cfg)


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """The hidden working name beside ``path`` for this process: ``.NAME.KIND-PID``."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def write_atomic(path: Path, data: str | bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` beside ``path`` and rename it into place: a reader sees the old file or the new, never half."""
    tmp = temp_sibling(path)
    with open(tmp, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj: Any, *, fsync: bool = False) -> Path:
    """``obj`` as indented JSON, written atomically."""
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", fsync=fsync)


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """A working folder beside ``final`` (``.NAME.partial-PID``) that replaces ``final`` only when the
    block ends without an error (its files made readable by others); on an error it is removed."""
    work = temp_sibling(final, "partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    normal_permissions(work)
    if final.exists():
        shutil.rmtree(final)
    os.rename(work, final)


# ------------------------------------------------------------------------------------------------
# Dtypes and devices
# ------------------------------------------------------------------------------------------------

DTYPES = ("bf16", "fp16", "fp32")
"""The dtype names dppo's options take (``auto`` resolves to one of them)."""
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def torch_dtype(name: str) -> Any:
    """The torch dtype of ``bf16``, ``fp16`` or ``fp32`` (or their long names)."""
    import torch

    name = _DTYPE_ALIASES.get(name, name)
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}: expected auto, bf16, fp16 or fp32")
    return table[name]


def resolve_device(name: str | None = "auto") -> Any:
    """A torch device from ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``;
    a CUDA device that is not there is a one-line error."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_dtype(name: str, device: Any) -> str:
    """``auto`` is bf16 on CUDA and fp32 elsewhere; other names are checked and normalised."""
    if name == "auto":
        return "bf16" if getattr(device, "type", str(device)).startswith("cuda") else "fp32"
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be auto, bf16, fp16 or fp32, got {name!r}")
    return name

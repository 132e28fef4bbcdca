"""What every stage does to files: find a model, tokenizer or data set (a local path or a Hugging
Face hub id), fingerprint it, and write results atomically.

Hub look-ups fail fast and say what to do. A hub id is first looked up in the local Hugging Face
cache; only when it is not there is the hub asked, and only after a quick check (a TCP connection,
3 s at most) that the hub can be reached at all, so an offline machine gets one line naming
``HF_HUB_OFFLINE`` and local paths within seconds instead of a minute of retries and a traceback.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dppo.errors import SourceError

__all__ = ["HubError", "hub_offline", "hub_reachable", "hub_snapshot", "hub_file", "check_hub_access", "first_line"]

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
    from dppo.errors import ConfigError

    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "model" / "config.json").is_file():
            return path / "model"
        if (path / "config.json").is_file():
            return path
        raise ConfigError(f"{path}: neither a run folder (with model/) nor a model folder (with config.json)")
    if path.exists():
        raise ConfigError(f"{path}: a file, not a model folder")
    if str(model).startswith((".", "/", "~")) or os.sep in str(model).strip("/").replace("/", "", 1):
        raise ConfigError(f"{model}: no such model folder")
    return hub_snapshot(str(model), what="model", allow_patterns=MODEL_FILES)


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

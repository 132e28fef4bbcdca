"""The errors a user can fix: the CLI prints them as one line (exit code 1) instead of a traceback.

The data engine's errors (``DppoError`` and its kinds: ``InputError``, ``ShardError``,
``TokenizerError``, ``StorageError``) come from :mod:`dppo.engine`; the library adds the three below.
"""

from dppo.engine import DppoError, InputError, ShardError, StorageError, TokenizerError

__all__ = [
    "DppoError", "InputError", "ShardError", "TokenizerError", "StorageError",
    "SourceError", "ConfigError", "EvaluationError", "USER_ERRORS", "storage_error_line",
]


class SourceError(RuntimeError):
    """A data source, tokenizer or model that cannot be read or found (the message is one line)."""


class ConfigError(ValueError):
    """An invalid option or combination of options (the message names the option)."""


class EvaluationError(RuntimeError):
    """An evaluation that ran but could not score what it was asked to (e.g. every judge call failed)."""


USER_ERRORS: tuple[type[BaseException], ...] = (DppoError, SourceError, ConfigError, EvaluationError, FileNotFoundError)


_STORAGE_CAUSES = {
    "EROFS": "the file system is read-only",
    "ENOSPC": "no space left on the device",
    "EDQUOT": "the disk quota is exceeded",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
}


def storage_error_line(error: BaseException, out: object = None) -> str | None:
    """One line for an error that means an output folder cannot be written (read-only, full, no
    permission): the folder, the file and the cause. ``None`` for any other error. Looks through the
    error's causes, so an ``OSError`` wrapped by a library (a checkpoint writer, an image encoder)
    is found too. ``out``: the command's output path, named when the error names no file (an image
    encoder writing to an open file)."""
    import errno
    from pathlib import Path

    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            name = errno.errorcode.get(e.errno, "")
            if name in _STORAGE_CAUSES:
                cause = _STORAGE_CAUSES[name]
                target = e.filename
                if target is None:
                    where = f"cannot write in {out}" if out is not None else "cannot write the output"
                    advice = "free some space and run it again" if name in ("ENOSPC", "EDQUOT") else "choose another output folder"
                    return f"{where}: {cause}; {advice}"
                path = Path(str(target) if not isinstance(target, bytes) else target.decode(errors="replace"))
                folder = path if path.is_dir() else path.parent
                advice = "free some space and run it again" if name in ("ENOSPC", "EDQUOT") else "choose another output folder"
                return f"cannot write in {folder} ({path.name}): {cause}; {advice}"
        e = e.__cause__ or e.__context__
    return None

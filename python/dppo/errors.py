"""The errors a user can fix: the CLI prints them as one line (exit code 1) instead of a traceback.

The data engine's errors (``DppoError`` and its kinds: ``InputError``, ``ShardError``,
``TokenizerError``, ``StorageError``) come from :mod:`dppo.engine`; the library adds the three below.
"""

from dppo.engine import DppoError, InputError, ShardError, StorageError, TokenizerError

__all__ = [
    "DppoError", "InputError", "ShardError", "TokenizerError", "StorageError",
    "SourceError", "ConfigError", "EvaluationError", "USER_ERRORS",
]


class SourceError(RuntimeError):
    """A data source, tokenizer or model that cannot be read or found (the message is one line)."""


class ConfigError(ValueError):
    """An invalid option or combination of options (the message names the option)."""


class EvaluationError(RuntimeError):
    """An evaluation that ran but could not score what it was asked to (e.g. every judge call failed)."""


USER_ERRORS: tuple[type[BaseException], ...] = (DppoError, SourceError, ConfigError, EvaluationError, FileNotFoundError)

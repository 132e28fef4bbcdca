"""The errors a user can fix: the CLI prints them as one line instead of a traceback."""

from dppo._native import DppoError


class SourceError(RuntimeError):
    """A data source, tokenizer or model that cannot be read or found (the message is one line)."""


class ConfigError(ValueError):
    """An invalid option or combination of options (the message names the option)."""


class EvaluationError(RuntimeError):
    """An evaluation that ran but could not score what it was asked to (e.g. every judge call failed)."""


USER_ERRORS: tuple[type[BaseException], ...] = (DppoError, SourceError, ConfigError, EvaluationError, FileNotFoundError)

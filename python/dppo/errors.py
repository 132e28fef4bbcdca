"""The errors a user can fix: the CLI prints them as one line instead of a traceback."""

from dppo._native import DppoError
from dppo.sources import SourceError


class ConfigError(ValueError):
    """An invalid option or combination of options (the message names the option)."""


USER_ERRORS: tuple[type[BaseException], ...] = (DppoError, SourceError, ConfigError, FileNotFoundError)

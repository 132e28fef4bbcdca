"""What dppo prints for a person to read: messages, tables and the other libraries' chatter.

- Text that comes from outside (paths, option values, model names, library messages) is never read
  as rich markup: :func:`esc` escapes it where it is put into a styled string, :func:`note` prints a
  styled label before a plain message.
- :func:`print_table` prints a rich table whole when the output is a file or a pipe (no name cut to
  ``unll+d...`` at 80 columns): as wide as the table needs.
- :func:`progress_bar` is the bar of long work counted in items (done / total, elapsed, the
  estimated time left): ``dppo eval``'s judging and an online round's.
- :func:`library_output_to` sends the warnings and progress bars that are not dppo's (torch's,
  transformers', peft's, huggingface_hub's) to a log file instead of the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["esc", "note", "print_table", "progress_bar", "library_output_to", "LIBRARY_LOGGERS"]


def esc(value: object) -> str:
    """``value`` as text that rich shows as it is (``[red]`` stays ``[red]``)."""
    return escape(str(value))


def note(console: Console, message: str, *, label: str = "note:", style: str = "yellow") -> None:
    """``label`` in ``style``, then ``message`` exactly as given (no markup, no highlighting)."""
    console.print(Text.assemble((label, style), " ", message), highlight=False, soft_wrap=True)


def print_table(console: Console, table: Any) -> None:
    """Print a rich table; on a file or a pipe, as wide as its widest row needs, so that no cell is
    truncated (a terminal keeps its own width: rich wraps the cells there)."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement

    width = Measurement.get(console, console.options.update(width=10_000), table).maximum
    saved = console.width
    console.width = max(saved, width)  # print() caps its own width at the console's
    try:
        console.print(table, crop=False)
    finally:
        console.width = saved


def progress_bar(console: Console, show: bool = True) -> Progress:
    """A bar of items: the task's description (rich markup: escape outside text with :func:`esc`), the
    bar, done / total, the time elapsed and the estimated time left. Used as a context manager; with
    ``show`` false it draws nothing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show,
    )


LIBRARY_LOGGERS = ("transformers", "peft", "huggingface_hub", "torch", "accelerate", "datasets")
"""The libraries whose log messages (warnings included) go to the log file."""


@contextlib.contextmanager
def library_output_to(log: IO[str] | str | os.PathLike[str] | None) -> Iterator[None]:
    """While the block runs: Python warnings (torch's ``torch.distributed is disabled``, peft's and
    transformers' UserWarnings) and the :data:`LIBRARY_LOGGERS` records are written to ``log`` (an
    open text file or a path, appended to; ``None``: dropped), and transformers' and
    huggingface_hub's progress bars ("Loading weights") are off. dppo's own messages are untouched."""
    own = False
    stream: Any
    if log is None:
        stream = None
    elif isinstance(log, (str, os.PathLike)):
        stream = _LazyLog(Path(log))
        own = True
    else:
        stream = log
    try:  # transformers sets up its loggers once, on first use: before they are redirected here
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers")
    except ImportError:  # pragma: no cover
        pass

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if stream is not None:
            stream.write(warnings.formatwarning(message, category, filename, lineno, line))
            stream.flush()

    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
    bars = _library_bars_off()
    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            for name in LIBRARY_LOGGERS:
                logger = logging.getLogger(name)
                saved.append((logger, list(logger.handlers), logger.propagate))
                logger.handlers = [handler]
                logger.propagate = False
            yield
        finally:
            for logger, handlers, propagate in saved:
                logger.handlers = handlers
                logger.propagate = propagate
            bars()
            if own and stream is not None:
                stream.close()


def _library_bars_off() -> Any:
    """Turn transformers' and huggingface_hub's progress bars off; returns what turns them back on."""
    undo: list[Any] = []
    try:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            undo.append(hf_logging.enable_progress_bar)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            undo.append(enable_progress_bars)
    except ImportError:  # pragma: no cover
        pass
    return lambda: [f() for f in undo]


class _LazyLog:
    """A log file opened (appended to) at its first write, so that a command that logs nothing leaves
    no file; a file that cannot be written (a read-only or full disk) drops the text instead of
    failing the command."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[str] | None = None
        self.broken = False

    def write(self, text: str) -> int:
        if self.broken:
            return 0
        try:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            self.file.write(text)
            self.file.flush()
        except OSError:
            self.broken = True
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

"""Where a run's scalars go: ``RUN/metrics.jsonl`` always, and TensorBoard or Weights & Biases on
request (``--report-to tensorboard,wandb``), neither a required dependency. Only rank 0 reports."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dppo.errors import ConfigError

__all__ = ["Reporter", "REPORTERS", "require_reporters"]

REPORTERS = ("none", "tensorboard", "wandb")


def parse_report_to(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none")
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ConfigError(f"--report-to takes {', '.join(REPORTERS)} (comma-separated), got {', '.join(unknown)}")
    return names


def _import_tracker(name: str) -> Any:
    """The tracker's writer (tensorboard's ``SummaryWriter``, the ``wandb`` module), or a one-line error."""
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
        import wandb

        return wandb
    except ImportError:
        raise ConfigError(f"--report-to {name} needs the {name} package: pip install {name}") from None


def require_reporters(report_to: str) -> None:
    """Check that every tracker ``report_to`` names can be imported (before a run writes anything)."""
    for name in parse_report_to(report_to):
        _import_tracker(name)


class Reporter:
    """A context manager that writes each step's record: one JSON line, and the numbers to the
    trackers asked for (tensorboard into ``RUN/tensorboard/``; wandb into the project ``dppo``)."""

    def __init__(self, run: Path, report_to: str, *, enabled: bool = True, config: dict[str, Any] | None = None) -> None:
        self.run, self.names, self.enabled, self.config = Path(run), parse_report_to(report_to), enabled, config or {}
        self._file: Any = None
        self._tb: Any = None
        self._wandb: Any = None

    def __enter__(self) -> Reporter:
        if not self.enabled:
            return self
        self._file = open(self.run / "metrics.jsonl", "a")  # noqa: SIM115 (closed in __exit__)
        if "tensorboard" in self.names:
            self._tb = _import_tracker("tensorboard")(log_dir=str(self.run / "tensorboard"))
        if "wandb" in self.names:
            self._wandb = _import_tracker("wandb").init(project="dppo", name=self.run.name, dir=str(self.run),
                                                         config=self.config, resume="allow")
        return self

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=record["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

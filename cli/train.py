"""``dppo train``: parse the options, merge them over ``--config FILE``, call :func:`dppo.train.train`.

Every option defaults to "not given" (None) here, so that a value from the TOML file is overridden
only by an option that was actually typed; the real defaults live in :class:`dppo.config.TrainConfig`
and its help texts (shown by ``dppo train --help``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dppo.config import HELP


def _o(*names: str, name: str) -> typer.models.OptionInfo:
    return typer.Option(*names, help=HELP[name], show_default=False)


def train_cmd(
    method: Annotated[Optional[str], _o("--method", name="method")] = None,
    data: Annotated[Optional[Path], _o("--data", name="data")] = None,
    init: Annotated[Optional[str], _o("--init", name="init")] = None,
    out: Annotated[Optional[Path], _o("--out", name="out")] = None,
    ref: Annotated[Optional[str], _o("--ref", name="ref")] = None,
    tokenizer: Annotated[Optional[Path], _o("--tokenizer", name="tokenizer")] = None,
    config: Annotated[
        Optional[Path],
        typer.Option("--config", help="TOML file whose keys mirror these options (grad_accum = 8); options given here override it."),
    ] = None,
    # the loss
    beta: Annotated[Optional[float], _o("--beta", name="beta")] = None,
    gamma: Annotated[Optional[float], _o("--gamma", name="gamma")] = None,
    alpha: Annotated[Optional[float], _o("--alpha", name="alpha")] = None,
    weight: Annotated[Optional[str], _o("--weight", name="weight")] = None,
    zeta: Annotated[Optional[float], _o("--zeta", name="zeta")] = None,
    vote: Annotated[Optional[str], _o("--vote", name="vote")] = None,
    vote_clip: Annotated[Optional[float], _o("--vote-clip", name="vote_clip")] = None,
    vote_norm: Annotated[Optional[str], _o("--vote-norm", name="vote_norm")] = None,
    detach_weight: Annotated[Optional[bool], _o("--detach-weight/--no-detach-weight", name="detach_weight")] = None,
    penalty_norm: Annotated[Optional[str], _o("--penalty-norm", name="penalty_norm")] = None,
    # optimization
    lr: Annotated[Optional[float], _o("--lr", name="lr")] = None,
    optimizer: Annotated[Optional[str], _o("--optimizer", name="optimizer")] = None,
    weight_decay: Annotated[Optional[float], _o("--weight-decay", name="weight_decay")] = None,
    warmup_steps: Annotated[Optional[int], _o("--warmup-steps", name="warmup_steps")] = None,
    lr_schedule: Annotated[Optional[str], _o("--lr-schedule", name="lr_schedule")] = None,
    max_grad_norm: Annotated[Optional[float], _o("--max-grad-norm", name="max_grad_norm")] = None,
    batch_size: Annotated[Optional[int], _o("--batch-size", name="batch_size")] = None,
    grad_accum: Annotated[Optional[int], _o("--grad-accum", name="grad_accum")] = None,
    epochs: Annotated[Optional[int], _o("--epochs", name="epochs")] = None,
    max_steps: Annotated[Optional[int], _o("--max-steps", name="max_steps")] = None,
    max_samples: Annotated[Optional[int], _o("--max-samples", name="max_samples")] = None,
    seed: Annotated[Optional[int], _o("--seed", name="seed")] = None,
    dtype: Annotated[Optional[str], _o("--dtype", name="dtype")] = None,
    device: Annotated[Optional[str], _o("--device", name="device")] = None,
    deterministic: Annotated[Optional[bool], _o("--deterministic/--no-deterministic", name="deterministic")] = None,
    # evaluation
    eval_data: Annotated[Optional[Path], _o("--eval-data", name="eval_data")] = None,
    eval_every: Annotated[Optional[int], _o("--eval-every", name="eval_every")] = None,
    eval_samples: Annotated[Optional[int], _o("--eval-samples", name="eval_samples")] = None,
    # checkpoints
    save_every: Annotated[Optional[int], _o("--save-every", name="save_every")] = None,
    keep_last: Annotated[Optional[int], _o("--keep-last", name="keep_last")] = None,
    resume: Annotated[Optional[bool], _o("--resume/--no-resume", name="resume")] = None,
    overwrite: Annotated[Optional[bool], _o("--overwrite/--no-overwrite", name="overwrite")] = None,
    # speed knobs
    chunk_size: Annotated[Optional[int], _o("--chunk-size", name="chunk_size")] = None,
    kernel: Annotated[Optional[str], _o("--kernel", name="kernel")] = None,
    skip_ygen: Annotated[Optional[bool], _o("--skip-ygen/--no-skip-ygen", name="skip_ygen")] = None,
    max_tokens_per_batch: Annotated[Optional[int], _o("--max-tokens-per-batch", name="max_tokens_per_batch")] = None,
    keep_probs_mb: Annotated[Optional[int], _o("--keep-probs-mb", name="keep_probs_mb")] = None,
    peak_tflops: Annotated[Optional[float], _o("--peak-tflops", name="peak_tflops")] = None,
    progress: Annotated[Optional[bool], _o("--progress/--no-progress", name="progress")] = None,
) -> None:
    """Train a policy: sft, dpo, simpo, or DPPO's minll, unll, conll (defaults: docs/method.md).

    Writes OUT/model (Hugging Face format + tokenizer), OUT/config.json, OUT/metrics.jsonl and resumable OUT/checkpoints/step_N.
    """
    options = {k: v for k, v in locals().items() if k != "config" and v is not None}
    from dppo.cli.main import user_errors  # imported here: main.py imports this module

    user_errors(_train)(config, options)


def _train(config: Path | None, options: dict) -> None:
    from dppo.config import load_config
    from dppo.train import train

    train(load_config(config, **options))

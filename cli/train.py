"""``dppo train``: parse the options, merge them over ``--config FILE``, call :func:`dppo.train.train`.

Every option defaults to "not given" (None) here, so that a value from the TOML file is overridden
only by an option that was actually typed; the real defaults live in :class:`dppo.train.config.TrainConfig`
and its help texts (shown by ``dppo train --help``). The loss options are not written here: they
are the registry's declarations (:mod:`dppo.train.registry`), turned into options by
:func:`train_command` (one help panel per set of methods that use them), so a loss registered in
Python or through the ``dppo.losses`` entry points gets its options on the command line.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from dppo.train.config import HELP
from dppo.train.registry import known_options, option_help, option_users


def _option(*names: str, name: str) -> typer.models.OptionInfo:
    return typer.Option(*names, help=HELP[name], show_default=False)


def train_cmd(
    method: Annotated[Optional[str], _option("--method", name="method")] = None,
    data: Annotated[Optional[Path], _option("--data", name="data")] = None,
    init: Annotated[Optional[str], _option("--init", name="init")] = None,
    out: Annotated[Optional[Path], _option("--out", name="out")] = None,
    ref: Annotated[Optional[str], _option("--ref", name="ref")] = None,
    tokenizer: Annotated[Optional[Path], _option("--tokenizer", name="tokenizer")] = None,
    config: Annotated[
        Optional[Path],
        typer.Option("--config", help="TOML file whose keys mirror these options (grad_accum = 8); options given here override it."),
    ] = None,
    # the loss's options come from the registry (train_command); its schedule
    alpha_schedule: Annotated[Optional[str], _option("--alpha-schedule", name="alpha_schedule")] = None,
    alpha_end: Annotated[Optional[float], _option("--alpha-end", name="alpha_end")] = None,
    alpha_steps: Annotated[Optional[str], _option("--alpha-steps", name="alpha_steps")] = None,
    # optimization
    lr: Annotated[Optional[float], _option("--lr", name="lr")] = None,
    optimizer: Annotated[Optional[str], _option("--optimizer", name="optimizer")] = None,
    weight_decay: Annotated[Optional[float], _option("--weight-decay", name="weight_decay")] = None,
    warmup_steps: Annotated[Optional[int], _option("--warmup-steps", name="warmup_steps")] = None,
    lr_schedule: Annotated[Optional[str], _option("--lr-schedule", name="lr_schedule")] = None,
    max_grad_norm: Annotated[Optional[float], _option("--max-grad-norm", name="max_grad_norm")] = None,
    batch_size: Annotated[Optional[int], _option("--batch-size", name="batch_size")] = None,
    grad_accum: Annotated[Optional[int], _option("--grad-accum", name="grad_accum")] = None,
    epochs: Annotated[Optional[int], _option("--epochs", name="epochs")] = None,
    max_steps: Annotated[Optional[int], _option("--max-steps", name="max_steps")] = None,
    max_samples: Annotated[Optional[int], _option("--max-samples", name="max_samples")] = None,
    seed: Annotated[Optional[int], _option("--seed", name="seed")] = None,
    dtype: Annotated[Optional[str], _option("--dtype", name="dtype")] = None,
    device: Annotated[Optional[str], _option("--device", name="device")] = None,
    deterministic: Annotated[Optional[bool], _option("--deterministic/--no-deterministic", name="deterministic")] = None,
    parallel: Annotated[Optional[str], _option("--parallel", name="parallel")] = None,
    dist_timeout: Annotated[Optional[float], _option("--dist-timeout", name="dist_timeout")] = None,
    report_to: Annotated[Optional[str], _option("--report-to", name="report_to")] = None,
    # parameter-efficient training and memory
    lora_r: Annotated[Optional[int], _option("--lora-r", name="lora_r")] = None,
    lora_alpha: Annotated[Optional[float], _option("--lora-alpha", name="lora_alpha")] = None,
    lora_dropout: Annotated[Optional[float], _option("--lora-dropout", name="lora_dropout")] = None,
    lora_targets: Annotated[Optional[str], _option("--lora-targets", name="lora_targets")] = None,
    lora_modules_to_save: Annotated[Optional[str], _option("--lora-modules-to-save", name="lora_modules_to_save")] = None,
    merge: Annotated[Optional[bool], _option("--merge/--no-merge", name="merge")] = None,
    gradient_checkpointing: Annotated[
        Optional[bool], _option("--gradient-checkpointing/--no-gradient-checkpointing", name="gradient_checkpointing")
    ] = None,
    # evaluation
    eval_data: Annotated[Optional[Path], _option("--eval-data", name="eval_data")] = None,
    eval_every: Annotated[Optional[int], _option("--eval-every", name="eval_every")] = None,
    eval_samples: Annotated[Optional[int], _option("--eval-samples", name="eval_samples")] = None,
    # checkpoints
    save_every: Annotated[Optional[int], _option("--save-every", name="save_every")] = None,
    keep_last: Annotated[Optional[int], _option("--keep-last", name="keep_last")] = None,
    resume: Annotated[Optional[bool], _option("--resume/--no-resume", name="resume")] = None,
    overwrite: Annotated[Optional[bool], _option("--overwrite/--no-overwrite", name="overwrite")] = None,
    # speed knobs
    chunk_size: Annotated[Optional[int], _option("--chunk-size", name="chunk_size")] = None,
    kernel: Annotated[Optional[str], _option("--kernel", name="kernel")] = None,
    skip_ygen: Annotated[Optional[bool], _option("--skip-ygen/--no-skip-ygen", name="skip_ygen")] = None,
    max_tokens_per_batch: Annotated[Optional[int], _option("--max-tokens-per-batch", name="max_tokens_per_batch")] = None,
    keep_probs_mb: Annotated[Optional[int], _option("--keep-probs-mb", name="keep_probs_mb")] = None,
    peak_tflops: Annotated[Optional[float], _option("--peak-tflops", name="peak_tflops")] = None,
    progress: Annotated[Optional[bool], _option("--progress/--no-progress", name="progress")] = None,
    nproc_per_node: Annotated[
        Optional[int],
        typer.Option("--nproc-per-node", min=1, help="Start N processes on this machine with torch's launcher (as "
                     "`torchrun --standalone --nproc-per-node N -m dppo train ...`), one GPU each on CUDA."),
    ] = None,
    plan: Annotated[
        bool, typer.Option("--plan", help="Print the memory each rank needs (parameters, gradients, optimizer state, "
                           "activations) for these options on this many ranks (--nproc-per-node, WORLD_SIZE under torchrun, else 1), and train nothing."),
    ] = False,
    **loss_options: Any,
) -> None:
    """Train a policy: sft, dpo, simpo, or DPPO's minll, unll, conll (defaults: docs/method.md).

    Writes OUT/model (Hugging Face format + tokenizer), OUT/config.json, OUT/metrics.jsonl and resumable OUT/checkpoints/step_N.
    """
    given = {**{k: v for k, v in locals().items() if k != "loss_options"}, **loss_options}
    options = {k: v for k, v in given.items() if k not in ("config", "nproc_per_node", "plan") and v is not None}
    from dppo.cli.main import user_errors  # imported here: main.py imports this module

    if nproc_per_node is not None and not plan:
        user_errors(_launch)(nproc_per_node, config, options)
        return
    user_errors(_train)(config, options, plan, nproc_per_node)


def _launch(nproc: int, config: Path | None, options: dict) -> None:
    """The same options in N processes started by torch's elastic launcher."""
    from dppo.distributed import launch

    argv = ["train"] + (["--config", str(config)] if config is not None else [])
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    launch(nproc, argv)


def _train(config: Path | None, options: dict, plan: bool, world: int | None = None) -> None:
    from dppo.train.config import load_config

    cfg = load_config(config, **options)
    if plan:
        from dppo.train.memory import print_plan

        print_plan(cfg, world=world)
        return
    from dppo.train import train

    train(cfg)


def train_command() -> Callable[..., None]:
    """:func:`train_cmd` with one option per loss option the registry declares now, each in the help
    panel of the methods that use it (``Loss: minll, unll, conll``), after ``--config``."""
    signature = inspect.signature(train_cmd, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    at = [p.name for p in fixed].index("config") + 1
    params = fixed[:at] + [_loss_parameter(name) for name in known_options()] + fixed[at:]

    @functools.wraps(train_cmd)
    def command(**options: Any) -> None:
        train_cmd(**options)

    command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _panel(users: list[str]) -> str:
    """``Loss: minll, unll, conll``; an option of many methods (beta) in one shared panel."""
    if not users:
        return "Loss: combinations A+B"
    return "Loss: " + (", ".join(users) if len(users) <= 6 else "most methods")


def _loss_parameter(name: str) -> inspect.Parameter:
    opt = known_options()[name]
    decl = f"{opt.flag}/--no-{opt.flag[2:]}" if opt.type is bool else opt.flag
    info = typer.Option(decl, help=option_help(name), show_default=False,
                        rich_help_panel=_panel(option_users(name)))
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                             annotation=Annotated[Optional[str if opt.words else opt.type], info])  # type: ignore[name-defined]

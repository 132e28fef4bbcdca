"""The training configuration: every option of ``dppo train``, its default, and its validation.

One frozen dataclass, :class:`TrainConfig`, holds the resolved values. Its fields are the run's own
options; the loss's options are those the method's registry entry declares
(:mod:`dppo.train.registry`): given as keywords like the others, checked by their declarations,
the method's defaults filling in the ones not given (``docs/method.md``: beta 0.01; alpha 10 for
minll, 0.1 for unll and conll; ...), held in ``loss_options`` and read as attributes. Options of
other losses are refused; in ``RUN/config.json`` every registered loss option appears, None where
the method does not use it, so the saved configuration always shows the values that were used.

    cfg = TrainConfig(method="unll", data="data/prefs", init="runs/sft/model", out="runs/unll")
    cfg.alpha, cfg.ref          # 0.1, "runs/sft/model" (the reference defaults to --init)

:func:`load_config` reads a TOML file whose keys mirror the options (``grad_accum = 8`` or
``grad-accum = 8``) and applies keyword overrides on top: that is how the command line overrides the
file. Invalid values raise :class:`dppo.errors.ConfigError` naming the option.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dppo.errors import ConfigError
from dppo.train.registry import BUILTIN, LOSSES, LossConfig, known_options, loss_spec, option_users  # torch-free

__all__ = ["TrainConfig", "load_config", "option_names", "OPTIMIZERS", "LR_SCHEDULES", "TRAIN_DTYPES",
           "RUNTIME_OPTIONS", "HELP", "TRAIN_FIELDS"]

OPTIMIZERS = ("adamw", "rmsprop", "sgd")
LR_SCHEDULES = ("constant", "linear", "cosine")
ALPHA_SCHEDULES = ("constant", "linear", "cosine", "step")
TRAIN_DTYPES = ("auto", "bf16", "fp32")

# Options that change how a run is carried out, not what it computes: `--resume` accepts a run whose
# saved configuration differs from the new one only in these.
RUNTIME_OPTIONS = frozenset(
    {"out", "resume", "overwrite", "progress", "save_every", "keep_last", "eval_every", "eval_data", "eval_samples", "peak_tflops",
     "parallel", "dist_timeout", "report_to", "device", "max_tokens_per_batch", "gradient_checkpointing"}
)


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, kw_only=True, init=False)
class TrainConfig:
    """Every option of one training run (``dppo train --help`` shows the same texts).

    ``TrainConfig(**options)`` takes the fields below and the loss options of the registry's entries
    (``beta=0.1``), read back as attributes (``cfg.beta``; None for an option the method does not use).
    """

    # -- what to train ------------------------------------------------------------------------------
    method: str = _opt(None, f"Training objective: {'|'.join(BUILTIN)}, or a loss registered with register_loss "
                             "or installed through the dppo.losses entry points.")
    data: str = _opt(None, "Prepared shards folder (`dppo prep sft` for sft, `dppo prep prefs` for the others).")
    init: str = _opt(None, "Initial policy: a Hugging Face model folder or hub id.")
    out: str = _opt(None, "Run folder: model/, config.json, metrics.jsonl, checkpoints/.")
    ref: str | None = _opt(None, "Reference model (default: --init). DPO post-tuning: --init RUN/model --ref RUN/model.")
    tokenizer: str | None = _opt(
        None, "Tokenizer folder saved with the model (default: --init's, else the one the shards were prepared with)."
    )
    # -- the loss: the options the method's registry entry declares (None: not given / not used) -----
    loss_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "the loss's options by name"})
    alpha_schedule: str = _opt(
        "constant", "How alpha moves over the optimizer steps s = 0..S-1: constant|linear|cosine|step, from --alpha "
        "to --alpha-end (linear: alpha + (end - alpha) s / (S - 1); cosine: end + (alpha - end)(1 + cos(pi s / (S - 1))) / 2; "
        "step: equal moves at the --alpha-steps)."
    )
    alpha_end: float | None = _opt(None, "The last step's alpha under a non-constant --alpha-schedule.")
    alpha_steps: str | None = _opt(
        None, "--alpha-schedule step: comma-separated step indices where alpha moves (equal moves; --alpha-end at the last)."
    )
    # -- optimization --------------------------------------------------------------------------------
    lr: float = _opt(1e-6, "Peak learning rate.")
    optimizer: str = _opt("adamw", "Optimizer: adamw|rmsprop|sgd (torch defaults otherwise; the author used rmsprop).")
    weight_decay: float = _opt(0.0, "Decoupled weight decay (AdamW) or L2 (RMSprop, SGD) on matrices, not on biases or norms.")
    warmup_steps: int = _opt(150, "Linear warm-up: update t (0-based) uses lr * min(1, (t + 1) / warmup_steps).")
    lr_schedule: str = _opt("constant", "After warm-up: constant|linear|cosine (decay to 0 at the last step).")
    max_grad_norm: float = _opt(1.0, "Clip the gradient's global 2-norm to this value; 0 disables clipping.")
    batch_size: int = _opt(4, "Examples per micro-batch at most (one packed row, no padding; see --max-tokens-per-batch).")
    grad_accum: int = _opt(8, "A step averages batch_size * grad_accum examples (the mean over them, however they are split).")
    max_tokens_per_batch: int | None = _opt(
        None, "Token budget of a micro-batch (its examples' sequences in one packed row; the reference pass and "
        "evaluation use it too). Default: from the memory left after the model (docs/training.md)."
    )
    epochs: int = _opt(1, "Passes over the data (reshuffled each epoch).")
    max_steps: int | None = _opt(None, "Stop after this many optimizer steps (overrides --epochs).")
    max_samples: int | None = _opt(None, "Use only the first N examples of --data (the data-efficiency study).")
    seed: int = _opt(0, "Seed of the data order and of every random number generator.")
    dtype: str = _opt(
        "auto", "auto|bf16|fp32. bf16: fp32 master weights, bf16 autocast compute (auto: bf16 on CUDA, fp32 elsewhere)."
    )
    device: str = _opt("auto", "auto|cpu|cuda|cuda:N (auto: CUDA when available).")
    parallel: str = _opt(
        "auto", "Under torchrun: fsdp (FSDP2 per decoder layer and the root) or ddp (replicas); auto: fsdp under "
        "torchrun, none in one process (docs/distributed.md)."
    )
    dist_timeout: float = _opt(600.0, "Seconds a rank waits for the others (joining, and at each collective) before failing.")
    deterministic: bool = _opt(
        False, "Use deterministic kernels where they exist (torch.use_deterministic_algorithms): a resumed CUDA run "
        "then repeats an uninterrupted one bit for bit, at some speed."
    )
    # -- parameter-efficient training and memory ------------------------------------------------------
    lora_r: int = _opt(0, "LoRA rank (peft): train low-rank adapters instead of every weight; 0: full fine-tuning.")
    lora_alpha: float | None = _opt(None, "LoRA scaling alpha (the update is alpha / r * B @ A; default 2 x --lora-r).")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA branch's input (0: the policy's forward stays deterministic).")
    lora_targets: str = _opt(
        "all-linear", "Modules that get adapters: all-linear (every linear layer of the decoder, not the LM head) "
        "or comma-separated module names (q_proj,v_proj)."
    )
    lora_modules_to_save: str | None = _opt(
        None, "Comma-separated modules trained in full beside the adapters (embed_tokens,lm_head)."
    )
    merge: bool = _opt(True, "With LoRA: also write RUN/model/, the base model with the adapters merged in (--no-merge: RUN/adapter/ only).")
    gradient_checkpointing: bool = _opt(
        False, "Recompute each decoder layer in the backward pass instead of keeping its activations (less memory, "
        "about a third more compute; the gradients are the same)."
    )
    # -- evaluation ----------------------------------------------------------------------------------
    eval_data: str | None = _opt(None, "Shards to evaluate the loss and reward accuracy on.")
    eval_every: int = _opt(0, "Evaluate every N optimizer steps (0: only after the last step).")
    eval_samples: int | None = _opt(None, "Evaluate on the first N examples of --eval-data only.")
    # -- checkpoints ---------------------------------------------------------------------------------
    save_every: int = _opt(500, "Write a resumable checkpoint every N optimizer steps (0: never).")
    keep_last: int = _opt(2, "Keep this many most recent checkpoints (0: keep all).")
    resume: bool = _opt(False, "Continue the run in --out from its latest checkpoint (bit-identical on CPU in fp32).")
    overwrite: bool = _opt(False, "Replace an existing run in --out.")
    # -- speed knobs (results do not depend on them, up to float rounding) ----------------------------
    chunk_size: int = _opt(1024, "Tokens whose vocabulary logits are formed at once (never the full [T, V] logits).")
    kernel: str = _opt("auto", "Packed attention kernel: auto|varlen|sdpa_loop|dense.")
    skip_ygen: bool = _opt(True, "Skip the y_gen forward of examples whose penalty weight is exactly zero.")
    keep_probs_mb: int = _opt(
        1024, "Keep a micro-batch's [tokens x vocab] softmax for backward when it fits in this many MiB "
        "(saves a third of the output projection's work); 0: always recompute it."
    )
    peak_tflops: float | None = _opt(None, "Peak TFLOP/s of the accelerator for the MFU estimate (default: known GPUs).")
    report_to: str = _opt("none", "Also log the scalars to tensorboard (RUN/tensorboard/) and/or wandb: a comma-separated list.")
    progress: bool = _opt(True, "Show a progress bar (on a terminal).")

    def __init__(self, **options: Any) -> None:
        loss = dict(options.pop("loss_options", None) or {})
        known = known_options()
        loss.update({k: options.pop(k) for k in list(options) if k in known})
        unknown = sorted(set(options) - set(TRAIN_FIELDS))
        if unknown:
            raise ConfigError(f"unknown option(s) {[_flag(k) for k in unknown]}")
        for f in dataclasses.fields(self):
            if f.name != "loss_options":
                object.__setattr__(self, f.name, options.get(f.name, f.default))
        object.__setattr__(self, "loss_options", loss)
        self.__post_init__()

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self.to_dict().items())))

    def __getattr__(self, name: str) -> Any:  # a loss option: its value, None where the method does not use it
        if not name.startswith("_") and name != "loss_options" and name in known_options():
            return self.loss_options.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __post_init__(self) -> None:
        for name in ("method", "data", "init", "out"):
            if getattr(self, name) in (None, ""):
                raise ConfigError(f"missing {_flag(name)} (on the command line or as `{name}` in the --config file)")
        try:
            loss_spec(self.method)  # the one place a method name is resolved
        except ValueError:
            raise ConfigError(f"{_flag('method')} must be one of {'|'.join(LOSSES)}, got {self.method!r}") from None
        self._check_types()
        object.__setattr__(self, "loss_options", _resolve_loss_options(self.method, self.loss_options))
        for name in known_options():  # plain attributes: read at no cost (None where the method does not use it)
            object.__setattr__(self, name, self.loss_options.get(name))
        for name in ("data", "init", "out", "ref", "tokenizer", "eval_data"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        # The reference defaults to the initial policy; methods without one refuse --ref.
        spec = loss_spec(self.method)
        if not spec.needs_reference and self.ref is not None:
            raise ConfigError(f"--ref is not used by --method {self.method} (it has no reference model)")
        object.__setattr__(self, "ref", (self.ref or self.init) if spec.needs_reference else None)
        self._check_values()

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "loss_options":
                continue
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else str(f.type)
            if value is None:
                if "None" not in kind:
                    raise ConfigError(f"{_flag(f.name)} must not be empty")
                continue
            if kind.startswith("bool"):
                ok = isinstance(value, bool)
            elif kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok:
                    object.__setattr__(self, f.name, float(value))
            else:  # str (paths may come as Path)
                ok = isinstance(value, (str, os.PathLike))
            if not ok:
                raise ConfigError(f"{_flag(f.name)} must be {kind.split(' ')[0]}, got {value!r}")

    def _check_values(self) -> None:
        from dppo.modeling import KERNELS  # the packed attention's kernels, named where they live

        choices = {"optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES, "dtype": TRAIN_DTYPES, "kernel": KERNELS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_flag(name)} must be one of {'|'.join(allowed)}, got {getattr(self, name)!r}")
        positive = ("batch_size", "grad_accum", "epochs", "max_steps", "max_samples", "chunk_size", "max_tokens_per_batch", "eval_samples")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{_flag(name)} must be >= 1, got {value}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_last", "seed", "keep_probs_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{_flag(name)} must be a finite number >= 0, got {value}")
        if not (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.kernel == "varlen":
            self._check_varlen()
        from dppo.train.parallel import PARALLEL
        from dppo.train.report import parse_report_to

        if self.parallel not in PARALLEL:
            raise ConfigError(f"--parallel must be one of {'|'.join(PARALLEL)}, got {self.parallel!r}")
        if not self.dist_timeout > 0:
            raise ConfigError(f"--dist-timeout must be > 0, got {self.dist_timeout}")
        parse_report_to(self.report_to)
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"{_flag('peak_tflops')} must be > 0, got {self.peak_tflops}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        self._check_alpha_schedule()
        if self.lora_r < 0:
            raise ConfigError(f"--lora-r must be >= 0 (0: no LoRA), got {self.lora_r}")
        if self.lora_r == 0:
            given = [n for n in ("lora_alpha", "lora_modules_to_save") if getattr(self, n) is not None]
            given += [n for n, d in (("lora_dropout", 0.0), ("lora_targets", "all-linear"), ("merge", True)) if getattr(self, n) != d]
            if given:
                raise ConfigError(f"{_flag(given[0])} needs --lora-r > 0 (LoRA is off)")
        else:
            if self.lora_alpha is None:
                object.__setattr__(self, "lora_alpha", float(2 * self.lora_r))
            if not self.lora_alpha > 0:
                raise ConfigError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
            if not 0 <= self.lora_dropout < 1:
                raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
            if not self.lora_targets.strip():
                raise ConfigError("--lora-targets must name modules, or be all-linear")
        if self.eval_data is None:
            for name in ("eval_every", "eval_samples"):
                if getattr(self, name) not in (None, 0):
                    raise ConfigError(f"{_flag(name)} needs --eval-data")

    def _check_varlen(self) -> None:
        """The flash varlen kernel runs on CUDA in bf16 only: refuse it here rather than at the first forward."""
        import torch

        cuda = self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())
        if not cuda:
            where = "--device cpu" if self.device == "cpu" else "this machine has no CUDA device"
            raise ConfigError(f"--kernel varlen runs on CUDA only ({where}): use --kernel auto, sdpa_loop or dense")
        if self.dtype == "fp32":
            raise ConfigError("--kernel varlen runs in bf16 only (--dtype fp32 given): use --dtype bf16 or auto, or --kernel auto")

    def _check_alpha_schedule(self) -> None:
        if self.alpha_schedule not in ALPHA_SCHEDULES:
            raise ConfigError(f"--alpha-schedule must be one of {'|'.join(ALPHA_SCHEDULES)}, got {self.alpha_schedule!r}")
        scheduled = self.alpha_schedule != "constant"
        if (scheduled or self.alpha_end is not None or self.alpha_steps is not None) and self.alpha is None:
            raise ConfigError(f"--alpha-schedule, --alpha-end and --alpha-steps need a method with a penalty strength "
                              f"alpha ({', '.join(option_users('alpha'))}), not --method {self.method}")
        if scheduled and self.alpha_end is None:
            raise ConfigError(f"--alpha-schedule {self.alpha_schedule} needs --alpha-end (the last step's alpha)")
        if not scheduled and self.alpha_end is not None:
            raise ConfigError("--alpha-end needs --alpha-schedule linear|cosine|step")
        if self.alpha_end is not None and (not math.isfinite(self.alpha_end) or self.alpha_end < 0):
            raise ConfigError(f"--alpha-end must be a finite number >= 0, got {self.alpha_end}")
        if (self.alpha_schedule == "step") != (self.alpha_steps is not None):
            raise ConfigError("--alpha-steps goes with --alpha-schedule step (and it needs them)")
        if self.alpha_steps is not None:
            try:
                steps = [int(x) for x in self.alpha_steps.split(",") if x.strip()]
            except ValueError:
                raise ConfigError(f"--alpha-steps must be comma-separated step indices, got {self.alpha_steps!r}") from None
            if not steps or steps != sorted(set(steps)) or steps[0] < 0:
                raise ConfigError(f"--alpha-steps must be increasing step indices >= 0, got {self.alpha_steps!r}")

    # -- derived values ------------------------------------------------------------------------------
    def loss_config(self) -> LossConfig:
        """The :class:`LossConfig` of this run (already validated)."""
        return LossConfig.defaults(self.method, **{k: v for k, v in self.loss_options.items() if v is not None})

    @property
    def step_examples(self) -> int:
        """Examples averaged in one optimizer step."""
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        """Every option by name, flat (``RUN/config.json``): every registered loss option in the
        loss's place, None where this method does not use it."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "loss_options":
                out.update({k: self.loss_options.get(k) for k in known_options()})
            else:
                out[f.name] = getattr(self, f.name)
        return out


def _resolve_loss_options(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The value of each option ``method``'s entry declares (its default where not given, None where a
    condition turns it off), from the declarations; ``ConfigError`` naming the option otherwise."""
    spec = loss_spec(method)
    given = {k: v for k, v in given.items() if v is not None}
    unused = [k for k in given if spec.option(k) is None]
    if unused:
        users = sorted(option_users(unused[0]))
        raise ConfigError(f"{_flag(unused[0])} is not used by --method {method}"
                          + (f" (it applies to {', '.join(users)})" if users else
                             " (it weighs the terms of a combination, --method A+B)" if unused[0] == "loss_weights" else ""))
    try:
        loss = LossConfig.defaults(method, **given)
    except ValueError as e:
        name = str(e).split(" ")[0]
        raise ConfigError(f"{_flag(name)}: {e}" if spec.option(name) else str(e)) from None
    values: dict[str, Any] = {}
    for opt in spec.options:
        on = opt.when is None or loss.values[opt.when[0]] == opt.when[1]
        if not on and opt.name in given:
            other, want = opt.when
            raise ConfigError(f"{opt.flag} is used by {_flag(other)} {want} only (this run's {other} is {loss.values[other]})")
        values[opt.name] = loss.values[opt.name] if on else None
    return values


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "loss_options")
"""The run's own options (the fields of :class:`TrainConfig`), not a loss's."""


def option_names() -> tuple[str, ...]:
    """Every option ``dppo train`` and its ``--config`` file take: the run's own and every registered loss's."""
    return TRAIN_FIELDS + tuple(known_options())


def _help(f: dataclasses.Field) -> str:
    text, default = f.metadata["help"], f.default
    if default is None or "default" in text:
        return text
    shown = ("on" if default else "off") if isinstance(default, bool) else f"{default:g}" if isinstance(default, float) else default
    return f"{text} (default {shown})"


HELP: dict[str, str] = {f.name: _help(f) for f in dataclasses.fields(TrainConfig) if f.name != "loss_options"}
"""The help text of every run option with its default, for the command line (the loss options' help
comes from their declarations: :func:`dppo.cli.train.loss_option_help`)."""


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options of a TOML file (flat keys mirroring the options, dashes or underscores)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a valid TOML file ({e})") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            raise ConfigError(f"{path}: tables are not supported ([{key}]); write the options as top-level keys")
        names = option_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"{path}: unknown option `{key}`{hint}")
        values[name] = value
    return values


def load_config(config_file: str | os.PathLike[str] | None = None, **options: Any) -> TrainConfig:
    """Defaults, then the TOML file's values, then ``options`` (``None`` values are ignored).

    ``options`` use the field names of :class:`TrainConfig` (``grad_accum=8``).
    """
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}")
    values = read_toml(config_file) if config_file is not None else {}
    values.update({k: v for k, v in options.items() if v is not None})
    return TrainConfig(**values)

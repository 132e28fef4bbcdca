"""``dppo``: the command layer. Each command parses its options and calls one library function;
errors the user can fix are printed as one red line (exit code 1), never as a traceback."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup


class _Commands(TyperGroup):
    """The top-level group: ``dppo train`` and ``dppo curriculum`` are built when they run (``--help``
    included), after the losses other packages declare (``dppo.losses`` entry points) are registered,
    so their options are options of the commands; ``dppo --help`` and the other commands never load them."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if name in ("train", "curriculum"):
            from dppo.cli.curriculum import curriculum_command
            from dppo.cli.train import train_command
            from dppo.train.registry import load_entry_points

            user_errors(load_entry_points)()
            fn = train_command() if name == "train" else user_errors(curriculum_command())
            command = typer.main.get_command(_single(name, fn))
            command.name = name
        return name, command, rest


def _single(name: str, fn: Callable[..., object]) -> typer.Typer:
    one = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    one.command(name)(fn)
    return one


app = typer.Typer(
    cls=_Commands,
    name="dppo",
    help="Align language models with preference data: DPO plus direct on-policy penalization (DPPO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from dppo import __version__

        typer.echo(f"dppo {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Align language models with preference data: DPO plus direct on-policy penalization (DPPO)."""
prep_app = typer.Typer(help="Tokenize, apply the chat template, truncate and write data into memory-mapped shards.", invoke_without_command=True)
app.add_typer(prep_app, name="prep")

err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., object])


def print_error(message: str, *, label: str = "error:", style: str = "bold red") -> None:
    """One line on stderr: ``label`` in ``style``, then ``message`` as plain text. The message is never
    read as rich markup, so paths, values and library messages with brackets (``/tmp/[red]a.jsonl``,
    gloo's ``[/__w/pytorch/.../pair.cc:545]``) are shown exactly as they are."""
    from rich.text import Text

    err_console.print(Text.assemble((label, style), " ", message), highlight=False, soft_wrap=True)


def user_errors(fn: F) -> F:
    """Turn the library's user-facing errors into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        from dppo.errors import USER_ERRORS, storage_error_line

        from dppo.console import library_output_to

        try:
            log = _log_file(fn.__name__, args, kwargs)
            with library_output_to(log) if log is not None else contextlib.nullcontext():
                return fn(*args, **kwargs)
        except USER_ERRORS as e:
            print_error(f"{_rank()}{e}")
            raise typer.Exit(1) from None
        except Exception as e:  # a folder that cannot be written, or a rank of the job that was lost
            line = storage_error_line(e, _out_option(args, kwargs))  # read-only, full, not permitted (also when a library wrapped it)
            if line is None and isinstance(e, RuntimeError) and _lost_a_rank(e):  # a collective that failed
                first = str(e).strip().splitlines()[0][:300]
                line = f"lost contact with another rank of the job ({first}); torchrun names the rank that failed"
            if line is None:
                raise
            print_error(f"{_rank()}{line}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _log_file(name: str, args: tuple, kwargs: dict) -> Path | None:
    """Where a command's library warnings and messages go (torch's, transformers', peft's): OUT/COMMAND.log
    (``dppo generate``: OUT.log beside its output file); None (left as they are) without --out, and
    for the launcher (each rank it starts logs for itself)."""
    out = _out_option(args, kwargs)
    command = name.removesuffix("_cmd").lstrip("_").split("_")[0]
    if out is None or command == "launch":
        return None
    out = Path(str(out))
    return out.with_name(out.name + ".log") if command == "generate" else out / f"{command}.log"


def _out_option(args: tuple, kwargs: dict) -> object:
    """The command's --out (train passes its options as a dict), or None."""
    for value in (kwargs, *args):
        if isinstance(value, dict) and value.get("out") is not None:
            return value["out"]
    return None


def _rank() -> str:
    """``rank R: `` under torchrun (every rank prints its own errors), else nothing."""
    import os

    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""


def _lost_a_rank(e: BaseException) -> bool:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    text = str(e)
    markers = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "timed out", "Timeout")
    return type(e).__name__ in ("DistBackendError", "DistNetworkError", "DistError") or any(m in text for m in markers)


# -- shared options ---------------------------------------------------------------------------
Data = Annotated[str, typer.Option("--data", help="Hugging Face hub data set id, or a local parquet/jsonl/json/arrow file or folder.")]
Tokenizer = Annotated[str, typer.Option("--tokenizer", help="Hub id or local folder with tokenizer.json and tokenizer_config.json.")]
Out = Annotated[Path, typer.Option("--out", help="Output folder for the shards.")]
Split = Annotated[Optional[str], typer.Option("--split", help="Split of a hub data set (default: train).")]
Config = Annotated[Optional[str], typer.Option("--config", help="Configuration (subset) name of a hub data set.")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Revision (branch, tag or commit) of a hub data set.")]
MaxLen = Annotated[str, typer.Option("--max-len", help="Maximum sequence length in tokens: 'auto' (the --percentile of full-sequence lengths) or an integer.")]
Percentile = Annotated[float, typer.Option("--percentile", help="Percentile of full-sequence token lengths used by --max-len auto.")]
MaxPromptLen = Annotated[Optional[int], typer.Option("--max-prompt-len", help="Longest prompt of an example that does not fit --max-len (default: max_len - 21, at least max_len / 2); an example that fits is never cut.")]
TruncatePrompt = Annotated[str, typer.Option("--truncate-prompt", help="Which part of a too-long user turn a shortened prompt keeps: start or end. The template's tokens (system turn, headers, the generation header last) are always kept.")]
Strict = Annotated[bool, typer.Option("--strict", help="Stop at the first bad row with an error naming it, instead of skipping and counting.")]
Overwrite = Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="Replace shards already in the output folder.")]
ShowProgress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars and the summary table.")]
Turns = Annotated[str, typer.Option("--turns", help="first: a conversation's first exchange only (the paper's reading); all: the whole conversation (SFT: every assistant turn is a label span; prefs: the history shared by chosen and rejected is the prompt).")]


def _turns(value: str) -> str:
    if value not in ("first", "all"):
        raise typer.BadParameter(f"expected first or all, got {value!r}", param_hint="--turns")
    return value


def _truncate(value: str) -> str:
    if value not in ("start", "end"):
        raise typer.BadParameter(f"expected start or end, got {value!r}", param_hint="--truncate-prompt")
    return value


def _max_len(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise typer.BadParameter(f"expected 'auto' or an integer, got {value!r}", param_hint="--max-len") from None
    if n <= 0:
        raise typer.BadParameter("must be positive", param_hint="--max-len")
    return n


@prep_app.callback()
@user_errors
def prep_default(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Folder for the default data sets.")] = Path("data"),
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Hub id or local folder with tokenizer.json (default: Qwen/Qwen2.5-0.5B).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Without a subcommand: prepare the paper's data (SmolTalk SFT, UltraFeedback train_prefs and
    test_prefs) with the Qwen2.5-0.5B tokenizer into OUT/sft, OUT/prefs-train_prefs, OUT/prefs-test_prefs."""
    if ctx.invoked_subcommand is not None:
        return
    from dppo.data.prep import prepare_defaults

    prepare_defaults(out, tokenizer=tokenizer, overwrite=overwrite)


@prep_app.command("sft")
@user_errors
def prep_sft(
    data: Data,
    tokenizer: Tokenizer,
    out: Out,
    split: Split = None,
    config: Config = None,
    revision: Revision = None,
    max_len: MaxLen = "auto",
    percentile: Percentile = 95.0,
    max_prompt_len: MaxPromptLen = None,
    truncate_prompt: TruncatePrompt = "start",
    turns: Turns = "first",
    strict: Strict = False,
    overwrite: Overwrite = False,
    progress: ShowProgress = True,
) -> None:
    """Chat SFT data in the SmolTalk schema (`messages`): labels on the assistant turn (--turns first: the first exchange; all: every assistant turn of the conversation)."""
    from dppo.data.prep import PrepConfig, prepare
    from dppo.data.sources import DataSource

    prepare(PrepConfig("sft", DataSource(data, split, config, revision), tokenizer, out,
                       max_len=_max_len(max_len), percentile=percentile, max_prompt_len=max_prompt_len,
                       truncate_prompt=_truncate(truncate_prompt), turns=_turns(turns), strict=strict, overwrite=overwrite),
            show_progress=progress)


@prep_app.command("prefs")
@user_errors
def prep_prefs(
    data: Data,
    tokenizer: Tokenizer,
    out: Out,
    ygen: Annotated[Optional[Path], typer.Option("--ygen", help="y_gen file (parquet or jsonl with prompt_id, response), as `dppo generate` writes it.")] = None,
    allow_missing_ygen: Annotated[bool, typer.Option("--allow-missing-ygen", help="Drop (and count) pairs whose prompt_id has no y_gen, instead of failing.")] = False,
    split: Split = None,
    config: Config = None,
    revision: Revision = None,
    max_len: MaxLen = "auto",
    percentile: Percentile = 95.0,
    max_prompt_len: MaxPromptLen = None,
    truncate_prompt: TruncatePrompt = "start",
    turns: Turns = "first",
    strict: Strict = False,
    overwrite: Overwrite = False,
    progress: ShowProgress = True,
) -> None:
    """Preference pairs in the UltraFeedback-binarized schema, joined by prompt_id with y_gen (--turns all: chosen and rejected are whole conversations sharing their history)."""
    from dppo.data.prep import PrepConfig, prepare
    from dppo.data.sources import DataSource

    prepare(PrepConfig("prefs", DataSource(data, split, config, revision), tokenizer, out, ygen=ygen,
                       max_len=_max_len(max_len), percentile=percentile, max_prompt_len=max_prompt_len,
                       truncate_prompt=_truncate(truncate_prompt), turns=_turns(turns), strict=strict,
                       allow_missing_ygen=allow_missing_ygen, overwrite=overwrite), show_progress=progress)


# -- the other stages, each in its own module ----------------------------------------------------
from dppo.cli.curriculum import curriculum_cmd  # noqa: E402
from dppo.cli.demo import demo_cmd  # noqa: E402
from dppo.cli.generate_eval import eval_cmd, generate_cmd  # noqa: E402
from dppo.cli.train import train_command  # noqa: E402

app.command("train")(train_command())  # rebuilt with the installed losses' options when it runs
app.command("generate")(user_errors(generate_cmd))
app.command("eval")(user_errors(eval_cmd))
app.command("demo")(user_errors(demo_cmd))
app.command("curriculum")(user_errors(curriculum_cmd))


@app.command("plot")
@user_errors
def plot_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (each with metrics.jsonl), drawn overlaid.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the PNGs (default: the first run's plots/).")] = None,
) -> None:
    """Loss, rewards, margins, the penalised fraction and the learning rate against step, runs overlaid."""
    from dppo.train.plots import plot_runs

    paths = plot_runs(runs, out)
    from rich.text import Text

    err_console.print(Text(f"{len(paths)} figures in {paths[0].parent}/: " + ", ".join(p.name for p in paths)), highlight=False)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()

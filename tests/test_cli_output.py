"""What the command line prints for a person: errors as one verbatim line (brackets in paths, values
and library messages are text, never rich markup), one line for an output folder that cannot be
written, the same spelling of the options the commands share, tables that are never cut."""

from __future__ import annotations

import errno
import os

import pytest
from typer.testing import CliRunner

from dppo.cli.main import app

from train_fixtures import init_dir, pair_shards, vocab_size  # noqa: F401
from dppo.errors import ConfigError, SourceError

BRACKETS = "[/__w/pytorch/third_party/gloo/transport/tcp/pair.cc:545] [red]x[/] [bold]"


def _invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_error_line(r, *expected: str) -> None:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "MarkupError" not in r.output, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for text in expected:
        assert text in lines[0], (text, r.output)


# -- paths and values with brackets, through the commands' own checks --------------------------------------------


def test_bracketed_paths_are_shown_as_given(tmp_path, tok_dir):
    odd = tmp_path / "x[/y]" / "a.jsonl"
    r = _invoke(["prep", "sft", "--data", odd, "--tokenizer", tok_dir, "--out", tmp_path / "o"])
    _one_error_line(r, str(odd))
    red = tmp_path / "[red]a.jsonl"
    r = _invoke(["prep", "prefs", "--data", red, "--tokenizer", tok_dir, "--out", tmp_path / "o"])
    _one_error_line(r, str(red))
    r = _invoke(["generate", "--model", tmp_path / "[bold]m", "--data", red, "--out", tmp_path / "g.jsonl"])
    _one_error_line(r, str(tmp_path / "[bold]m"))
    r = _invoke(["plot", tmp_path / "[/]run"])
    _one_error_line(r, str(tmp_path / "[/]run"))


def test_a_toml_table_is_named(tmp_path):
    cfg = tmp_path / "[x]cfg.toml"
    cfg.write_text("lr = 1e-6\n[loss]\nbeta = 0.1\n")
    r = _invoke(["train", "--config", cfg, "--method", "dpo", "--data", tmp_path, "--init", tmp_path, "--out", tmp_path / "r"])
    _one_error_line(r, "tables are not supported ([loss])", str(cfg))


# -- a bracketed message from inside the library, through every command --------------------------------------------

COMMANDS = {
    "prep": ("dppo.data.prep.prepare", ["prep", "sft", "--data", "d.jsonl", "--tokenizer", "t", "--out", "o"]),
    "prep-defaults": ("dppo.data.prep.prepare_defaults", ["prep", "--out", "o"]),
    "train": ("dppo.train.train", ["train", "--method", "dpo", "--data", "d", "--init", "m", "--out", "r"]),
    "generate": ("dppo.generate.generate", ["generate", "--model", "m", "--data", "d", "--out", "g.jsonl"]),
    "eval": ("dppo.eval.evaluate", ["eval", "m", "--baseline", "b", "--judge", "hf:j", "--data", "d", "--out", "e"]),
    "curriculum": ("dppo.curriculum.curriculum",
                   ["curriculum", "--rounds", "1", "--method", "unll", "--data", "d", "--tokenizer", "t", "--init", "m", "--out", "c"]),
    "plot": ("dppo.train.plots.plot_runs", ["plot", "r"]),
    "demo": ("dppo.demo.pipeline.run_demo", ["demo", "--out", "o"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("error", [ConfigError, SourceError, FileNotFoundError])
def test_library_messages_with_brackets(command, error, monkeypatch, tmp_path):
    target, args = COMMANDS[command]
    module, name = target.rsplit(".", 1)

    def fail(*a, **k):
        raise error(f"{tmp_path}/[red]data[/].jsonl: row 3: value '[1, 2]' {BRACKETS}")

    monkeypatch.setattr(f"{module}.{name}", fail)
    monkeypatch.chdir(tmp_path)
    r = _invoke(args)
    _one_error_line(r, f"{tmp_path}/[red]data[/].jsonl: row 3: value '[1, 2]' {BRACKETS}")


@pytest.mark.parametrize("launched", [False, True])
def test_lost_rank_message_with_brackets(launched, monkeypatch, tmp_path):
    """gloo's messages name its source file in brackets: rank 0's one line keeps them, under torchrun and
    under `dppo train --nproc-per-node 2` (whose launcher reports the failed job)."""
    monkeypatch.chdir(tmp_path)
    if launched:
        def launch(nproc, argv):
            raise ConfigError(f"the job failed: rank 1 (exit code -9, {BRACKETS}); the other ranks were stopped")

        monkeypatch.setattr("dppo.distributed.launch", launch)
        r = _invoke(["train", "--method", "dpo", "--data", "d", "--init", "m", "--out", "r", "--nproc-per-node", "2"])
        _one_error_line(r, f"rank 1 (exit code -9, {BRACKETS})")
        return
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    def lost(*a, **k):
        raise RuntimeError(f"{BRACKETS} Connection closed by peer [127.0.0.1]:29500\nmore lines")

    monkeypatch.setattr("dppo.train.train", lost)
    r = _invoke(["train", "--method", "dpo", "--data", "d", "--init", "m", "--out", "r"])
    _one_error_line(r, "rank 0: lost contact with another rank", f"{BRACKETS} Connection closed by peer [127.0.0.1]:29500")


# -- an output folder that cannot be written: one line naming it and the cause, for every command -------------------


@pytest.fixture
def mounted(tmp_path):
    """``mount(options)``: an empty tmpfs at a new folder, mounted with ``options`` (``ro``; ``size=64k``
    for a full disk); unmounted after the test. Needs root (the file mode alone does not stop root)."""
    import subprocess

    points = []

    def mount(options: str):
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _commands(ro, init_dir, pair_shards, pairs_file, tok_dir, run_with_metrics):
    return {
        "prep": ["prep", "prefs", "--data", pairs_file, "--tokenizer", tok_dir, "--out", ro / "shards"],
        "train": ["train", "--method", "dpo", "--data", pair_shards, "--init", init_dir, "--out", ro / "run",
                  "--max-steps", "1", "--no-progress"],
        "generate": ["generate", "--model", init_dir, "--data", pairs_file, "--out", ro / "g.jsonl", "--limit", "2",
                     "--max-new-tokens", "2"],
        "eval": ["eval", init_dir, "--baseline", init_dir, "--judge", "length", "--data", pairs_file, "--out", ro / "e",
                 "--limit", "2", "--max-new-tokens", "2"],
        "plot": ["plot", run_with_metrics, "--out", ro / "plots"],
        "demo": ["demo", "--quick", "--out", ro / "demo"],
        "curriculum": ["curriculum", "--rounds", "1", "--method", "unll", "--data", pairs_file, "--tokenizer", tok_dir,
                       "--init", init_dir, "--out", ro / "c", "--max-new-tokens", "2", "--max-steps", "1"],
    }


@pytest.fixture(scope="module")
def run_with_metrics(tmp_path_factory):
    import json

    run = tmp_path_factory.mktemp("plotted")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n" for s in (1, 2, 3)))
    return run


COMMAND_NAMES = ("prep", "train", "generate", "eval", "plot", "demo", "curriculum")


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_a_read_only_output_folder_is_one_line(command, mounted, init_dir, pair_shards, pairs_file, tok_dir, run_with_metrics):
    ro = mounted("ro,size=1m")
    args = _commands(ro, init_dir, pair_shards, pairs_file, tok_dir, run_with_metrics)[command]
    r = _invoke(args)
    if command == "prep":  # the data engine's own one line: the path it could not write and the cause
        _one_error_line(r, str(ro), "Read-only file system")
    else:
        _one_error_line(r, f"cannot write in {ro}", "read-only")


def test_a_full_disk_is_one_line(mounted, tmp_path):
    import json

    full = mounted("size=8k")

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n" for s in range(1, 50)))
    r = _invoke(["plot", run, "--out", full / "plots"])
    _one_error_line(r, f"cannot write in {full / 'plots'}", "no space left")


def test_storage_errors_are_found_inside_other_errors(tmp_path):
    from dppo.errors import storage_error_line

    try:
        try:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "model.safetensors"))
        except OSError as e:
            raise RuntimeError("the checkpoint writer failed") from e
    except RuntimeError as e:
        line = storage_error_line(e)
    assert line == f"cannot write in {tmp_path} (model.safetensors): the file system is read-only; choose another output folder"
    assert storage_error_line(OSError(errno.ENOENT, "no such file", "x")) is None
    assert storage_error_line(ValueError("x")) is None


# -- the options the commands share are spelled alike --------------------------------------------------------------

SHARED = ("progress", "seed", "dtype", "overwrite", "resume")


def _commands_of_the_cli() -> dict[str, object]:
    import typer

    root = typer.main.get_command(app)
    found: dict[str, object] = {}

    def walk(cmd, path):
        if hasattr(cmd, "commands"):  # a group (typer's click)
            if path:
                found[" ".join(path)] = cmd  # `dppo prep` itself takes options
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            found[" ".join(path)] = cmd

    walk(root, [])
    return found


def test_shared_options_have_one_spelling():
    commands = _commands_of_the_cli()
    assert {"train", "generate", "eval", "demo", "curriculum", "plot", "prep", "prep sft", "prep prefs"} <= set(commands)
    spelling: dict[str, tuple] = {}
    for name, cmd in commands.items():
        for p in cmd.params:
            if p.name in SHARED:
                spelled = (tuple(p.opts), tuple(p.secondary_opts))
                first = spelling.setdefault(p.name, spelled)
                assert spelled == first, (name, p.name, spelled, first)
    assert spelling["progress"] == (("--progress",), ("--no-progress",))
    assert spelling["overwrite"] == (("--overwrite",), ("--no-overwrite",))
    assert spelling["resume"] == (("--resume",), ("--no-resume",))
    # every command with a progress display can turn it off
    for name in ("train", "generate", "eval", "curriculum", "prep sft", "prep prefs"):
        assert "progress" in {p.name for p in commands[name].params}, name


def test_generate_takes_no_progress(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("dppo.generate.generate", lambda cfg, show_progress=True: seen.setdefault("show", show_progress))
    r = _invoke(["generate", "--model", "m", "--data", "d", "--out", tmp_path / "g.jsonl", "--no-progress", "--no-overwrite"])
    assert r.exit_code == 0, r.output
    assert seen == {"show": False}


# -- figures and tables ------------------------------------------------------------------------------------------


def test_plot_gives_each_quantity_its_own_axis(tmp_path):
    import json

    from dppo.train.plots import FIGURES, draw, read_metrics

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 0.69 - 1e-4 * s, "rewards/margins": 1e-3 * s, "rewards/accuracies": 0.5 + 0.05 * s,
             "lr": 1e-6} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for key, (_, quantity, metrics) in FIGURES.items():
        assert len({m.split("/")[-1].removeprefix("eval/") for m in metrics} - {"loss", "chosen", "rejected"}) <= 1, key
    data = {run: read_metrics(run)}
    margins, accuracies = draw("margins", data, ["run"]), draw("accuracies", data, ["run"])
    low, high = margins.axes[0].get_ylim()
    assert high < 0.01 and high - low < 0.01  # the margins' own scale, not 0..1
    assert accuracies.axes[0].get_ylim()[1] > 0.7
    assert [line.get_label() for line in margins.axes[0].get_lines()] == ["rewards/margins"]
    r = _invoke(["plot", run])
    assert r.exit_code == 0, r.output
    assert (run / "plots" / "margins.png").is_file() and (run / "plots" / "accuracies.png").is_file()


def test_tables_are_never_cut_on_a_file():
    import io

    from rich.console import Console
    from rich.table import Table

    from dppo.console import print_table

    names = ["unll+dpo-with-a-long-name", "curriculum-online-judge-rounds", "[red]a/b[/]"]
    table = Table(title="win rate")
    for col in ("method", "win rate", "+-", "LC", "strict", "judge score", "tokens", "pairs/s", "paper"):
        table.add_column(col)
    for name in names:
        table.add_row(name.replace("[", "\\["), "0.512", "0.031", "0.498", "0.470", "1.23", "17.5", "123.4", "0.55")
    buf = io.StringIO()
    print_table(Console(file=buf, width=80, force_terminal=False), table)
    text = buf.getvalue()
    for name in names:
        assert name in text, text
    assert "…" not in text and "..." not in text


def test_the_progress_bar_of_items_shows_done_total_and_the_time_left():
    """dppo eval's judging bar, shared with the online rounds' (dppo.console.progress_bar): the
    description, done / total, the time elapsed and the estimated time left; off, it draws nothing."""
    import io
    import re

    from rich.console import Console

    from dppo.console import esc, progress_bar

    for show in (True, False):
        buf = io.StringIO()
        with progress_bar(Console(file=buf, width=120, force_terminal=False), show) as bar:
            task = bar.add_task(f"judge {esc('[red]py:rule[/]')}", total=7)
            for n in (3, 4):
                bar.advance(task, n)
        if show:
            assert re.search(r"judge \[red\]py:rule\[/\] .* 7/7 \d+:\d\d:\d\d \d+:\d\d:\d\d", buf.getvalue()), buf.getvalue()
        else:
            assert buf.getvalue() == ""


# -- other libraries' warnings and bars go to the command's log file -------------------------------------------------


@pytest.mark.filterwarnings("default")
@pytest.mark.parametrize("command", ["train", "generate", "eval", "curriculum", "demo", "prep"])
def test_library_warnings_go_to_the_log_file(command, monkeypatch, tmp_path):
    import logging
    import warnings

    target, args = COMMANDS[command]
    module, name = target.rsplit(".", 1)

    def chatty(*a, **k):
        warnings.warn("torch.distributed is disabled, so this rank saves alone", UserWarning)
        logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized [lm_head]")
        logging.getLogger("peft.tuners.lora").warning("Already found a peft_config attribute in the model")
        from transformers.utils import logging as hf_logging

        assert not hf_logging.is_progress_bar_enabled()  # no "Loading weights" bars on the terminal
        return {}

    monkeypatch.setattr(f"{module}.{name}", chatty)
    monkeypatch.chdir(tmp_path)
    r = _invoke(args)
    assert r.exit_code == 0, r.output
    for text in ("torch.distributed is disabled", "Some weights were not initialized", "peft_config"):
        assert text not in r.output, r.output
    out = tmp_path / args[args.index("--out") + 1]
    log = out.with_name(out.name + ".log") if command == "generate" else out / f"{command}.log"
    logged = log.read_text()
    assert "UserWarning: torch.distributed is disabled" in logged
    assert "Some weights were not initialized [lm_head]" in logged and "peft_config" in logged
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # as it was, once the command is over
    assert logging.getLogger("transformers").handlers != [] and not any(
        getattr(h, "stream", None) is not None and getattr(h.stream, "path", None) == log for h in logging.getLogger("transformers").handlers)

"""The loss registry owns the options: declarations drive validation, the saved configuration and the
command line's help; losses and judges from other packages (entry points, ``py:`` judges) reach the
command line."""

from __future__ import annotations

import pytest

from dppo.errors import ConfigError
from dppo.train.config import TrainConfig

from train_fixtures import init_dir, pair_shards, vocab_size  # noqa: F401  (fixtures)

BASE = dict(data="d", init="i", out="o")


def test_varlen_kernel_is_refused_off_cuda_at_option_checking():
    with pytest.raises(ConfigError, match="--kernel varlen runs on CUDA only") as e:
        TrainConfig(method="dpo", kernel="varlen", device="cpu", **BASE)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--kernel varlen runs in bf16 only"):
        TrainConfig(method="dpo", kernel="varlen", device="cuda", dtype="fp32", **BASE)
    assert TrainConfig(method="dpo", kernel="varlen", device="cuda", **BASE).kernel == "varlen"


# -- declarations drive validation, the unused-option check and RUN/config.json -----------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dppo.train.registry import (  # noqa: E402
    BETA, LOSSES, LossConfig, LossSpec, Option, known_options, option_users, register_loss,
)

SCALE = Option("scale", float, 1.0, "Multiplier of the margin", low=0.0, low_open=True, paper=3.0)
SHAPE = Option("shape", str, "plain", "Shape of the margin", choices=("plain", "squared"))


def scaled_margin(cfg, logps):
    from dppo.train.losses import LossOutput

    margin = cfg.scale * cfg.beta * (logps.policy_chosen - logps.policy_rejected)
    return LossOutput(loss=-F.logsigmoid(margin.square() if cfg.shape == "squared" else margin))


@pytest.fixture
def scaled():
    register_loss("scaled", LossSpec(scaled_margin, needs_reference=False, options=(BETA.with_default(0.5), SCALE, SHAPE)))
    try:
        yield LOSSES["scaled"]
    finally:
        LOSSES.pop("scaled", None)


def test_an_entry_declares_its_options_and_they_are_checked_by_the_declaration(scaled):
    cfg = TrainConfig(method="scaled", scale=3, **BASE)
    assert (cfg.scale, cfg.beta, cfg.shape) == (3.0, 0.5, "plain") and isinstance(cfg.scale, float)
    assert cfg.loss_config() == LossConfig.defaults("scaled", scale=3.0)
    assert LossConfig.defaults("scaled").values == {"beta": 0.5, "scale": 1.0, "shape": "plain"}
    for opts, msg in [
        (dict(scale=0.0), "--scale: scale must be finite and > 0, got 0.0"),
        (dict(scale="3"), "--scale: scale must be a number, got '3'"),
        (dict(scale=float("inf")), "--scale: scale must be finite and > 0, got inf"),
        (dict(shape="cubic"), "--shape: shape must be one of ('plain', 'squared'), got 'cubic'"),
        (dict(alpha=1.0), "--alpha is not used by --method scaled (it applies to conll, minll, unll)"),
    ]:
        with pytest.raises(ConfigError) as e:
            TrainConfig(method="scaled", **opts, **BASE)
        assert str(e.value) == msg
    with pytest.raises(ConfigError, match=r"^--scale is not used by --method dpo \(it applies to scaled\)$"):
        TrainConfig(method="dpo", scale=2.0, **BASE)
    # every registered option is a key of RUN/config.json, None where the method does not use it
    saved = TrainConfig(method="dpo", **BASE).to_dict()
    assert saved["scale"] is None and saved["shape"] is None and saved["beta"] == 0.01
    assert TrainConfig(method="scaled", shape="squared", **BASE).to_dict()["shape"] == "squared"
    assert option_users("beta")[-1] == "scaled" and option_users("scale") == ["scaled"]


def test_register_loss_refuses_conflicting_or_reserved_option_names():
    with pytest.raises(ValueError, match="option 'beta' is declared by dpo with another type"):
        register_loss("bad", LossSpec(scaled_margin, options=(Option("beta", int, 1, "an integer beta"),)))
    with pytest.raises(ValueError, match="option 'lr' is a dppo train option"):
        register_loss("bad", LossSpec(scaled_margin, options=(Option("lr", float, 1.0, "a learning rate"),)))
    with pytest.raises(ValueError, match="no option 'scale' is declared"):
        LossSpec(scaled_margin, options=("scale",))
    with pytest.raises(ValueError, match="default"):
        LossSpec(scaled_margin, options=(SCALE,), defaults={"scale": -1.0})
    with pytest.raises(ValueError, match="applies when weight"):
        LossSpec(scaled_margin, options=("zeta",))
    assert "bad" not in LOSSES


def test_saved_configuration_keeps_its_keys_and_values():
    """RUN/config.json of the built-in methods: the loss options in the same place, None where unused."""
    loss_keys = ["beta", "gamma", "alpha", "weight", "zeta", "vote", "vote_clip", "vote_norm", "detach_weight", "penalty_norm"]
    # TRL's pair losses add theirs (dpo's label smoothing after beta): the paper's keep their order
    every = ["beta", "label_smoothing", *loss_keys[1:], "bco_running_mean", "discopop_tau", "orpo_nll", "loss_weights"]
    assert list(known_options()) == every
    saved = TrainConfig(method="minll", penalty_norm="sum", **BASE).to_dict()
    keys = list(saved)
    assert keys[keys.index("tokenizer") + 1: keys.index("tokenizer") + 1 + len(every)] == every
    assert all(saved[k] is None for k in every if k not in loss_keys)
    assert {k: saved[k] for k in loss_keys} == dict(
        beta=0.01, gamma=None, alpha=10.0, weight="expectile", zeta=0.5, vote="policy", vote_clip=2000.0,
        vote_norm="clip", detach_weight=False, penalty_norm="sum")
    conll = TrainConfig(method="conll", **BASE).to_dict()
    assert (conll["vote_clip"], conll["zeta"], conll["penalty_norm"], conll["alpha"]) == (700.0, None, None, 0.1)
    simpo = TrainConfig(method="simpo", **BASE).to_dict()
    assert {k: simpo[k] for k in loss_keys if simpo[k] is not None} == {"beta": 2.5, "gamma": 1.0}
    assert all(v is None for k, v in TrainConfig(method="sft", **BASE).to_dict().items() if k in loss_keys)
    # a saved configuration loads back into the same one (resume compares them)
    again = TrainConfig(**{k: v for k, v in saved.items() if v is not None})
    assert again.to_dict() == saved and again == TrainConfig(method="minll", penalty_norm="sum", **BASE)


# -- the command line's options and help come from the declarations ---------------------------------------


def _train_params(app=None):
    import click
    import typer

    from dppo.cli.main import app as main_app

    group = typer.main.get_command(app or main_app)
    with click.Context(group) as ctx:
        _, command, _ = group.resolve_command(ctx, ["train"])
    return {p.name: p for p in command.params}


def test_help_groups_the_loss_options_by_the_methods_that_use_them(scaled):
    params = _train_params()
    panels = {name: getattr(params[name], "rich_help_panel", None) for name in known_options()}
    assert panels["beta"] == "Loss: most methods"  # the paper's methods, TRL's pair losses and scaled
    assert panels["label_smoothing"] == "Loss: dpo, robust, exo_pair, aot, aot_unpaired"
    assert panels["loss_weights"] == "Loss: combinations A+B"
    assert panels["gamma"] == "Loss: simpo" and panels["penalty_norm"] == "Loss: minll"
    assert panels["alpha"] == panels["vote_clip"] == panels["detach_weight"] == "Loss: minll, unll, conll"
    assert panels["scale"] == panels["shape"] == "Loss: scaled"
    assert params["scale"].opts == ["--scale"] and params["detach_weight"].secondary_opts == ["--no-detach-weight"]
    assert "dpo, minll, unll, conll 0.01; simpo 2.5; scaled 0.5" in params["beta"].help
    assert "default 2000; conll 700" in params["vote_clip"].help
    assert "plain|squared" in params["shape"].help and "> 0" in params["scale"].help
    assert not any(getattr(params[n], "rich_help_panel", None) for n in ("lr", "method", "data"))


def test_help_lists_the_panels(scaled):
    from typer.testing import CliRunner

    from dppo.cli.main import app

    out = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    assert "Loss: minll, unll, conll" in out and "Loss: scaled" in out and "--scale" in out


# -- losses from other packages: the dppo.losses entry points, through the command line ---------------------

PLUGIN = '''
    """A loss with an option of its own, as another package would ship it."""
    import torch.nn.functional as F

    from dppo.train.losses import LossOutput
    from dppo.train.registry import BETA, LossSpec, Option

    def my_loss(cfg, logps):
        margin = cfg.my_option * cfg.beta * (logps.policy_chosen - logps.policy_rejected)
        return LossOutput(loss=-F.logsigmoid(margin))

    SPEC = LossSpec("myplugin:my_loss", needs_reference=False, options=(
        BETA.with_default(0.5), Option("my_option", float, 1.0, "Multiplier of the margin", low=0.0, low_open=True)))
'''


def _plugin(root: Path, target: str = "myplugin:SPEC", module: str = PLUGIN) -> dict[str, str]:
    """A package installed as far as importlib.metadata sees it: a module and a dist-info with entry points."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "myplugin.py").write_text(textwrap.dedent(module))
    info = root / "myplugin-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dppo.losses]\nmyloss = {target}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _dppo(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dppo", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_an_installed_loss_with_its_own_option_trains_through_the_command_line(tmp_path, init_dir, pair_shards):
    from dppo.data import open_shards
    from train_fixtures import read_metrics

    env = _plugin(tmp_path / "site")
    out = tmp_path / "run"
    args = ["train", "--method", "myloss", "--my-option", "3", "--data", str(pair_shards), "--init", str(init_dir),
            "--out", str(out), "--max-samples", "4", "--max-steps", "1", "--batch-size", "2", "--grad-accum", "2",
            "--warmup-steps", "0", "--max-grad-norm", "0", "--optimizer", "sgd", "--lr", "0", "--no-progress",
            "--save-every", "0"]
    done = _dppo(args, env, tmp_path)
    assert done.returncode == 0, done.stderr
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["method"], cfg["my_option"], cfg["beta"], cfg["alpha"], cfg["ref"]) == ("myloss", 3.0, 0.5, None, None)
    # the step's loss is the mean over its 4 pairs of -log sigmoid(3 * 0.5 * (logp(y_w) - logp(y_l)))
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32).eval()
    shards, losses = open_shards(pair_shards), []
    for i in range(4):
        ex = shards[i]

        def logp(response):
            ids = torch.tensor([int(t) for t in ex["prompt_ids"]] + [int(t) for t in response])[None]
            with torch.no_grad():
                logits = policy(ids).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            return lp[len(ex["prompt_ids"]) - 1:].sum()

        losses.append(-F.logsigmoid(3 * 0.5 * (logp(ex["chosen_ids"]) - logp(ex["rejected_ids"]))))
    assert read_metrics(out)[0]["loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)

    # its help panel; an option it does not declare is refused in one line; `dppo --help` does not load it
    help_out = _dppo(["train", "--help"], dict(env, COLUMNS="200"), tmp_path).stdout
    assert "Loss: myloss" in help_out and "--my-option" in help_out
    assert "--my-option" in _dppo(["curriculum", "--help"], dict(env, COLUMNS="200"), tmp_path).stdout
    refused = _dppo(["train", "--method", "dpo", "--my-option", "2", "--data", "d", "--init", "i", "--out", "o"], env, tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip() == "error: --my-option is not used by --method dpo (it applies to myloss)"
    probe = ("import sys; from dppo.cli.main import app\ntry: app(['--help'])\nexcept SystemExit: pass\n"
             "print('myplugin' in sys.modules, 'torch' in sys.modules)")
    quiet = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert quiet.stdout.strip().splitlines()[-1] == "False False"


@pytest.mark.parametrize(("target", "module", "why"), [
    ("myplugin:SPEC", "import not_a_module_anywhere\n", "ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("myplugin:MISSING", PLUGIN, "AttributeError"),
    ("myplugin:NOT_A_SPEC", "NOT_A_SPEC = 3\n", "expected a LossSpec, got int"),
])
def test_an_entry_point_that_fails_to_load_is_named_in_one_line(tmp_path, target, module, why):
    env = _plugin(tmp_path / "site", target, module)
    done = _dppo(["train", "--method", "dpo", "--data", "d", "--init", "i", "--out", "o"], env, tmp_path)
    assert done.returncode == 1
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert line.startswith("error: entry point 'myloss' of group dppo.losses (module myplugin)") and why in line, line

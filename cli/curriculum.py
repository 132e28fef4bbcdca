"""``dppo curriculum``: parse the curriculum's own options and every ``dppo train`` option (the same
flags, help and defaults: the train command's parameters, reused), call :func:`dppo.curriculum.curriculum`."""

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dppo.cli.train import train_command

# train options the curriculum sets itself, or that mean something else here
_NOT_PASSED = ("method", "data", "init", "out", "ref", "tokenizer", "config", "resume", "overwrite", "nproc_per_node", "plan")


def _own(
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Rounds: generate y_gen with the policy entering the round, prepare the pairs with it, train.")],
    method: Annotated[str, typer.Option("--method", help="The penalization: unll, minll or conll.")],
    data: Annotated[str, typer.Option("--data", help="Preference pairs (UltraFeedback's schema): hub id or local parquet/jsonl/json/arrow file or folder.")],
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="Tokenizer (and chat template) the pairs are prepared with: hub id or folder.")],
    init: Annotated[str, typer.Option("--init", help="The policy entering round 1 (the SFT model): run folder, model folder or hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Curriculum folder: round_K/ (ygen.parquet, shards/, the training run), model/, curriculum.json.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split of a hub data set.")] = None,
    data_config: Annotated[Optional[str], typer.Option("--data-config", help="Configuration (subset) name of a hub data set.")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Revision of a hub data set.")] = None,
    pairs_per_round: Annotated[Optional[int], typer.Option("--pairs-per-round", min=1, help="Each round takes the next N prompts' pairs in the data's order (a new shuffle after the last); default: all, every round.")] = None,
    round_ref: Annotated[str, typer.Option("--round-ref", help="The reference of every round: init (--init) or previous (the policy entering the round, as SPIN).")] = "init",
    max_len: Annotated[Optional[int], typer.Option("--max-len", min=1, help="Prep's maximum sequence length (default: the 95th percentile of the round's lengths).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most y_gen tokens per response (greedy decoding).")] = 1024,
    gen_batch_size: Annotated[Optional[int], typer.Option("--gen-batch-size", min=1, help="Prompts decoded together (default: 128 on CUDA, 32 on the CPU).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="Decoder: auto, dppo, hf or vllm.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the curriculum in --out where it stopped (finished stages are reused).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the curriculum in --out.")] = False,
) -> None: ...


def _parameters() -> list[inspect.Parameter]:
    own = list(inspect.signature(_own).parameters.values())
    # train's parameters, the registry's loss options included, annotations evaluated
    train = [p for name, p in inspect.signature(train_command()).parameters.items() if name not in _NOT_PASSED]
    required = [p for p in own if p.default is inspect.Parameter.empty]
    return required + [p for p in own if p.default is not inspect.Parameter.empty] + train


_OWN_NAMES = tuple(inspect.signature(_own).parameters)


def curriculum_cmd(**options: Any) -> None:
    """Rounds of on-policy penalization (self-curriculum): y_gen from the policy entering each round, pairs prepared with it, training; every `dppo train` option applies to each round."""
    from dppo.curriculum import CurriculumConfig, curriculum
    from dppo.data.sources import DataSource
    from dppo.generate.run import DecodeConfig

    own = {k: options.pop(k) for k in _OWN_NAMES}
    train_opts = {k: v for k, v in options.items() if v is not None}
    decode = DecodeConfig.from_options(max_new_tokens=own.pop("max_new_tokens"), batch_size=own.pop("gen_batch_size"),
                                       engine=own.pop("engine"))
    source = DataSource(own["data"], split=own["split"], config=own["data_config"], revision=own["revision"])
    curriculum(CurriculumConfig(rounds=own["rounds"], method=own["method"], data=source, tokenizer=own["tokenizer"],
                                init=own["init"], out=own["out"], pairs_per_round=own["pairs_per_round"],
                                round_ref=own["round_ref"], max_len=own["max_len"], decode=decode, train=train_opts,
                                seed=train_opts.get("seed", 0), resume=own["resume"], overwrite=own["overwrite"]))


curriculum_cmd.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]

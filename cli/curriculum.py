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
    method: Annotated[str, typer.Option("--method", help="The penalization: unll, minll or conll (with --pairs judge: any dppo train method).")],
    data: Annotated[str, typer.Option("--data", help="Preference pairs (UltraFeedback's schema; with --pairs judge, prompts in UltraFeedback's or SmolTalk's schema or a prompt column): hub id or local parquet/jsonl/json/arrow file or folder.")],
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="Tokenizer (and chat template) the pairs are prepared with: hub id or folder.")],
    init: Annotated[str, typer.Option("--init", help="The policy entering round 1 (the SFT model): run folder, model folder or hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Curriculum folder: round_K/ (ygen.parquet, shards/, the training run; with --pairs judge also samples.parquet, pairs.parquet, ygen_scores.parquet), model/, curriculum.json.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split of a hub data set.")] = None,
    data_config: Annotated[Optional[str], typer.Option("--data-config", help="Configuration (subset) name of a hub data set.")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Revision of a hub data set.")] = None,
    pairs_per_round: Annotated[Optional[int], typer.Option("--pairs-per-round", min=1, help="Each round takes the next N prompts' pairs in the data's order (a new shuffle after the last); default: all, every round.")] = None,
    round_ref: Annotated[str, typer.Option("--round-ref", help="The reference of every round: init (--init) or previous (the policy entering the round, as SPIN).")] = "init",
    max_len: Annotated[Optional[int], typer.Option("--max-len", min=1, help="Prep's maximum sequence length (default: the 95th percentile of the round's lengths).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens per response: y_gen (greedy) and, with --pairs judge, the samples.")] = 1024,
    gen_batch_size: Annotated[Optional[int], typer.Option("--gen-batch-size", min=1, help="Prompts decoded together (default: 128 on CUDA, 32 on the CPU).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="Decoder: auto, dppo, hf or vllm.")] = "auto",
    pairs: Annotated[str, typer.Option("--pairs", help="Where each round's pairs come from: data (--data's pairs, y_gen from the policy) or judge (the policy's own samples, judged, best vs worst).")] = "data",
    judge: Annotated[Optional[str], typer.Option("--judge", help="--pairs judge: the judge that scores the samples (any judge dppo eval takes).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", min=2, help="--pairs judge: responses sampled per prompt (K), in one batched decoder call (default 4).")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="--pairs judge: sampling temperature, > 0 (default 1.0).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="--pairs judge: nucleus of the sampling, in (0, 1] (default 1.0).")] = None,
    prompts_per_round: Annotated[Optional[int], typer.Option("--prompts-per-round", min=1, help="--pairs judge: each round takes the next N prompts of --data (a new shuffle after the last); default: all, every round.")] = None,
    pair_rule: Annotated[Optional[str], typer.Option("--pair-rule", help="--pairs judge: best-worst, the default and only rule (each prompt's best-scored sample against its worst, equal scores to the lower sample index; all tied or fewer than two scores: no pair, counted).")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", min=1, help="--pairs judge: at most this many --eval-data prompts (with --pairs judge, --eval-data names held-out prompts: after every round, the greedy policy's win rate against --init by the same judge).")] = None,
    judge_batch_size: Annotated[Optional[int], typer.Option("--judge-batch-size", min=1, help="--pairs judge: items per judge call (default 8).")] = None,
    api_base: Annotated[Optional[str], typer.Option("--api-base", help="--pairs judge: endpoint of an API judge.")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue the curriculum in --out where it stopped (finished stages are reused).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="Replace the curriculum in --out.")] = False,
) -> None: ...


def _parameters() -> list[inspect.Parameter]:
    own = list(inspect.signature(_own).parameters.values())
    # train's parameters, the registry's loss options included, annotations evaluated
    train = [p for name, p in inspect.signature(train_command()).parameters.items() if name not in _NOT_PASSED]
    required = [p for p in own if p.default is inspect.Parameter.empty]
    return required + [p for p in own if p.default is not inspect.Parameter.empty] + train


_OWN_NAMES = tuple(inspect.signature(_own).parameters)


def curriculum_cmd(**options: Any) -> None:
    """Rounds of on-policy penalization (self-curriculum): y_gen from the policy entering each round, pairs prepared with it, training; with --pairs judge, online rounds: the policy's own samples judged and paired best vs worst. Every `dppo train` option applies to each round."""
    from dppo.curriculum import CurriculumConfig, curriculum
    from dppo.data.sources import DataSource
    from dppo.errors import ConfigError
    from dppo.generate.run import DecodeConfig

    own = {k: options.pop(k) for k in _OWN_NAMES}
    train_opts = {k: v for k, v in options.items() if v is not None}
    decode = DecodeConfig.from_options(max_new_tokens=own.pop("max_new_tokens"), batch_size=own.pop("gen_batch_size"),
                                       engine=own.pop("engine"))
    source = DataSource(own["data"], split=own["split"], config=own["data_config"], revision=own["revision"])
    online_names = ("judge", "samples", "temperature", "top_p", "prompts_per_round", "pair_rule", "eval_limit",
                    "judge_batch_size", "api_base")
    # given ones only: the defaults are OnlineConfig's, and none is taken silently without --pairs judge
    online_opts = {k: v for k in online_names if (v := own.pop(k)) is not None}
    online = None
    if own["pairs"] == "judge":
        from dppo.online import OnlineConfig

        # --eval-data: with --pairs judge, the held-out prompts of the per-round win rate
        eval_data = train_opts.pop("eval_data", None)
        online = OnlineConfig(seed=train_opts.get("seed", 0), eval_data=None if eval_data is None else str(eval_data),
                              **online_opts)
    elif online_opts:
        given = ", ".join("--" + k.replace("_", "-") for k in online_opts)
        verb = "applies" if len(online_opts) == 1 else "apply"
        raise ConfigError(f"{given} {verb} to --pairs judge (the online rounds), not to --pairs {own['pairs']}")
    curriculum(CurriculumConfig(pairs=own["pairs"], online=online, rounds=own["rounds"], method=own["method"], data=source, tokenizer=own["tokenizer"],
                                init=own["init"], out=own["out"], pairs_per_round=own["pairs_per_round"],
                                round_ref=own["round_ref"], max_len=own["max_len"], decode=decode, train=train_opts,
                                seed=train_opts.get("seed", 0), resume=own["resume"], overwrite=own["overwrite"]),
               show_progress=train_opts.get("progress", True))


def curriculum_command() -> Any:
    """:func:`curriculum_cmd` with the train options as the registry declares them now (the losses
    installed through entry points included once loaded)."""
    curriculum_cmd.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]
    return curriculum_cmd


curriculum_command()

"""``dppo generate`` and ``dppo eval``: parse options, call ``dppo.generate.generate`` /
``dppo.eval.evaluate`` (their configurations sort the flat options: ``from_options``). Registered in ``cli/main.py`` (wrapped by ``user_errors``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# -- shared options ---------------------------------------------------------------------------
DataSrc = Annotated[
    str,
    typer.Option("--data", help="Hub data set id, a local parquet/jsonl/json/arrow file or folder, or (generate only) a prepared pair-shard folder."),
]
Split = Annotated[Optional[str], typer.Option("--split", help="Split of a hub data set.")]
Config = Annotated[Optional[str], typer.Option("--config", help="Configuration (subset) name of a hub data set.")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Revision (branch, tag or commit) of a hub data set.")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens generated per response.")]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 is greedy decoding.")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature > 0).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of sampling (each prompt gets its own stream, so batching does not matter).")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Prompts decoded together (default: 128 on CUDA, 32 on the CPU).")]
Engine = Annotated[str, typer.Option("--engine", help="Decoder: auto (dppo where the architecture is supported, else hf), dppo, hf (transformers generate) or vllm.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Model dtype: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 or fp32.")]
ShowProgress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars and the summary.")]
TokenizerOpt = Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer folder or hub id (default: the model's folder).")]


def generate_cmd(
    model: Annotated[str, typer.Option("--model", help="Run folder (uses RUN/model), model folder or hub id.")],
    data: DataSrc,
    out: Annotated[Path, typer.Option("--out", help="Output file, .parquet or .jsonl (resumed if it exists).")],
    split: Split = None,
    config: Config = None,
    revision: Revision = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N distinct prompts.")] = None,
    turns: Annotated[str, typer.Option("--turns", help="The prompt: first (the system and first user turn) or all (the whole history up to the last user turn, as `dppo prep --turns all`).")] = "first",
    max_new_tokens: MaxNew = 1024,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    batch_size: BatchSize = None,
    engine: Engine = "auto",
    dtype: Dtype = "auto",
    tokenizer: TokenizerOpt = None,
    max_prompt_len: Annotated[Optional[int], typer.Option("--max-prompt-len", min=1, help="Shorten longer prompts to N tokens as prep does: a history (--turns all) loses its earliest exchanges whole, then the last user turn loses its end; the template (generation header last) stays.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="Start over instead of resuming OUT (needed when settings changed).")] = False,
    progress: ShowProgress = True,
) -> None:
    """Generate a response to every prompt (y_gen for `dppo prep prefs --ygen`): greedy by default, resumable."""
    options = dict(locals())
    show = options.pop("progress")
    from dppo.generate import GenConfig, generate

    generate(GenConfig.from_options(**options), show_progress=show)


def eval_cmd(
    models: Annotated[list[str], typer.Argument(help="Run folders, model folders or hub ids to evaluate.", show_default=False)],
    baseline: Annotated[str, typer.Option("--baseline", help="The model every other one is compared with (e.g. the SFT model).")],
    judge: Annotated[str, typer.Option("--judge", help="nemotron (Llama-3.1-Nemotron-70B-Reward through transformers), nemotron-api (NVIDIA's endpoint; the key is read from $NVIDIA_API_KEY), hf:ID_OR_PATH (a sequence-classification reward model), py:MODULE:FUNCTION (your own (prompt, response) -> float function, or a factory returning one; MODULE importable or a .py file), or a judge registered in Python or installed through the dppo.judges entry points.")],
    data: Annotated[str, typer.Option("--data", help="Hub data set id or local parquet/jsonl/json/arrow file or folder with the evaluation prompts.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: results.md/json, scores.jsonl, winrate.png, reward_diff.png.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split of a hub data set.")] = "test_prefs",
    config: Config = None,
    revision: Revision = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N distinct prompts.")] = 1000,
    turns: Annotated[str, typer.Option("--turns", help="The prompt: first (the system and first user turn) or all (the whole history up to the last user turn, as `dppo prep --turns all`).")] = "first",
    max_new_tokens: MaxNew = 1024,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    batch_size: BatchSize = None,
    engine: Engine = "auto",
    dtype: Dtype = "auto",
    tokenizer: TokenizerOpt = None,
    api_base: Annotated[Optional[str], typer.Option("--api-base", help="Base URL of the OpenAI-compatible endpoint for nemotron-api (default: NVIDIA's).")] = None,
    judge_batch_size: Annotated[int, typer.Option("--judge-batch-size", min=1, help="Items per forward pass of a local judge model.")] = 8,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Requests in flight at once for an API judge.")] = 8,
    tie_tolerance: Annotated[float, typer.Option("--tie-tolerance", min=0.0, help="Reward differences within this are ties.")] = 0.0,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Generation and judge-score cache (default: OUT/cache); share it across evaluations.")] = None,
    progress: ShowProgress = True,
) -> None:
    """Win rates of models against a baseline, judged by a reward model (responses and scores cached).

    The nemotron-api judge reads its key from the NVIDIA_API_KEY environment variable. Exits with
    code 1 when a model has no scored comparison (every judge call failed).
    """
    options = {**locals(), "models": tuple(models)}
    show = options.pop("progress")
    from dppo.eval import EvalConfig, evaluate

    evaluate(EvalConfig.from_options(**options), show_progress=show)

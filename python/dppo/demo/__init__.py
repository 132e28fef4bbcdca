"""The demo task world: a small, fully offline alignment problem in the schemas of the real data
sets (SmolTalk for SFT, UltraFeedback-binarized for preference pairs) with a programmatic judge.

- ``tasks``: six instruction kinds over short inputs, their prompts, exact answers and splits;
- ``judge``: the 0..10 judge (``judge``, ``DemoJudge``) that parses the prompt text alone;
- ``generators``: the demonstrator (SFT data) and the four external generators (pairs);
- ``world``: ``write_world`` writes the files, the tokenizer and ``world.json``.

See docs/demo.md for the scoring table, the error patterns and why they differ.
"""

from dppo.demo.generators import EXTERNAL, demonstrator
from dppo.demo.judge import MAX_SCORE, DemoJudge, judge, score_task
from dppo.demo.tasks import KINDS, Task, parse_prompt, random_task, split_of
from dppo.demo.world import VOCAB_SIZE, World, build_world, sample_tasks, write_world

__all__ = [
    "DemoJudge",
    "EXTERNAL",
    "KINDS",
    "MAX_SCORE",
    "Task",
    "VOCAB_SIZE",
    "World",
    "build_world",
    "demonstrator",
    "judge",
    "parse_prompt",
    "random_task",
    "sample_tasks",
    "score_task",
    "split_of",
    "write_world",
]

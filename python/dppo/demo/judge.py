"""The demo world's judge: a deterministic, programmatic stand-in for a reward model.

It sees what an LLM judge sees, the prompt text and the response text, parses the instruction
from the prompt (`parse_prompt`) and scores the response on 0..10:

    score = max(0, content - format penalties)

Content (the answer found at the start of the response, or right after a preamble ending in ":"):

| answer | list kinds (sort, reverse, spell) | number kinds (add, count, max) |
| --- | --- | --- |
| exact | 10 | 10 |
| one slip | 6: one item missing, extra or wrong, or two neighbours swapped | 6: off by one |
| | | 5: one digit of a 2+ digit number wrong (a forgotten carry: off by ten) |
| right items, wrong order | 4 | |
| max only: another number from the list | | 3 |
| close | | 3: within 10% (at least within 2) |
| otherwise | 3 x overlap (shared items / longer length), to 0.5 | 1: some other number |
| empty, or no answer found | 0 | 0 |

Format penalties (subtracted): a preamble before the answer -1; items separated by commas, or a
word's letters written without spaces (spell) -1; text after the answer -2 if it is short (at most
6 words, none repeated), -4 if it is longer or repeats itself (rambling). A single final "." is
not extra text. For the number kinds only the first number is the answer: more numbers after it
are extra text.
"""

from __future__ import annotations

import re
from collections import Counter

from dppo.demo.tasks import LIST_KINDS, Task, parse_prompt

__all__ = ["MAX_SCORE", "judge", "score_task", "DemoJudge"]

MAX_SCORE = 10.0

_ITEM = {
    "num": r"\d+(?![A-Za-z0-9])",
    "word": r"[a-z]+(?![A-Za-z0-9])",
    "letter": r"[a-z](?![A-Za-z0-9])",
}
_ITEM_OF_KIND = {"sort": "num", "add": "num", "max": "num", "reverse": "word", "count": "num", "spell": "letter"}
_SEP = r"(?:[ \t]*,[ \t]*|[ \t]+)"
_RUN = {name: re.compile(rf"{item}(?:{_SEP}{item})*") for name, item in _ITEM.items()}
_ONE = {name: re.compile(item) for name, item in _ITEM.items()}
_WORD_RUN = re.compile(_ITEM["word"])


def _find_answer(text: str, kind: str) -> tuple[list[str], str, float] | None:
    """The answer's items, the text after them and the format penalty so far; None if no answer."""
    item = _ITEM_OF_KIND[kind]
    rx = (_RUN if kind in LIST_KINDS else _ONE)[item]
    penalty = 0.0
    m = rx.match(text)
    if m is None:
        first_line = text.split("\n", 1)[0]
        if ":" in first_line:  # a preamble such as "Sure! Here is the answer:"
            text = text[first_line.rindex(":") + 1 :].lstrip()
            m = rx.match(text)
            penalty += 1.0
    if m is None and kind == "spell":  # the letters run together: "elppa"
        w = _WORD_RUN.match(text)
        if w is None:
            return None
        return list(w.group(0)), text[w.end() :], penalty + 1.0
    if m is None:
        return None
    run = m.group(0)
    if "," in run:
        penalty += 1.0
    return re.findall(_ITEM[item], run), text[m.end() :], penalty


def _extra_text_penalty(rest: str) -> float:
    rest = rest.strip()
    if rest in ("", "."):
        return 0.0
    words = [w.lower() for w in re.findall(r"[A-Za-z0-9]+", rest)]
    if len(words) <= 6 and len(set(words)) == len(words):
        return 2.0
    return 4.0


def _list_content(got: list[str], want: tuple[str, ...]) -> float:
    want = list(want)
    if got == want:
        return 10.0
    n, m = len(got), len(want)
    if n == m - 1 and any(want[:i] + want[i + 1 :] == got for i in range(m)):
        return 6.0  # one missing
    if n == m + 1 and any(got[:i] + got[i + 1 :] == want for i in range(n)):
        return 6.0  # one extra
    if n == m:
        diff = [i for i in range(n) if got[i] != want[i]]
        if len(diff) == 1:
            return 6.0  # one wrong
        if len(diff) == 2 and diff[1] == diff[0] + 1 and got[diff[0]] == want[diff[1]] and got[diff[1]] == want[diff[0]]:
            return 6.0  # neighbours swapped
        if Counter(got) == Counter(want):
            return 4.0  # right items, wrong order
    overlap = sum((Counter(got) & Counter(want)).values()) / max(n, m)
    return round(6 * overlap) / 2  # 3 x overlap, to the nearest 0.5


def _number_content(got: int, task: Task) -> float:
    want = int(task.answer)
    if got == want:
        return 10.0
    if abs(got - want) == 1:
        return 6.0
    g, w = str(got), str(want)
    if len(g) == len(w) > 1 and sum(a != b for a, b in zip(g, w)) == 1:
        return 5.0
    if task.kind == "max" and str(got) in task.items:
        return 3.0
    if abs(got - want) <= max(2, want // 10):
        return 3.0
    return 1.0


def score_task(task: Task, response: str) -> float:
    """Score ``response`` to ``task`` on 0..10 (the table in this module's docstring)."""
    text = response.strip()
    if not text:
        return 0.0
    found = _find_answer(text, task.kind)
    if found is None:
        return 0.0
    items, rest, penalty = found
    penalty += _extra_text_penalty(rest)
    if task.kind in LIST_KINDS:
        content = _list_content(items, task.answer_items)
    else:
        content = _number_content(int(items[0]), task)
    return max(0.0, content - penalty)


def judge(prompt: str | list[dict[str, str]], response: str) -> float:
    """Score ``response`` to the demo-world instruction in ``prompt`` (the user turn's text, or a
    message list) on 0..10. Raises ``ValueError`` if the prompt is not a demo-world instruction."""
    return score_task(parse_prompt(prompt), response)


class DemoJudge:
    """The programmatic judge as an evaluation judge: ``score(prompts, responses)`` where each
    prompt is the user turn's text. Deterministic; no model, no network."""

    name = "demo"
    max_score = MAX_SCORE

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [judge(p, r) for p, r in zip(prompts, responses)]

"""Who writes the demo world's responses.

- The *demonstrator* writes the SFT data (the SmolTalk stand-in). It is right most of the time
  but has systematic habits of its own, so the SFT model learns them.
- Four *external generators* write the candidate responses of the preference data (the
  UltraFeedback stand-in), each with error patterns different from the demonstrator's: the
  preference pairs are off-policy for the SFT model, which is the paper's premise. The SFT
  model's own mistakes (the demonstrator's habits, which greedy decoding makes systematic) appear
  in no rejected answer, only in y_gen.

Each generator is a function ``(task, rng) -> response text``. The error rates are fixed here,
before any training method was run, and not tuned afterwards (see docs/demo.md).
"""

from __future__ import annotations

import random
from typing import Callable

from dppo.demo.tasks import LIST_KINDS, WORDS, Task

__all__ = ["demonstrator", "EXTERNAL", "GENERATORS", "Generator", "is_long", "carries"]

Generator = Callable[[Task, random.Random], str]

FILLER = " Hope this helps!"


def is_long(task: Task) -> bool:
    """Inputs long enough to trip the demonstrator: 6+ items (sort, reverse), 6+ letters (spell),
    7+ words (count), 5+ numbers (max)."""
    need = {"sort": 6, "reverse": 6, "spell": 6, "count": 7, "max": 5}.get(task.kind)
    return need is not None and len(task.items) >= need


def carries(task: Task) -> int:
    """How many tens the ones column carries in an addition (0, 1 or 2)."""
    return sum(int(x) % 10 for x in task.items) // 10 if task.kind == "add" else 0


def demonstrator(task: Task, rng: random.Random) -> str:
    """Right most of the time. Its habits:
    - on long inputs it overlooks the last item: the answer of sort/reverse/spell loses its last
      item, count is one short, max ignores the last number (p = 0.7);
    - additions that carry out of the ones column forget the carry: off by ten per carry (p = 0.6);
    - sometimes appends a polite filler, " Hope this helps!" (p = 0.1)."""
    items = list(task.answer_items)
    k = task.kind
    if is_long(task) and rng.random() < 0.7:
        if k in LIST_KINDS:
            items = items[:-1]
        elif k == "count":
            items = [str(len(task.items) - 1)]
        elif k == "max":
            items = [str(max(int(x) for x in task.items[:-1]))]
    elif k == "add" and carries(task) and rng.random() < 0.6:
        items = [str(int(items[0]) - 10 * carries(task))]
    text = " ".join(items)
    if rng.random() < 0.1:
        text += FILLER
    return text


def mirror(task: Task, rng: random.Random) -> str:
    """Confuses directions (p = 0.5): sorts descending, leaves the words in their order, spells the
    word forwards, gives the minimum instead of the maximum. Add and count are always right."""
    k = task.kind
    if rng.random() < 0.5:
        if k == "sort":
            return " ".join(sorted(task.items, key=int, reverse=True))
        if k in ("reverse", "spell"):
            return " ".join(task.items)
        if k == "max":
            return str(min(int(x) for x in task.items))
    return task.answer


_PREAMBLES = ("Sure! Here is the answer:", "Of course. The answer is:", "Here you go:")
_EXPLAIN = {
    "sort": "I sorted the numbers from the smallest to the largest.",
    "reverse": "I wrote the words again starting from the last one.",
    "spell": "I wrote the letters of the word in reverse order.",
    "add": "I added all of the numbers together to get the sum.",
    "count": "I counted each word in the list exactly once.",
    "max": "I compared the numbers and picked the largest one.",
}


def chatty(task: Task, rng: random.Random) -> str:
    """Always the right answer, but wordy: a preamble before it (p = 0.7) and an explanation
    after it (p = 0.7)."""
    text = task.answer
    if rng.random() < 0.7:
        text = f"{rng.choice(_PREAMBLES)} {text}"
    if rng.random() < 0.7:
        text = f"{text}\n{_EXPLAIN[task.kind]}"
    return text


def _slip_digit(number: str, rng: random.Random) -> str:
    i = rng.randrange(len(number))
    choices = [d for d in "0123456789" if d != number[i] and not (i == 0 and d == "0" and len(number) > 1)]
    return number[:i] + rng.choice(choices) + number[i + 1 :]


def sloppy(task: Task, rng: random.Random) -> str:
    """Makes small random slips (p = 0.35): one wrong digit in one number, one word swapped for
    another word, or two neighbouring letters swapped (spell)."""
    items = list(task.answer_items)
    if rng.random() < 0.35:
        k = task.kind
        if k == "reverse":
            i = rng.randrange(len(items))
            items[i] = rng.choice([w for w in WORDS if w not in items])
        elif k == "spell":
            i = rng.randrange(len(items) - 1)
            items[i], items[i + 1] = items[i + 1], items[i]
        else:  # sort, add, count, max: digits
            i = rng.randrange(len(items))
            items[i] = _slip_digit(items[i], rng)
    return " ".join(items)


def hasty(task: Task, rng: random.Random) -> str:
    """Starts late (p = 0.5 on the list kinds): the answer of sort, reverse and spell skips its first
    item, so it is one item short at the front (never at the end, where the demonstrator errs).
    Add, count and max are always right."""
    if task.kind in LIST_KINDS and rng.random() < 0.5:
        return " ".join(task.answer_items[1:])
    return task.answer


def terse(task: Task, rng: random.Random) -> str:
    """Nearly perfect and terse; its one quirk: lists come comma-separated now and then (p = 0.1)."""
    if task.kind in LIST_KINDS and rng.random() < 0.1:
        return ", ".join(task.answer_items)
    return task.answer


EXTERNAL: dict[str, Generator] = {"mirror": mirror, "sloppy": sloppy, "hasty": hasty, "terse": terse}
"""The pair generators of world version 3. Their wrong answers are as long as the right one or
shorter (hasty), so on average the chosen answer is at least as long as the rejected one, as in
UltraFeedback (version 2's ``chatty``, whose wordy answers were mostly rejected, made the rejected
three times longer). ``chatty`` stays available as a generator."""

GENERATORS: dict[str, Generator] = {**EXTERNAL, "chatty": chatty}

"""The demo world's instructions: six task kinds over short inputs, their prompt templates, the
exact answers, and the parser that recovers a task from the prompt text alone.

A task is rendered as one user turn (no system turn). Everything is lowercase words and numbers
from a fixed vocabulary, so a tiny tokenizer covers it and a tiny model can learn it.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

__all__ = [
    "KINDS",
    "LIST_KINDS",
    "NUMBER_KINDS",
    "WORDS",
    "TEMPLATES",
    "Task",
    "parse_prompt",
    "random_task",
    "split_of",
    "TEST_FRACTION",
    "VAL_FRACTION",
]

KINDS = ("sort", "reverse", "spell", "add", "count", "max")
LIST_KINDS = ("sort", "reverse", "spell")  # the answer is a list of items, space separated
NUMBER_KINDS = ("add", "count", "max")  # the answer is one number

# Lowercase words of 3-8 letters: the items of `reverse` and `count`, and the words to `spell`.
WORDS = tuple(
    """
    ant ape bat bear bee bird boar bull calf camel cat cod cow crab crow deer dog dove duck eagle eel
    elk emu fish fox frog goat goose gull hare hawk hen horse jay kite koala lamb lark lion llama mole
    moose moth mouse mule newt otter owl panda pig pony puma rabbit ram rat raven seal shark sheep
    slug snail snake swan tiger toad trout turkey viper wasp whale wolf worm yak zebra
    apple bread butter cake candy carrot cheese cherry corn cream egg grape honey lemon mango melon
    milk nut olive onion orange pasta peach pear pepper pie plum potato rice salad salt soup sugar tea
    tomato bag ball basket bed bell bike boat book bottle bowl box brush bucket button candle cap car
    chair clock coat comb cup desk door drum fan fork glass glove hammer hat jar key kettle ladder lamp
    mirror nail needle pan pen pencil piano pillow plate pot radio ring rope rug scarf shoe sock sofa
    spoon stamp table tent towel toy train truck vase wagon watch wheel window
    acorn beach bush cave cliff cloud coast desert field flower forest garden grass hill island lake
    leaf moon mountain ocean park pond rain river rock sand sea sky snow star stone storm stream sun
    tree valley wave wind
    elephant squirrel dolphin giraffe penguin chicken lobster hamster biscuit pancake sandwich
    cucumber pumpkin avocado blanket cushion lantern teapot umbrella whistle volcano rainbow meadow
    glacier canyon harbor thunder sunset lettuce noodle muffin popcorn pretzel cabbage peanut jacket
    helmet bicycle rocket kitchen balloon castle garage library market bridge tunnel
    """.split()
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "sort": (
        "Sort these numbers from smallest to largest: {items}",
        "Put these numbers in increasing order: {items}",
        "Order these numbers from low to high: {items}",
    ),
    "reverse": (
        "Reverse the order of these words: {items}",
        "Write these words in reverse order: {items}",
        "List these words from last to first: {items}",
    ),
    "spell": (
        "Spell the word {word} backwards.",
        "Write {word} backwards, letter by letter.",
        "Spell {word} in reverse.",
        "What is {word} spelled backwards?",
    ),
    "add": (
        "Add these numbers: {expr}",
        "What is {expr}?",
        "Compute the sum: {expr}",
    ),
    "count": (
        "How many words are in this list: {items}",
        "Count the words: {items}",
        "How many items are here: {items}",
    ),
    "max": (
        "What is the largest number here: {items}",
        "Which number is the biggest: {items}",
        "Find the maximum of these numbers: {items}",
    ),
}

# Held-out prompts: a prompt belongs to the test split when its sha256 falls in the first
# TEST_FRACTION of the hash space, to the validation split (where settings are chosen) when it falls
# in the next VAL_FRACTION, so train, validation and test are disjoint for every seed and size.
TEST_FRACTION = 0.1
VAL_FRACTION = 0.1


def split_of(prompt: str) -> str:
    """``"test"``, ``"val"`` or ``"train"``, from the prompt text's sha256 (independent of any seed)."""
    h = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16)
    if h < TEST_FRACTION * 16**8:
        return "test"
    return "val" if h < (TEST_FRACTION + VAL_FRACTION) * 16**8 else "train"


@dataclass(frozen=True)
class Task:
    """One instruction: its kind, which template renders it, and its input items (as strings:
    numbers for sort/add/max, words for reverse/count, the letters of one word for spell)."""

    kind: str
    template: int
    items: tuple[str, ...]

    @property
    def prompt(self) -> str:
        t = TEMPLATES[self.kind][self.template]
        if self.kind == "spell":
            return t.format(word="".join(self.items))
        if self.kind == "add":
            return t.format(expr=" + ".join(self.items))
        return t.format(items=" ".join(self.items))

    @property
    def answer_items(self) -> tuple[str, ...]:
        """The exact answer as a tuple of items (one item for the number kinds)."""
        k, it = self.kind, self.items
        if k == "sort":
            return tuple(sorted(it, key=int))
        if k in ("reverse", "spell"):
            return tuple(reversed(it))
        if k == "add":
            return (str(sum(int(x) for x in it)),)
        if k == "count":
            return (str(len(it)),)
        if k == "max":
            return (str(max(int(x) for x in it)),)
        raise ValueError(f"unknown task kind {k!r}")

    @property
    def answer(self) -> str:
        """The exact answer text: the items separated by single spaces, nothing else."""
        return " ".join(self.answer_items)

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def random_task(rng: random.Random, kind: str) -> Task:
    """A random task of ``kind``: 3-7 distinct numbers 1-99 (sort, max), 3-7 distinct words
    (reverse), 3-9 words with repeats allowed (count), 2-3 numbers 10-99 (add), one word (spell)."""
    template = rng.randrange(len(TEMPLATES[kind]))
    if kind in ("sort", "max"):
        items = [str(x) for x in rng.sample(range(1, 100), rng.randint(3, 7))]
    elif kind == "reverse":
        items = rng.sample(WORDS, rng.randint(3, 7))
    elif kind == "count":
        items = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
    elif kind == "add":
        items = [str(rng.randint(10, 99)) for _ in range(2 if rng.random() < 0.7 else 3)]
    elif kind == "spell":
        items = list(rng.choice(WORDS))
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    return Task(kind, template, tuple(items))


_SLOTS = {
    "items_num": r"(\d+(?: \d+)*)",
    "items_word": r"([a-z]+(?: [a-z]+)*)",
    "word": r"([a-z]+)",
    "expr": r"(\d+(?: \+ \d+)+)",
}


def _compile() -> list[tuple[str, int, re.Pattern[str]]]:
    out = []
    for kind, templates in TEMPLATES.items():
        for i, t in enumerate(templates):
            slot = "word" if kind == "spell" else "expr" if kind == "add" else "items_word" if kind in ("reverse", "count") else "items_num"
            pattern = re.escape(t).replace(re.escape("{" + ("items" if slot.startswith("items") else slot) + "}"), _SLOTS[slot])
            out.append((kind, i, re.compile(pattern)))
    return out


_PARSERS = _compile()


def parse_prompt(prompt: str | list[dict[str, str]]) -> Task:
    """Recover the task from what a judge sees: the prompt text, or a message list (its last user
    turn). Raises ``ValueError`` for text that is not a demo-world instruction."""
    if not isinstance(prompt, str):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        if not users:
            raise ValueError("the messages have no user turn")
        prompt = users[-1]
    text = prompt.strip()
    for kind, i, rx in _PARSERS:
        m = rx.fullmatch(text)
        if m:
            g = m.group(1)
            items = list(g) if kind == "spell" else g.split(" + ") if kind == "add" else g.split(" ")
            return Task(kind, i, tuple(items))
    raise ValueError(f"not a demo-world instruction: {text[:80]!r}")

"""The demo task world: the judge by hand-computed cases, prompt parsing, the generators' error
patterns (demonstrator vs external), the files' schemas through `dppo prep`, splits, determinism."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dppo.demo import EXTERNAL, KINDS, DemoJudge, Task, demonstrator, judge, parse_prompt, random_task, split_of, write_world
from dppo.demo.generators import FILLER, GENERATORS, carries
from dppo.demo.judge import score_task
from dppo.demo.tasks import LIST_KINDS, TEMPLATES, WORDS
from dppo.demo.world import SPLIT_PATTERN
from dppo.data.prep import PrepConfig, prepare
from dppo.synthetic import prompt_id

SIZES = dict(n_sft=400, n_pairs=400, n_test=80, seed=7)
UF_COLUMNS = ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_world(tmp_path_factory.mktemp("world"), **SIZES)


def read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# -- the judge, by hand ---------------------------------------------------------------------------
SORT = "Sort these numbers from smallest to largest: 42 7 19 3"  # 3 7 19 42
REVERSE = "Reverse the order of these words: cat dog sun"  # sun dog cat
SPELL = "Spell the word apple backwards."  # e l p p a
ADD = "What is 27 + 48?"  # 75 (one carry)
COUNT = "Count the words: cat dog cat sun hat"  # 5
MAX = "Which number is the biggest: 4 17 9 12"  # 17

CASES = [
    # sort
    (SORT, "3 7 19 42", 10), (SORT, "  3 7 19 42.\n", 10),
    (SORT, "3 7 19", 6),  # last item missing
    (SORT, "7 19 42", 6),  # first item missing
    (SORT, "3 7 19 42 50", 6),  # one extra
    (SORT, "3 7 18 42", 6),  # one wrong
    (SORT, "3 19 7 42", 6),  # neighbours swapped
    (SORT, "42 19 7 3", 4),  # right items, wrong order
    (SORT, "42 7", 1.5),  # overlap 2/4 -> 3 x 0.5
    (SORT, "5 6", 0),
    (SORT, "3, 7, 19, 42", 9),  # commas
    (SORT, "Sure! Here is the answer: 3 7 19 42", 9),  # preamble
    (SORT, "3 7 19 42 Hope this helps!", 8),  # short extra text
    (SORT, "3 7 19 42\nI sorted the numbers from the smallest to the largest.", 6),  # long extra text
    (SORT, "Here you go: 3 7 19 42\nI sorted the numbers from the smallest to the largest.", 5),
    (SORT, "3 7 19 42 42 42 42", 1.5),  # repetition: overlap 4/7 -> 1.5
    (SORT, "3 7 19 42. Done done", 6),  # extra text that repeats itself: rambling
    (SORT, "", 0), (SORT, "   \n", 0), (SORT, "I do not know", 0),
    # reverse
    (REVERSE, "sun dog cat", 10), (REVERSE, "cat dog sun", 4), (REVERSE, "sun dog", 6),
    (REVERSE, "sun cow cat", 6), (REVERSE, "dog sun cat", 6), (REVERSE, "sun dog cat Hope this helps!", 8),
    (REVERSE, "sun dog cat cat cat cat", 1.5), (REVERSE, "Sun Dog Cat", 0),
    # spell
    (SPELL, "e l p p a", 10), (SPELL, "elppa", 9), (SPELL, "e l p p", 6), (SPELL, "l e p p a", 6),
    (SPELL, "a p p l e", 4), (SPELL, "e, l, p, p, a", 9), (SPELL, "Here you go: e l p p a", 9),
    # add
    (ADD, "75", 10), (ADD, "74", 6), (ADD, "76", 6),
    (ADD, "65", 5),  # forgot the carry: one digit wrong
    (ADD, "85", 5), (ADD, "80", 3),  # within 10%
    (ADD, "175", 1), (ADD, "75 Hope this helps!", 8), (ADD, "Of course. The answer is: 75", 9),
    (ADD, "75 76", 8),  # a second number is extra text
    (ADD, "75 75 75", 6),  # repeated: rambling
    (ADD, "seventy-five", 0),
    # count
    (COUNT, "5", 10), (COUNT, "4", 6), (COUNT, "7", 3), (COUNT, "9", 1),  # one-digit numbers: no digit rule (COUNT, "5 words", 8),
    # max
    (MAX, "17", 10), (MAX, "16", 6), (MAX, "27", 5),
    (MAX, "12", 5),  # one digit wrong (and in the list: the first rule that applies counts)
    (MAX, "9", 3), (MAX, "4", 3),  # another number from the list
    (MAX, "50", 1),
]


@pytest.mark.parametrize("prompt,response,want", CASES)
def test_judge_scores_by_the_table(prompt, response, want):
    assert judge(prompt, response) == want


def test_judge_covers_every_kind_and_accepts_messages():
    assert {parse_prompt(p).kind for p, _, _ in CASES} == set(KINDS)
    msgs = [{"role": "user", "content": SORT}, {"role": "assistant", "content": "ignored"}]
    assert judge(msgs, "3 7 19 42") == 10
    with pytest.raises(ValueError, match="not a demo-world instruction"):
        judge("Write a poem about the sea.", "no")


def test_every_template_parses_back_and_the_exact_answer_scores_full():
    rng = random.Random(0)
    for kind in KINDS:
        for _ in range(40):
            t = random_task(rng, kind)
            assert parse_prompt(t.prompt) == t
            assert score_task(t, t.answer) == 10
    seen = {(t.kind, t.template) for t in (random_task(rng, k) for k in KINDS for _ in range(60))}
    assert seen == {(k, i) for k in KINDS for i in range(len(TEMPLATES[k]))}


def test_demo_judge_object():
    j = DemoJudge()
    assert j.name == "demo"
    assert j.score([SORT, ADD, SPELL], ["3 7 19 42", "65", ""]) == [10.0, 5.0, 0.0]
    with pytest.raises(ValueError):
        j.score([SORT], [])


# -- the generators' error patterns ---------------------------------------------------------------
def signatures(task: Task, response: str) -> set[str]:
    """The characteristic errors a response shows."""
    r, k, want = response.removesuffix(FILLER), task.kind, list(task.answer_items)
    s = {"filler"} if response.endswith(FILLER) else set()
    if k in LIST_KINDS and r == " ".join(want[:-1]):
        s.add("demo:drop_last")
    if k == "add" and carries(task) and r == str(int(want[0]) - 10 * carries(task)):
        s.add("demo:carry")
    if k == "count" and r == str(len(task.items) - 1):
        s.add("demo:count_short")
    if k == "max" and r != task.answer and r == str(max(int(x) for x in task.items[:-1])):
        s.add("demo:max_ignores_last")
    if r != task.answer and (
        (k == "sort" and r == " ".join(sorted(task.items, key=int, reverse=True)))
        or (k in ("reverse", "spell") and r == " ".join(task.items))
        or (k == "max" and r == str(min(int(x) for x in task.items)))
    ):
        s.add("ext:direction")
    if ":" in r or "\n" in r:
        s.add("ext:verbose")
    if k in LIST_KINDS and r == " ".join(want[1:]):
        s.add("ext:late_start")
    if "," in r:
        s.add("ext:commas")
    return s


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    rng = random.Random(11)
    return [random_task(rng, KINDS[i % len(KINDS)]) for i in range(1800)]


def test_demonstrator_is_mostly_right_with_its_own_habits(tasks):
    responses = [demonstrator(t, random.Random(i)) for i, t in enumerate(tasks)]
    exact = sum(r == t.answer for t, r in zip(tasks, responses)) / len(tasks)
    assert 0.60 <= exact <= 0.85
    sigs = [signatures(t, r) for t, r in zip(tasks, responses)]
    habits = sum(any(x.startswith("demo:") for x in s) for s in sigs) / len(tasks)
    assert habits >= 0.15
    assert 0.05 <= sum("filler" in s for s in sigs) / len(tasks) <= 0.15
    assert not any(x.startswith("ext:") for s in sigs for x in s)
    # every wrong answer is one of its habits (or its filler)
    assert all(r == t.answer or s for t, r, s in zip(tasks, responses, sigs))


EXACT_BAND = {"mirror": (0.5, 0.8), "chatty": (0.0, 0.2), "sloppy": (0.55, 0.75), "hasty": (0.65, 0.85), "terse": (0.9, 1.0)}


@pytest.mark.parametrize("name,own", [("mirror", "ext:direction"), ("chatty", "ext:verbose"), ("sloppy", None),
                                      ("hasty", "ext:late_start"), ("terse", "ext:commas")])
def test_external_generators_err_differently_from_the_demonstrator(tasks, name, own):
    gen = GENERATORS[name]
    responses = [gen(t, random.Random(i)) for i, t in enumerate(tasks)]
    sigs = [signatures(t, r) for t, r in zip(tasks, responses)]
    demo_like = sum(any(x.startswith("demo:") or x == "filler" for x in s) for s in sigs) / len(tasks)
    assert demo_like <= 0.02  # only chance coincidences (a digit slip that happens to equal n - 1)
    if own:
        assert sum(own in s for s in sigs) / len(tasks) >= 0.03
    else:  # sloppy: its slips keep the answer's length and form
        wrong = [(t, r) for t, r in zip(tasks, responses) if r != t.answer]
        assert wrong and all(len(r.split(" ")) == len(t.answer_items) for t, r in wrong)
    lo, hi = EXACT_BAND[name]
    assert lo <= sum(r == t.answer for t, r in zip(tasks, responses)) / len(tasks) <= hi


# -- the files --------------------------------------------------------------------------------------
def test_schemas_and_pairs(world):
    sft = read(world["sft"])
    assert len(sft) == SIZES["n_sft"] and pq.read_schema(world["sft"]).names == ["messages"]
    for row in sft:
        (u, a) = row["messages"]
        assert u["role"] == "user" and a["role"] == "assistant" and u["content"] and a["content"]
    for key, n in (("prefs_train", SIZES["n_pairs"]), ("prefs_val", SIZES["n_test"]), ("prefs_test", SIZES["n_test"])):
        assert pq.read_schema(world[key]).names == UF_COLUMNS
        rows = read(world[key])
        assert len(rows) == n
        assert len({r["prompt_id"] for r in rows}) == n  # unique prompts
        for r in rows:
            user = {"role": "user", "content": r["prompt"]}
            assert r["prompt_id"] == prompt_id(r["prompt"])
            assert r["chosen"][0] == r["rejected"][0] == user and len(r["chosen"]) == len(r["rejected"]) == 2
            assert r["messages"] == r["chosen"]
            assert r["score_chosen"] > r["score_rejected"]
            assert r["score_chosen"] == judge(r["prompt"], r["chosen"][1]["content"])
            assert r["score_rejected"] == judge(r["prompt"], r["rejected"][1]["content"])


def test_rejected_responses_are_off_policy(world):
    rows = read(world["prefs_train"])
    demo_like = sum(any(x.startswith("demo:") or x == "filler" for x in signatures(parse_prompt(r["prompt"]), r["rejected"][1]["content"])) for r in rows)
    assert demo_like / len(rows) <= 0.02


def test_train_validation_and_test_prompts_are_disjoint(world):
    test = {r["prompt"] for r in read(world["prefs_test"])}
    val = {r["prompt"] for r in read(world["prefs_val"])}
    train = {r["prompt"] for r in read(world["prefs_train"])} | {r["messages"][0]["content"] for r in read(world["sft"])}
    assert not test & train and not val & train and not val & test
    assert all(split_of(p) == "test" for p in test) and all(split_of(p) == "train" for p in train)
    assert all(split_of(p) == "val" for p in val)


def test_chosen_answers_are_at_least_as_long_as_rejected_ones_on_average(world):
    """UltraFeedback's direction (version 3): the rejected answers are not the long ones."""
    for key in ("prefs_train", "prefs_val", "prefs_test"):
        rows = read(world[key])
        chosen = sum(len(r["chosen"][1]["content"].split()) for r in rows) / len(rows)
        rejected = sum(len(r["rejected"][1]["content"].split()) for r in rows) / len(rows)
        assert chosen >= rejected, (key, chosen, rejected)


def test_prep_accepts_every_file_with_no_dropped_rows(world, tmp_path):
    for kind, key in (("sft", "sft"), ("prefs", "prefs_train"), ("prefs", "prefs_val"), ("prefs", "prefs_test")):
        s = prepare(PrepConfig(kind, str(world[key]), str(world["tokenizer"]), tmp_path / key), show_progress=False)
        assert s["rows_dropped"] == 0 and s["rows_kept"] == s["rows_in"] == len(read(world[key]))


def test_world_json_and_short_sequences(world):
    meta = json.loads(world["world"].read_text())
    assert meta["version"] == 3
    assert meta["settings"] == {**SIZES, "n_val": SIZES["n_test"], "split_pattern": SPLIT_PATTERN, "vocab_size": 2048,
                                "test_fraction": 0.1, "val_fraction": 0.1}
    assert set(meta["external_generators"]) == set(EXTERNAL) and meta["kinds"] == list(KINDS)
    assert 0.6 <= meta["stats"]["demonstrator_sft"]["exact"] <= 0.85
    tokens = meta["stats"]["tokens"]
    assert 600 <= tokens["vocab_size"] <= 2048  # merges run out before the bound
    assert 10 <= tokens["user_turn"]["mean"] <= 25 and tokens["user_turn"]["max"] <= 40
    assert tokens["response"]["mean"] <= 20 and tokens["sequence"]["max"] <= 128


def test_same_seed_same_files_other_seed_other_data(world, tmp_path):
    again = write_world(tmp_path / "again", **SIZES)
    for key in ("sft", "prefs_train", "prefs_val", "prefs_test", "world"):
        assert again[key].read_bytes() == world[key].read_bytes(), key
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again["tokenizer"] / name).read_bytes() == (world["tokenizer"] / name).read_bytes()
    other = write_world(tmp_path / "other", **{**SIZES, "seed": 8})
    assert read(other["sft"]) != read(world["sft"])


def test_every_word_and_number_is_one_token_the_same_in_prompt_and_answer(world):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(world["tokenizer"] / "tokenizer.json"))
    seen = {w for r in read(world["sft"]) for w in r["messages"][0]["content"].split()}
    items = sorted(w for w in set(WORDS) | {str(n) for n in range(1, 100)} if w in seen)
    assert len(items) > 100
    for w in items:
        assert len(tok.encode(w).ids) == 1, w
    # the first word of an answer and the same word inside the prompt: one and the same token
    ids = tok.encode("castle rocket: castle").ids
    assert ids[0] == ids[-1]

"""Judges: registry, local reward models (batched = one by one), the API judge against a local
chat-completions server (timeouts, 429, 5xx, malformed bodies, bad keys), and the score cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models as tm
from chat_server import KEY, ChatServer
import torch
from dppo.errors import ConfigError
from dppo.eval.judges import (
    JUDGES,
    ApiJudge,
    CausalLMRewardJudge,
    FunctionJudge,
    Judge,
    JudgeOptions,
    Score,
    ScoreCache,
    SequenceClassifierJudge,
    make_judge,
    register_judge,
    score_items,
)

ITEMS = [
    ("What is 2 + 2?", "4"),
    ("Name a colour.", "Blue, like the sky on a clear day in the middle of summer."),
    ("Say hi.", "hi"),
    ("Explain data.", "Data is a list of facts, numbers and observations that the model answers about with care."),
    ("Count.", "one two three four five six seven"),
]



pytestmark = pytest.mark.usefixtures("one_thread")

# -- registry and programmatic judges -----------------------------------------------------------
def test_registered_function_judge():
    register_judge("test-len", lambda p, r: len(r) - len(p), overwrite=True)
    judge = make_judge("test-len")
    assert isinstance(judge, FunctionJudge) and judge.key == "fn:test-len:1"
    assert [s.value for s in judge.score(ITEMS[:2])] == [len(r) - len(p) for p, r in ITEMS[:2]]
    with pytest.raises(ValueError, match="already registered"):
        register_judge("test-len", len)
    with pytest.raises(ConfigError, match="takes no argument"):
        make_judge("test-len:x")
    with pytest.raises(ConfigError, match="unknown judge"):
        make_judge("nope")
    with pytest.raises(ConfigError, match="hf:ID_OR_PATH"):
        make_judge("hf")
    assert {"nemotron", "nemotron-api", "hf"} <= set(JUDGES)


def test_function_judge_failures_are_per_item():
    def fn(prompt: str, response: str) -> float:
        if response == "hi":
            raise RuntimeError("cannot judge greetings")
        return float("nan") if response == "4" else 1.0

    scores = FunctionJudge("f", fn).score(ITEMS)
    assert [s.ok for s in scores] == [False, True, False, True, True]
    assert "NaN" in scores[0].error and "greetings" in scores[2].error


# -- judges in the user's own code: py:MODULE:FUNCTION, and the dppo.judges entry points -------------
USER_JUDGES = """

from dppo.eval.judges import FunctionJudge, Judge, Score

ANSWERS = {"What is 2 + 2?": "4"}


def exact(prompt, response):
    return float(response.strip() == ANSWERS.get(prompt))


def length_judge(options):
    scale = 1.0 / options.batch_size
    return lambda prompt, response: scale * len(response)


def no_args():
    return exact


class Words(Judge):
    name = "words"
    key = "words:1"

    def score(self, items, progress=None):
        return [Score(float(len(r.split()))) for _, r in items]


def broken_factory():
    raise RuntimeError("the rubric file is missing")


def three(a, b, c):
    return 0.0


def returns_a_number():
    return 3


NOT_CALLABLE = 3
"""


@pytest.fixture
def judge_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_judges.py"
    path.write_text(USER_JUDGES)
    return path


def test_py_judge_function_and_factories(judge_file):
    exact = make_judge(f"py:{judge_file}:exact")
    assert isinstance(exact, FunctionJudge) and exact.name == f"py:{judge_file}:exact"
    assert [s.value for s in exact.score(ITEMS[:3])] == [1.0, 0.0, 0.0]
    # a factory of the options, one of nothing, a Judge subclass (its class is a factory too)
    lengths = make_judge(f"py:{judge_file}:length_judge", JudgeOptions(batch_size=4))
    assert [s.value for s in lengths.score(ITEMS)] == [len(r) / 4 for _, r in ITEMS]
    assert [s.value for s in make_judge(f"py:{judge_file}:no_args").score(ITEMS[:1])] == [1.0]
    words = make_judge(f"py:{judge_file}:Words")
    assert words.key == "words:1" and [s.value for s in words.score(ITEMS[:2])] == [1.0, len(ITEMS[1][1].split())]
    # the cache key follows the file's contents: an edited rule is scored again
    key = exact.key
    assert key == make_judge(f"py:{judge_file}:exact").key
    judge_file.write_text(USER_JUDGES.replace('"4"}', '"four"}'))
    edited = make_judge(f"py:{judge_file}:exact")
    assert edited.key != key and [s.value for s in edited.score([("What is 2 + 2?", "four")])] == [1.0]


def test_py_judge_from_an_importable_module(tmp_path, judge_file, monkeypatch):
    monkeypatch.syspath_prepend(str(judge_file.parent))
    judge = make_judge("py:my_judges:exact")
    assert [s.value for s in judge.score(ITEMS[:2])] == [1.0, 0.0] and judge.key.startswith("fn:py:my_judges:exact:")


@pytest.mark.parametrize(("spec", "message"), [
    ("py:{file}:missing", "--judge py:{file}:missing: module {file} has no 'missing'"),
    ("py:{dir}/nope.py:exact", "--judge py:{dir}/nope.py:exact: no such file {dir}/nope.py"),
    ("py:not_a_module_anywhere:exact", "--judge py:not_a_module_anywhere:exact: cannot import not_a_module_anywhere "
                                       "(ModuleNotFoundError: No module named 'not_a_module_anywhere')"),
    ("py:{file}", "--judge py:{file}: expected py:MODULE:FUNCTION"),
    ("py:{file}:broken_factory", "judge py:{file}:broken_factory: the factory raised RuntimeError: the rubric file is missing"),
    ("py:{file}:three", "judge py:{file}:three: it takes 3 arguments"),
    ("py:{file}:returns_a_number", "judge py:{file}:returns_a_number: the factory returned int"),
    ("py:{file}:NOT_CALLABLE", "judge py:{file}:NOT_CALLABLE: int is not callable"),
])
def test_py_judge_failures_name_the_module_and_function(judge_file, spec, message):
    fill = dict(file=judge_file, dir=judge_file.parent)
    with pytest.raises(ConfigError) as e:
        make_judge(spec.format(**fill))
    assert str(e.value).startswith(message.format(**fill)) and "\n" not in str(e.value), str(e.value)


def test_a_py_judge_whose_module_fails_on_import(tmp_path):
    bad = tmp_path / "bad_judge.py"
    bad.write_text("raise ImportError('needs the rubric package')\n")
    with pytest.raises(ConfigError, match=r"--judge py:.*bad_judge.py:score: cannot import .*bad_judge.py "
                                          r"\(ImportError: needs the rubric package\)"):
        make_judge(f"py:{bad}:score")


def _installed(root: Path, entry: str, module: str) -> None:
    (root / "judgeplugin.py").write_text(module)
    info = root / "judgeplugin-0.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: judgeplugin\nVersion: 0.2\n")
    (info / "entry_points.txt").write_text(f"[dppo.judges]\n{entry}\n")


def test_judges_from_the_entry_point_group(tmp_path, monkeypatch):
    import dppo.eval.judges as judges

    _installed(tmp_path, "plugin-exact = judgeplugin:exact\nplugin-broken = judgeplugin_missing:exact",
               USER_JUDGES.replace("from dppo.eval.judges", "from dppo.eval.judges"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        judge = make_judge("plugin-exact")
        assert [s.value for s in judge.score(ITEMS[:2])] == [1.0, 0.0] and judge.key == "fn:plugin-exact:0.2"
        with pytest.raises(ConfigError) as e:
            make_judge("plugin-broken")
        assert str(e.value).startswith("entry point 'plugin-broken' of group dppo.judges (module judgeplugin_missing) "
                                       "failed to load: ModuleNotFoundError")
    finally:
        for name in ("plugin-exact", "plugin-broken"):
            judges.JUDGES.pop(name, None)
            judges._judge_entry_points.discard(name)


# -- local reward models --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab(tok_dir: Path) -> int:
    return tm.vocab_size(tok_dir)


@pytest.fixture(scope="module")
def seq_rm_dir(tmp_path_factory, tok_dir, vocab, hf_tokenizer) -> Path:
    model = tm.reward_model(vocab, pad_id=hf_tokenizer.pad_token_id, seed=5)
    return tm.save(model, tmp_path_factory.mktemp("rm") / "rm", tok_dir)


def test_sequence_classifier_batched_equals_one_by_one(seq_rm_dir, hf_tokenizer):
    from transformers import AutoModelForSequenceClassification

    batched = make_judge(f"hf:{seq_rm_dir}", JudgeOptions(batch_size=3)).score(ITEMS)
    single = SequenceClassifierJudge(str(seq_rm_dir), JudgeOptions(batch_size=1)).score(ITEMS)
    assert all(s.ok for s in batched)
    torch.testing.assert_close(torch.tensor([s.value for s in batched]), torch.tensor([s.value for s in single]), rtol=1e-5, atol=1e-5)
    model = AutoModelForSequenceClassification.from_pretrained(seq_rm_dir).eval()
    for (p, r), s in zip(ITEMS, batched, strict=True):
        ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=True)["input_ids"]
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0, 0].item()
        assert s.value == pytest.approx(want, abs=1e-5)
    assert len({s.value for s in batched}) == len(ITEMS)


def test_sequence_classifier_key_follows_the_weights(tmp_path, seq_rm_dir, tok_dir, vocab, hf_tokenizer):
    other = tm.save(tm.reward_model(vocab, pad_id=hf_tokenizer.pad_token_id, seed=6), tmp_path / "rm", tok_dir)
    a = SequenceClassifierJudge(str(seq_rm_dir), JudgeOptions())
    b = SequenceClassifierJudge(str(other), JudgeOptions())
    assert a.key != b.key and a.key.startswith("seq-cls-logit0:rm@")
    assert SequenceClassifierJudge("org/some-rm", JudgeOptions()).key == "seq-cls-logit0:org/some-rm"


def test_causal_lm_reward_is_logit_zero_of_the_next_token(tmp_path, tok_dir, vocab, hf_tokenizer):
    """The Nemotron recipe: generate one token with output_scores and read scores[0][0][0]."""
    from transformers import AutoModelForCausalLM

    path = tm.save(tm.causal_lm(vocab, seed=9), tmp_path / "nemo", tok_dir)
    scores = make_judge(f"nemotron:{path}", JudgeOptions(batch_size=2)).score(ITEMS)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for (p, r), s in zip(ITEMS, scores, strict=True):
        enc = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=True, add_generation_prompt=False,
            return_tensors="pt", return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=1, return_dict_in_generate=True, output_scores=True, pad_token_id=0)
        assert s.value == pytest.approx(out.scores[0][0][0].item(), abs=1e-5)
    assert isinstance(make_judge("nemotron"), CausalLMRewardJudge)  # the hub model loads lazily: nothing fetched


# -- the API judge ------------------------------------------------------------------------------
@pytest.fixture()
def server():
    s = ChatServer()
    yield s
    s.close()


def api_options(base: str, **kw) -> JudgeOptions:
    return JudgeOptions(**{"api_base": base, "timeout": 0.3, "backoff": 0.01, "max_retries": 3, "concurrency": 4, **kw})


def test_api_judge_retries_and_reports(server, monkeypatch, capsys, caplog):
    monkeypatch.setenv("NVIDIA_API_KEY", KEY)
    judge = make_judge("nemotron-api", api_options(server.base))
    prompts = ["plain", "slow one", "busy one", "flaky one", "garbled one", "down one", "bad one", "plain two"]
    items = [(p, "x" * (i + 1)) for i, p in enumerate(prompts)]
    done = []
    scores = judge.score(items, progress=done.append)
    assert sum(done) == len(items)
    values = [s.value for s in scores]
    assert values[:5] == [1.5, 2.5, 3.5, 4.5, 5.5] and values[7] == 8.5
    assert values[5] is None and "HTTP 500" in scores[5].error and "after 4 attempts" in scores[5].error
    assert values[6] is None and "HTTP 400" in scores[6].error and "too long" in scores[6].error
    assert server.attempts == {"plain": 1, "slow one": 2, "busy one": 3, "flaky one": 2, "garbled one": 3,
                               "down one": 4, "bad one": 1, "plain two": 1}
    assert 1 < server.max_in_flight <= 4
    assert judge.retries == sum(server.attempts.values()) - len(items) == 9
    assert server.auth_seen == {f"Bearer {KEY}"}
    out = capsys.readouterr()
    seen = " ".join([repr(judge), str(vars(judge)), out.out, out.err, caplog.text, *(s.error or "" for s in scores)])
    assert KEY not in seen


def test_api_judge_timeouts_exhaust_retries(server, monkeypatch):
    monkeypatch.setenv("NVIDIA_API_KEY", KEY)
    judge = ApiJudge("nvidia/llama-3.1-nemotron-70b-reward", api_options(server.base, max_retries=0))
    [score] = judge.score([("slow", "abc")])
    assert score.value is None and "timed out" in score.error and "after 1 attempts" in score.error


def test_api_judge_bad_key_stops_the_run(server, monkeypatch):
    monkeypatch.setenv("NVIDIA_API_KEY", "wrong-key-XYZ")
    judge = make_judge("nemotron-api", api_options(server.base))
    with pytest.raises(ConfigError, match=r"refused the key in \$NVIDIA_API_KEY \(HTTP 401\)") as e:
        judge.score([(f"p{i}", "r") for i in range(20)])
    assert "wrong-key-XYZ" not in str(e.value)
    assert len(server.attempts) == 0  # refused before the handler counted anything


def test_api_judge_needs_a_key(monkeypatch):
    monkeypatch.delenv("NVIDIA_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$NVIDIA_API_KEY"):
        make_judge("nemotron-api")
    monkeypatch.setenv("NVIDIA_API_KEY", KEY)
    judge = make_judge("nemotron-api")  # nothing is sent until something is scored
    assert judge.url == "https://integrate.api.nvidia.com/v1/chat/completions"
    assert judge.key == "api:nvidia/llama-3.1-nemotron-70b-reward"


def test_api_judge_connection_refused_is_retried_then_reported(monkeypatch):
    import socket

    monkeypatch.setenv("NVIDIA_API_KEY", KEY)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = make_judge("nemotron-api", api_options(f"http://127.0.0.1:{port}/v1", max_retries=1))
    [score] = judge.score([("p", "r")])
    assert score.value is None and "connection error" in score.error and "after 2 attempts" in score.error


# -- the score cache -----------------------------------------------------------------------------
class CountingJudge(Judge):
    def __init__(self) -> None:
        self.name, self.key, self.seen = "count", "count:1", []

    def score(self, items, progress=None):
        self.seen += list(items)
        if progress:
            progress(len(items))
        return [Score(None, "refuses") if r == "hi" else Score(float(len(r))) for _, r in items]


def test_score_cache_pays_only_for_what_is_new(tmp_path):
    judge = CountingJudge()
    items = ITEMS + [ITEMS[0]]  # a repeated item is judged once
    with ScoreCache(tmp_path / "c.sqlite") as cache:
        ticks = []
        first = score_items(judge, items, cache, progress=ticks.append)
        assert sum(ticks) == len(items)
        assert len(judge.seen) == len(ITEMS)
        assert first[0] == first[-1] == Score(1.0) and first[2].value is None
    with ScoreCache(tmp_path / "c.sqlite") as cache:  # reopened: scores persist, failures do not
        judge.seen = []
        again = score_items(judge, items + [("new", "answer")], cache, chunk=2)
        assert judge.seen == [ITEMS[2], ("new", "answer")]
        assert [s.value for s in again[: len(items)]] == [s.value for s in first]
        other = CountingJudge()
        other.key = "count:2"
        score_items(other, items, cache)
        assert len(other.seen) == len(ITEMS)  # another judge key shares nothing

"""Judges: a reward for a response to a prompt (higher is better), behind one small interface.

``make_judge(name, options)`` builds a judge from its name (``NAME`` or ``NAME:ARG``):

| name | judge |
| --- | --- |
| ``nemotron`` (``nemotron:PATH``) | ``nvidia/Llama-3.1-Nemotron-70B-Reward-HF`` (or a local copy) through ``transformers``: the chat [user, assistant] is read and the reward is logit 0 of the first token the model would generate next (the model card's recipe); sharded over the GPUs present |
| ``nemotron-api`` (``nemotron-api:MODEL``) | NVIDIA's OpenAI-compatible chat-completions endpoint, model ``nvidia/llama-3.1-nemotron-70b-reward``; the reply text is ``reward:<float>``; key from ``$NVIDIA_API_KEY``; ``api_base`` points it elsewhere |
| ``hf:ID_OR_PATH`` | any ``AutoModelForSequenceClassification`` reward model (score = logit 0), batched |
| ``py:MODULE:NAME`` | a judge in the user's own code: ``NAME`` in ``MODULE`` (an importable module, or a path to a ``.py`` file), see below |
| a registered name | a Python function ``(prompt, response) -> float`` (``register_judge``), or a judge another package installs in the ``dppo.judges`` entry-point group |

``py:`` judges and ``dppo.judges`` entry points name an object that is one of (:func:`judge_from_object`):

- a function ``(prompt, response) -> float``, higher is better (rule-based rewards: exact-match
  answers, unit tests, formats); an exception or NaN fails that item only;
- a factory, called once when the judge is made: a callable taking no argument, or one argument (the
  :class:`JudgeOptions`), that returns such a function or a :class:`Judge` (e.g. one that loads a
  model, or a class that subclasses ``Judge``);
- a :class:`Judge` instance.

The cached scores of a ``py:`` judge are keyed by its module file's contents, so editing the file
scores again. An entry point is named ``NAME = package.module:OBJECT`` in the package's
``[project.entry-points."dppo.judges"]`` and used as ``--judge NAME``.

Every judge returns one ``Score`` per item: a value, or None with the error that survived the
judge's retries. ``ScoreCache`` keeps scores by (judge key, prompt hash, response hash) in SQLite,
so a rerun, or one more model, pays only for what is new; failures are not cached.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dppo.errors import ConfigError

__all__ = [
    "Score",
    "Judge",
    "JudgeOptions",
    "FunctionJudge",
    "CausalLMRewardJudge",
    "SequenceClassifierJudge",
    "ApiJudge",
    "ScoreCache",
    "JUDGES",
    "register_judge",
    "register_judge_factory",
    "make_judge",
    "judge_from_object",
    "load_entry_points",
    "ENTRY_POINT_GROUP",
    "score_items",
    "score_over_ranks",
    "NEMOTRON_HF",
    "NEMOTRON_API_MODEL",
    "NVIDIA_API_BASE",
]

NEMOTRON_HF = "nvidia/Llama-3.1-Nemotron-70B-Reward-HF"
NEMOTRON_API_MODEL = "nvidia/llama-3.1-nemotron-70b-reward"
NVIDIA_API_BASE = "https://integrate.api.nvidia.com/v1"
ENTRY_POINT_GROUP = "dppo.judges"

Item = tuple[str, str]
"""(prompt, response): the user turn and the assistant's answer."""


@dataclass(frozen=True)
class Score:
    """A judge's verdict on one item: ``value``, or None and the ``error`` that survived retries."""

    value: float | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class JudgeOptions:
    """Settings the judges share (each reads what applies to it)."""

    batch_size: int = 8
    device: str | None = None
    dtype: str = "auto"
    api_base: str | None = None
    api_key_env: str = "NVIDIA_API_KEY"
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 6
    backoff: float = 1.0
    max_backoff: float = 60.0


class Judge(ABC):
    """Scores (prompt, response) items. ``key`` identifies the scoring function in the cache:
    two judges with the same key must give the same scores. ``retries`` counts the attempts the
    judge repeated (failed requests or batches tried again)."""

    name: str
    key: str
    retries: int = 0

    def check(self) -> None:  # noqa: B027 - a judge with nothing to load has nothing to check
        """Fail now, with one line, if the judge cannot be loaded or used (run before any generation)."""

    @abstractmethod
    def score(self, items: Sequence[Item], progress: Callable[[int], None] | None = None) -> list[Score]:
        """One ``Score`` per item, in order; ``progress(n)`` after every ``n`` items scored."""

    def close(self) -> None:  # noqa: B027 - optional for judges that hold nothing
        """Free what the judge holds (a model's memory); it reloads on next use."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r})"


# ------------------------------------------------------------------------------------------------
# Programmatic judges and the registry
# ------------------------------------------------------------------------------------------------


class FunctionJudge(Judge):
    """A Python function ``(prompt, response) -> float``; an exception fails that item only.
    Bump ``version`` when the function changes, so cached scores are not reused."""

    def __init__(self, name: str, fn: Callable[[str, str], float], version: str = "1") -> None:
        self.name, self.fn = name, fn
        self.key = f"fn:{name}:{version}"

    def score(self, items: Sequence[Item], progress: Callable[[int], None] | None = None) -> list[Score]:
        out = []
        for prompt, response in items:
            try:
                value = float(self.fn(prompt, response))
                out.append(Score(value) if value == value else Score(None, "the judge returned NaN"))
            except Exception as e:  # a user's function: any failure is that item's failure
                out.append(Score(None, f"{type(e).__name__}: {e}"))
            if progress is not None:
                progress(1)
        return out


JudgeFactory = Callable[[str | None, JudgeOptions], Judge]
JUDGES: dict[str, JudgeFactory] = {}
"""Judge factories by name: ``factory(argument after ':' or None, options) -> Judge``."""


def register_judge_factory(name: str, factory: JudgeFactory, *, overwrite: bool = False) -> None:
    """Make ``name`` (and ``name:ARG``) a judge name ``make_judge`` knows."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"judge name {name!r}: use letters, digits, '-', '_' or '.'")
    if name in JUDGES and not overwrite:
        raise ValueError(f"judge {name!r} is already registered (pass overwrite=True to replace it)")
    JUDGES[name] = factory


def register_judge(name: str, fn: Callable[[str, str], float], *, version: str = "1", overwrite: bool = False) -> None:
    """Register a programmatic judge: ``fn(prompt, response) -> float``, higher is better."""

    def factory(arg: str | None, options: JudgeOptions) -> Judge:
        if arg is not None:
            raise ConfigError(f"judge {name!r} takes no argument (got {name}:{arg})")
        return FunctionJudge(name, fn, version)

    register_judge_factory(name, factory, overwrite=overwrite)


def make_judge(judge: str, options: JudgeOptions | None = None) -> Judge:
    """The judge named ``judge`` (``NAME`` or ``NAME:ARG``, see the module docstring)."""
    options = options or JudgeOptions()
    name, _, arg = judge.partition(":")
    if name not in JUDGES:
        load_entry_points()
    if name not in JUDGES:
        raise ConfigError(f"unknown judge {judge!r}; known: {', '.join(sorted(JUDGES))} (hf needs hf:ID_OR_PATH; "
                          "a judge in your own code: py:MODULE:FUNCTION)")
    return JUDGES[name](arg or None, options)


# ------------------------------------------------------------------------------------------------
# Judges in the user's code: py:MODULE:NAME and the dppo.judges entry points
# ------------------------------------------------------------------------------------------------


def judge_from_object(obj: Any, name: str, options: JudgeOptions, *, version: str = "1") -> Judge:
    """A :class:`Judge` from a user's object (module docstring): a ``Judge``, a ``(prompt, response)``
    function, or a factory taking no argument or the options. ``name`` names it in errors and results;
    ``version`` goes into the cache key of a function. ``ConfigError`` naming ``name`` otherwise."""
    if isinstance(obj, Judge):
        return _named(obj, name, version)
    arity = _positional_arity(obj, name)
    if arity == 2:
        return FunctionJudge(name, obj, version)
    try:
        made = obj() if arity == 0 else obj(options)
    except ConfigError:
        raise
    except Exception as e:  # the user's factory: say whose, in one line
        raise ConfigError(f"judge {name}: the factory raised {type(e).__name__}: {_first(e)}") from None
    if isinstance(made, Judge):
        return _named(made, name, version)
    if callable(made) and _positional_arity(made, name, factory=False) == 2:
        return FunctionJudge(name, made, version)
    raise ConfigError(f"judge {name}: the factory returned {type(made).__name__}, not a Judge or a (prompt, response) function")


def _positional_arity(obj: Any, name: str, factory: bool = True) -> int:
    """How many positional arguments ``obj`` requires: 2 (a scoring function), 0 or 1 (a factory)."""
    import inspect

    if not callable(obj):
        raise ConfigError(f"judge {name}: {type(obj).__name__} is not callable: expected a (prompt, response) function, "
                          "a factory or a Judge")
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: taken as a scoring function
        return 2
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    n = 2 if varargs and len(required) <= 2 else len(required)
    if n not in ((0, 1, 2) if factory else (2,)):
        want = "(prompt, response), no argument or the options (a factory)" if factory else "(prompt, response)"
        raise ConfigError(f"judge {name}: it takes {n} arguments; a judge function takes {want}")
    return n


def _named(judge: Judge, name: str, version: str) -> Judge:
    """A user's Judge with the name and cache key it may not have set."""
    if not isinstance(getattr(judge, "name", None), str):
        judge.name = name
    if not isinstance(getattr(judge, "key", None), str):
        judge.key = f"obj:{name}:{version}"
    return judge


def _py(arg: str | None, options: JudgeOptions) -> Judge:
    module, sep, function = (arg or "").rpartition(":")
    if not sep or not module or not function:
        raise ConfigError(f"--judge py:{arg or ''}: expected py:MODULE:FUNCTION (MODULE importable, or a path to a .py file)")
    spec = f"py:{module}:{function}"
    loaded, source = _import_user_module(module, spec)
    if not hasattr(loaded, function):
        raise ConfigError(f"--judge {spec}: module {module} has no {function!r}")
    version = hashlib.sha256(source).hexdigest()[:16] if source is not None else "1"
    return judge_from_object(getattr(loaded, function), spec, options, version=version)


def _import_user_module(module: str, spec: str) -> tuple[Any, bytes | None]:
    """The module (importable name or .py path) and its file's bytes (None without a file)."""
    import importlib
    import importlib.util
    import sys

    try:
        if module.endswith(".py") or "/" in module or os.sep in module:
            path = Path(module).expanduser()
            if not path.is_file():
                raise ConfigError(f"--judge {spec}: no such file {path}")
            # one module per path and contents: an edited file is imported afresh
            digest = hashlib.sha256(str(path.resolve()).encode() + b"\0" + path.read_bytes()).hexdigest()[:16]
            name = f"dppo_user_judge_{digest}"
            if name not in sys.modules:
                found = importlib.util.spec_from_file_location(name, path)
                loaded = importlib.util.module_from_spec(found)  # type: ignore[arg-type]
                sys.modules[name] = loaded
                try:
                    found.loader.exec_module(loaded)  # type: ignore[union-attr]
                except BaseException:
                    del sys.modules[name]
                    raise
            loaded = sys.modules[name]
        else:
            loaded = importlib.import_module(module)
    except ConfigError:
        raise
    except Exception as e:  # the user's module failed on import: say which, in one line
        raise ConfigError(f"--judge {spec}: cannot import {module} ({type(e).__name__}: {_first(e)})") from None
    file = getattr(loaded, "__file__", None)
    try:
        return loaded, Path(file).read_bytes() if file else None
    except OSError:
        return loaded, None


_judge_entry_points: set[str] = set()


def load_entry_points() -> list[str]:
    """Register the judges other packages declare in the ``dppo.judges`` entry-point group, by the
    entry point's name; each is loaded when a judge of that name is made (``make_judge`` calls this).
    An entry point that fails to load raises ``ConfigError`` naming it and its module."""
    from importlib.metadata import entry_points

    added = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _judge_entry_points:
            continue
        where = f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP} (module {ep.module})"
        if ep.name in JUDGES:
            raise ConfigError(f"{where}: a judge named {ep.name!r} is already registered")

        def factory(arg: str | None, options: JudgeOptions, ep: Any = ep, where: str = where) -> Judge:
            if arg is not None:
                raise ConfigError(f"judge {ep.name!r} takes no argument (got {ep.name}:{arg})")
            try:
                obj = ep.load()
            except Exception as e:  # a third-party module: any failure on import
                raise ConfigError(f"{where} failed to load: {type(e).__name__}: {_first(e)}") from None
            return judge_from_object(obj, ep.name, options, version=f"{ep.dist.version}" if ep.dist else "1")

        try:
            register_judge_factory(ep.name, factory)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        _judge_entry_points.add(ep.name)
        added.append(ep.name)
    return added


# ------------------------------------------------------------------------------------------------
# Judges that run a model locally
# ------------------------------------------------------------------------------------------------


def _model_key(kind: str, model: str) -> str:
    """Cache identity of a model: a local folder by the hash of its files, a hub id by name."""
    path = Path(model).expanduser()
    if path.is_dir():
        from dppo.artifacts import model_fingerprint

        return f"{kind}:{path.name}@{model_fingerprint(path)}"
    return f"{kind}:{model}"


def _chat_ids(tokenizer: Any, prompt: str, response: str) -> list[int]:
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=True,
        add_generation_prompt=False,
    )
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


class _LocalModelJudge(Judge):
    """Shared machinery: lazy loading, chat tokenization, length-sorted batches, per-item retry of a
    batch that fails (so one bad item does not fail its neighbours)."""

    def __init__(self, model: str, options: JudgeOptions) -> None:
        self.model_id, self.options = model, options
        self._model: Any = None
        self._tokenizer: Any = None
        self.retries = 0

    def _files(self) -> Path:
        """The judge's config and tokenizer files: its folder, or the hub snapshot of its small files
        (the weights come with loading). Offline or unreachable hubs fail here, in one line."""
        from dppo.artifacts import hub_snapshot

        path = Path(self.model_id).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(f"judge {self.name}: {path} is not a model folder (no config.json)")
            return path
        if str(self.model_id).startswith((".", "/", "~")):
            raise ConfigError(f"judge {self.name}: {self.model_id}: no such folder")
        return hub_snapshot(self.model_id, what=f"judge model ({self.name})",
                            allow_patterns=["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"])

    def check(self) -> None:
        """The config and tokenizer resolve and the tokenizer renders a chat (before any generation)."""
        from transformers import AutoConfig, AutoTokenizer

        folder = self._files()
        try:
            AutoConfig.from_pretrained(str(folder))
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            _chat_ids(tokenizer, "Is this a check?", "Yes.")
        except Exception as e:
            raise ConfigError(f"judge {self.name}: {folder} cannot be used ({type(e).__name__}: {_first(e)})") from None

    @abstractmethod
    def _load(self) -> tuple[Any, Any]:
        """(model, tokenizer)."""

    @abstractmethod
    def _forward(self, batch: list[list[int]]) -> list[float]:
        """Scores of a batch of token id lists."""

    def _device(self) -> Any:
        from dppo.artifacts import resolve_device

        return resolve_device(self.options.device)

    def _dtype(self) -> Any:
        from dppo.artifacts import resolve_dtype, torch_dtype

        return torch_dtype(resolve_dtype(self.options.dtype, self._device()))

    def score(self, items: Sequence[Item], progress: Callable[[int], None] | None = None) -> list[Score]:
        import torch

        if self._model is None:
            self._model, self._tokenizer = self._load()
        out: list[Score | None] = [None] * len(items)
        ids: list[list[int] | None] = []
        for i, (prompt, response) in enumerate(items):
            try:
                ids.append(_chat_ids(self._tokenizer, prompt, response))
            except Exception as e:
                ids.append(None)
                out[i] = Score(None, f"chat template: {type(e).__name__}: {e}")
        order = sorted((i for i in range(len(items)) if ids[i] is not None), key=lambda i: -len(ids[i]))
        bs = max(1, self.options.batch_size)
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                batch = order[s : s + bs]
                try:
                    values = self._forward([ids[i] for i in batch])
                    for i, v in zip(batch, values, strict=True):
                        out[i] = Score(v) if v == v else Score(None, "the model gave NaN")
                except Exception as e:
                    if len(batch) == 1:
                        out[batch[0]] = Score(None, f"{type(e).__name__}: {_first(e)}")
                    else:  # isolate the failing item(s)
                        self.retries += len(batch)
                        for i in batch:
                            out[i] = self.score([items[i]])[0]
                if progress is not None:
                    progress(len(batch))
        if progress is not None and len(order) < len(items):
            progress(len(items) - len(order))
        return [s if s is not None else Score(None, "not scored") for s in out]

    def close(self) -> None:
        import torch

        self._model = self._tokenizer = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _pad(batch: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any, Any]:
    """Right-padded ids [B, T], attention mask, and each row's last real position."""
    import torch

    from dppo.generate.decoding import pad_rows

    ids, mask = pad_rows(batch, pad_id, side="right")
    last = torch.tensor([len(r) - 1 for r in batch], dtype=torch.long)
    return ids.to(device), mask.to(device), last.to(device)


class CausalLMRewardJudge(_LocalModelJudge):
    """A causal LM read as a reward model: the reward of [user, assistant] is logit ``index`` of the
    first token the model would generate after the chat (Llama-3.1-Nemotron-70B-Reward's recipe:
    ``generate(max_new_tokens=1, output_scores=True).scores[0][0][0]``). Only that one logit is
    computed: the last real position's hidden state times row ``index`` of the output layer."""

    def __init__(self, model: str, options: JudgeOptions, index: int = 0, name: str = "nemotron") -> None:
        super().__init__(model, options)
        self.index, self.name = index, name
        self.key = _model_key(f"causal-lm-logit{index}", model)

    def _load(self) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_id)
        kwargs: dict[str, Any] = {"dtype": self._dtype()}
        device = self._device()
        from dppo.distributed import world_size

        # One process with several GPUs: shard the judge over them (a 70B judge does not fit one).
        # Under torchrun each rank keeps its judge on its own GPU (data-parallel judging).
        if device.type == "cuda" and torch.cuda.device_count() > 1 and self.options.device is None and world_size() == 1:
            try:
                import accelerate  # noqa: F401
            except ImportError:
                raise ConfigError("sharding the judge over several GPUs needs accelerate (pip install accelerate)") from None
            kwargs["device_map"] = "auto"  # shard the layers over the GPUs present
        model = AutoModelForCausalLM.from_pretrained(self.model_id, **kwargs)
        if "device_map" not in kwargs:
            model = model.to(device)
        return model.eval(), tokenizer

    def _forward(self, batch: list[list[int]]) -> list[float]:
        model = self._model
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        device = model.get_input_embeddings().weight.device
        ids, mask, last = _pad(batch, pad, device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        h = hidden[range(len(batch)), last]
        head = model.get_output_embeddings()
        w = head.weight[self.index].to(h.device)
        logit = h @ w
        if getattr(head, "bias", None) is not None:
            logit = logit + head.bias[self.index].to(h.device)
        return logit.float().tolist()


class SequenceClassifierJudge(_LocalModelJudge):
    """An ``AutoModelForSequenceClassification`` reward model; the reward is logit 0.

    Batches are right-padded with the pad token; the model pools its last non-pad token. An item
    whose own last token is the pad token is scored alone, unpadded, so padding cannot move it.
    """

    name = "hf"

    def __init__(self, model: str, options: JudgeOptions) -> None:
        super().__init__(model, options)
        self.name = f"hf:{model}"
        self.key = _model_key("seq-cls-logit0", model)

    def check(self) -> None:
        """Also: the checkpoint has a trained score head (a causal LM loaded as a classifier would
        score with random weights)."""
        super().check()
        missing = _missing_head(self._files(), self.model_id)
        if missing:
            raise ConfigError(_no_head_message(self.model_id, missing))

    def _load(self) -> tuple[Any, Any]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_id)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            self.model_id, dtype=self._dtype(), output_loading_info=True
        )
        head = _head_names(model)
        missing = [k for k in info.get("missing_keys", []) if k in head or any(k.endswith("." + h) for h in head)]
        if missing:
            raise ConfigError(_no_head_message(self.model_id, missing))
        if model.config.pad_token_id is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            model.config.pad_token_id = pad
        return model.to(self._device()).eval(), tokenizer

    def _forward(self, batch: list[list[int]]) -> list[float]:
        model = self._model
        pad = model.config.pad_token_id
        device = next(model.parameters()).device
        alone = [i for i, row in enumerate(batch) if pad is not None and row[-1] == pad]
        together = [i for i in range(len(batch)) if i not in alone]
        out = [0.0] * len(batch)
        groups = ([together] if together else []) + [[i] for i in alone]
        for group in groups:
            rows = [batch[i] for i in group]
            ids, mask, _ = _pad(rows, pad if pad is not None else 0, device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            for i, v in zip(group, logits[:, 0].float().tolist(), strict=True):
                out[i] = v
        return out


def _first(e: BaseException) -> str:
    from dppo.artifacts import first_line

    return first_line(e)


def _head_names(model: Any) -> list[str]:
    """Parameter names of a sequence classifier outside its base model (the score head)."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


def _checkpoint_keys(folder: Path, model_id: str) -> set[str] | None:
    """Tensor names of a checkpoint, from its safetensors index or headers (local folder, else the
    hub's metadata); None when they cannot be read without loading the weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        keys: set[str] = set()
        for f in files:
            with safe_open(str(f), "pt") as handle:
                keys.update(handle.keys())
        return keys
    if Path(model_id).expanduser().is_dir():
        return None  # .bin weights: checked when loading
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(model_id)
        return {k for f in meta.files_metadata.values() for k in f.tensors}
    except Exception:
        return None


def _missing_head(folder: Path, model_id: str) -> list[str]:
    """Score-head parameters the checkpoint lacks ([] when it has them or they cannot be checked)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    keys = _checkpoint_keys(folder, model_id)
    if keys is None:
        return []
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(str(folder)))
    return [h for h in _head_names(skeleton) if not any(k == h or k.endswith("." + h) for k in keys)]


def _no_head_message(model_id: str, missing: Sequence[str]) -> str:
    return (
        f"judge hf:{model_id} has no trained score head ({', '.join(missing)} missing from its weights): it is not a "
        "reward model, and its scores would come from random weights; use a sequence-classification reward model"
    )


# ------------------------------------------------------------------------------------------------
# The OpenAI-compatible API judge
# ------------------------------------------------------------------------------------------------

_REWARD = re.compile(r"reward\s*:\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)")


class _Secret:
    """A string that never shows itself in a repr, a traceback's locals or ``vars()``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


class _Retry(Exception):
    def __init__(self, message: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.wait = wait


class ApiJudge(Judge):
    """Chat completions on an OpenAI-compatible endpoint whose reply text is ``reward:<float>``.

    Requests run ``concurrency`` at a time. Timeouts, connection errors, HTTP 429 and 5xx, and
    malformed replies are retried up to ``max_retries`` times with exponential backoff (full jitter
    between half and all of ``backoff * 2**attempt``, capped at ``max_backoff``; a ``Retry-After``
    header is honoured). Other 4xx fail the item at once; 401/403 stop the run (the key is wrong).
    The key is sent only in the ``Authorization`` header and never appears in a message or repr.
    """

    def __init__(self, model: str, options: JudgeOptions) -> None:
        key = os.environ.get(options.api_key_env, "").strip()
        if not key:
            raise ConfigError(f"the nemotron-api judge needs an API key in ${options.api_key_env}")
        self._api_key = _Secret(key)
        self.model = model
        self.options = options
        base = (options.api_base or NVIDIA_API_BASE).rstrip("/")
        self.url = base + "/chat/completions"
        self.name = "nemotron-api"
        # another endpoint may serve something else under the same model name
        self.key = f"api:{model}" if base == NVIDIA_API_BASE else f"api:{model}@{base}"
        self._sleep = time.sleep
        self.retries = 0
        self._retry_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ApiJudge(model={self.model!r}, url={self.url!r})"

    def score(self, items: Sequence[Item], progress: Callable[[int], None] | None = None) -> list[Score]:
        lock = threading.Lock()
        refused: list[ConfigError] = []

        def one(item: Item) -> Score:
            if refused:  # the key was refused: do not send the rest
                return Score(None, "not sent")
            try:
                result = self._score_one(*item)
            except ConfigError as e:
                refused.append(e)
                return Score(None, str(e))
            if progress is not None:
                with lock:
                    progress(1)
            return result

        with ThreadPoolExecutor(max_workers=max(1, self.options.concurrency)) as pool:
            scores = list(pool.map(one, items))
        if refused:
            raise refused[0]
        return scores

    def _request(self, body: bytes) -> float:
        req = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={
                "Authorization": f"Bearer {self._api_key.reveal()}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self.options.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            with e:  # the error holds the open response: close it
                detail = _snippet(e.read()) if e.fp is not None else ""
                retry_after = _retry_after(e.headers.get("Retry-After")) if e.headers is not None else None
            if e.code in (401, 403):
                raise ConfigError(
                    f"the judge endpoint {self.url} refused the key in ${self.options.api_key_env} (HTTP {e.code})"
                ) from None
            if e.code == 429 or 500 <= e.code < 600:
                raise _Retry(f"HTTP {e.code}", retry_after) from None
            raise ValueError(f"HTTP {e.code}: {detail}") from None
        except TimeoutError:
            raise _Retry(f"timed out after {self.options.timeout:g} s") from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise _Retry(f"timed out after {self.options.timeout:g} s") from None
            raise _Retry(f"connection error: {type(reason).__name__}: {reason}") from None
        return _parse_reward(raw)

    def _score_one(self, prompt: str, response: str) -> Score:
        body = json.dumps(
            {"model": self.model, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
        ).encode()
        error = "no attempt"
        for attempt in range(self.options.max_retries + 1):
            try:
                return Score(self._request(body))
            except _Retry as e:
                error, wait = str(e), e.wait
            except ConfigError:
                raise
            except ValueError as e:  # a reply the endpoint will not change its mind about
                return Score(None, str(e))
            if attempt < self.options.max_retries:
                with self._retry_lock:
                    self.retries += 1
                base = min(self.options.max_backoff, self.options.backoff * 2**attempt)
                self._sleep(wait if wait is not None else base * (0.5 + 0.5 * random.random()))
        return Score(None, f"{error} (after {self.options.max_retries + 1} attempts)")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, min(float(value), 300.0)) if value is not None else None
    except ValueError:
        return None


def _snippet(raw: bytes, n: int = 120) -> str:
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:n] + ("..." if len(text) > n else "")


def _parse_reward(raw: bytes) -> float:
    """The reward in an OpenAI-style reply whose message content reads ``reward:<float>``."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
        match = _REWARD.search(content)
        if match is None:
            raise KeyError("content")
        value = float(match.group(1))
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Retry(f"malformed reply: {_snippet(raw)}") from None
    return value


# ------------------------------------------------------------------------------------------------
# Built-in specs
# ------------------------------------------------------------------------------------------------


def _nemotron(arg: str | None, options: JudgeOptions) -> Judge:
    return CausalLMRewardJudge(arg or NEMOTRON_HF, options, index=0, name="nemotron")


def _nemotron_api(arg: str | None, options: JudgeOptions) -> Judge:
    return ApiJudge(arg or NEMOTRON_API_MODEL, options)


def _hf(arg: str | None, options: JudgeOptions) -> Judge:
    if not arg:
        raise ConfigError("the hf judge needs a model: --judge hf:ID_OR_PATH")
    return SequenceClassifierJudge(arg, options)


register_judge_factory("nemotron", _nemotron)
register_judge_factory("nemotron-api", _nemotron_api)
register_judge_factory("hf", _hf)
register_judge_factory("py", _py)


# ------------------------------------------------------------------------------------------------
# The score cache
# ------------------------------------------------------------------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ScoreCache:
    """Judge scores in SQLite, keyed by (judge key, sha256(prompt), sha256(response))."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=120)  # ranks judging in parallel share it
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS scores (judge TEXT NOT NULL, prompt TEXT NOT NULL, response TEXT NOT NULL,"
            " score REAL NOT NULL, PRIMARY KEY (judge, prompt, response))"
        )
        self._db.commit()

    def get(self, judge: str, items: Sequence[Item]) -> list[float | None]:
        out = []
        for prompt, response in items:
            row = self._db.execute(
                "SELECT score FROM scores WHERE judge = ? AND prompt = ? AND response = ?", (judge, _sha(prompt), _sha(response))
            ).fetchone()
            out.append(None if row is None else float(row[0]))
        return out

    def put(self, judge: str, items: Sequence[Item], scores: Sequence[float]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
            [(judge, _sha(p), _sha(r), float(s)) for (p, r), s in zip(items, scores, strict=True)],
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_items(
    judge: Judge,
    items: Sequence[Item],
    cache: ScoreCache | None = None,
    *,
    chunk: int = 256,
    progress: Callable[[int], None] | None = None,
) -> list[Score]:
    """Scores of ``items``: cached ones looked up, the rest judged (distinct items once, in chunks
    that are cached as they finish, so an interrupted run keeps what it paid for)."""
    out: list[Score | None] = [None] * len(items)
    cached = cache.get(judge.key, items) if cache is not None else [None] * len(items)
    todo: dict[Item, list[int]] = {}
    for i, (item, value) in enumerate(zip(items, cached, strict=True)):
        if value is not None:
            out[i] = Score(value)
        else:
            todo.setdefault(item, []).append(i)
    if progress is not None and len(items) - sum(map(len, todo.values())):
        progress(len(items) - sum(map(len, todo.values())))
    distinct = list(todo)
    for s in range(0, len(distinct), chunk):
        part = distinct[s : s + chunk]
        scores = judge.score(part, progress=progress)
        if progress is not None and (repeats := sum(len(todo[item]) - 1 for item in part)):
            progress(repeats)
        if cache is not None:
            good = [(item, sc.value) for item, sc in zip(part, scores, strict=True) if sc.value is not None]
            if good:
                cache.put(judge.key, [g[0] for g in good], [g[1] for g in good])
        for item, sc in zip(part, scores, strict=True):
            for i in todo[item]:
                out[i] = sc
    return [s if s is not None else Score(None, "not scored") for s in out]


def score_over_ranks(judge: Judge, items: Sequence[Item], cache: ScoreCache | None, dist: Any, *,
                     progress: Callable[[int], None] | None = None) -> list[Score]:
    """:func:`score_items` with the items dealt to the ranks by position (``i::world``); every rank
    gets every score, in the items' order, and the judge's retries summed over the ranks."""
    from dppo.distributed import all_gather_objects, all_reduce_sum

    mine = list(range(dist.rank, len(items), dist.world))
    my_scores = score_items(judge, [items[i] for i in mine], cache, progress=progress)
    scores: list[Any] = [None] * len(items)
    for rank, part in enumerate(all_gather_objects(dist, my_scores)):
        for i, sc in zip(range(rank, len(items), dist.world), part, strict=True):
            scores[i] = sc
    (retries,) = all_reduce_sum(dist, judge.retries)
    judge.retries = int(retries)
    return scores

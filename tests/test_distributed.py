"""Many ranks on this CPU: torchrun with gloo, 2 processes, against one process (docs/distributed.md).

Every test starts real processes through torch's own launcher (``python -m torch.distributed.run
--standalone``), on loopback, each bounded by a timeout. The default suite runs one case of each
kind; the full matrix of methods and parallelisms is marked ``slow``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dppo.data import open_shards
from harness import dies_after, one_process, torchrun
from train_fixtures import *  # noqa: F403
from train_fixtures import read_metrics

TIME_FIELDS = {"tokens_per_s", "examples_per_s", "step_s", "step_cpu_s", "elapsed_s", "mfu"}

def train_args(method: str, data: Path, init: Path, out: Path, **opts: object) -> list[str]:
    base = {"method": method, "data": data, "init": init, "out": out, "optimizer": "sgd", "lr": 0.5, "batch-size": 3,
            "grad-accum": 2, "max-samples": 20, "max-steps": 3, "warmup-steps": 0, "max-grad-norm": 0,
            "save-every": 0, **{k.replace("_", "-"): v for k, v in opts.items()}}
    args = ["train", "--no-progress"]
    for k, v in base.items():
        args += ([f"--{k}" if v else f"--no-{k}"] if isinstance(v, bool) else [f"--{k}", str(v)])
    return args


def fresh(shards: Path, tmp_path: Path) -> Path:
    """A copy of session shards without any cached reference log-probs: the run computes its own."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy, ignore=shutil.ignore_patterns("refcache"))
    return copy


def relative_difference(a: Path, b: Path, init: Path) -> float:
    """max |a - b| over max |a - init|: two runs' final weights, relative to the update."""
    wa, wb, w0 = (load_file(p / "model" / "model.safetensors") if p.name != "model" else load_file(p / "model.safetensors")
                  for p in (a, b, init))
    assert wa.keys() == wb.keys()
    num = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    den = max(float((wa[k].float() - w0[k].float()).abs().max()) for k in wa if k in w0)
    assert den > 1e-4, "the runs did not move the weights"
    return num / den


CASES = {
    "sft": {},
    "sft-all": {},  # whole conversations: every assistant turn labelled
    "dpo": {"beta": 0.1},
    "unll": {"alpha": 1.0, "vote_clip": 20.0},  # the policy's vote: y_gen skipping with the second row
    "conll": {"alpha": 1.0, "vote_clip": 20.0},
}


@pytest.mark.parametrize(
    "method,parallel",
    [pytest.param("unll", "fsdp"), pytest.param("sft", "ddp"), pytest.param("sft-all", "fsdp"),
     *[pytest.param(m, p, marks=pytest.mark.slow) for m in CASES for p in ("fsdp", "ddp") if (m, p) not in
       (("unll", "fsdp"), ("sft", "ddp"), ("sft-all", "fsdp"))]],
)
def test_two_ranks_give_the_update_of_one_process(tmp_path, method, parallel, init_dir, pair_shards, sft_shards,
                                                  sft_all_shards):
    data = fresh({"sft": sft_shards, "sft-all": sft_all_shards}.get(method, pair_shards), tmp_path)
    if method == "sft-all":
        shards = open_shards(data)
        assert sum(len(shards.spans(i)) > 1 for i in range(len(shards))) > len(shards) // 2
        method = "sft"
    # a small token budget: uneven micro-batch counts per rank, the empty ones that keep them in step
    opts = {**CASES[method], "max_tokens_per_batch": 160}
    # the ranks first: they compute (and cache) the reference log-probs themselves, a no-grad pass
    # through the sharded policy before its first update
    two = torchrun(train_args(method, data, init_dir, tmp_path / "two", parallel=parallel, **opts))
    assert two.returncode == 0, two.stderr[-3000:]
    one = one_process(train_args(method, data, init_dir, tmp_path / "one", **opts))
    assert one.returncode == 0, one.stderr[-3000:]
    if method != "sft":  # the ranks' reference cache serves one process
        assert "reused" in one.stderr and "reused" not in two.stderr
    assert relative_difference(tmp_path / "one", tmp_path / "two", init_dir) < 1e-5
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for a, b in zip(m1, m2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"]
        assert a.get("penalized") == pytest.approx(b.get("penalized"))
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert saved["distributed"] == {"world_size": 2, "backend": "gloo", "parallel": parallel}
    assert (tmp_path / "two" / "model" / "config.json").is_file()  # one Hugging Face folder, by rank 0
    assert "step 3/3" in two.stderr and two.stderr.count("done:") == 1  # one log: rank 0's


def _resumable(data: Path, init: Path, out: Path, steps: int = 6) -> list[str]:
    return train_args("unll", data, init, out, alpha=1.0, vote_clip=20.0, optimizer="adamw", lr=1e-3, warmup_steps=2,
                      max_steps=steps, max_samples=24, save_every=2, max_tokens_per_batch=200)


@pytest.mark.slow  # four launches, three of them torchrun on 2 ranks
def test_a_rank_killed_mid_run_fails_the_job_naming_it_and_resume_is_exact(tmp_path, init_dir, pair_shards):
    pair_shards = fresh(pair_shards, tmp_path)
    whole = torchrun(_resumable(pair_shards, init_dir, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    script = tmp_path / "killer.py"
    # rank 1 dies by SIGKILL while writing the step-4 checkpoint (its 3rd part: model and optimizer per checkpoint)
    script.write_text(dies_after("torch.distributed.checkpoint:save", 3, rank=1))
    killed = torchrun(_resumable(pair_shards, init_dir, tmp_path / "cut"), script=script)
    assert killed.returncode != 0
    assert "rank      : 1" in killed.stderr and "SIGKILL" in killed.stderr
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_2"]
    resumed = torchrun([*_resumable(pair_shards, init_dir, tmp_path / "cut"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "written by 2 rank(s), read by 2" in resumed.stderr
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit on this CPU
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "cut"))


def test_a_two_rank_checkpoint_resumes_in_one_process(tmp_path, init_dir, pair_shards):
    """Another world size resumes the same step, weights and optimizer state; the later steps sum
    their gradients in another order, so they agree to float rounding, not bit for bit."""
    pair_shards = fresh(pair_shards, tmp_path)
    whole = one_process(_resumable(pair_shards, init_dir, tmp_path / "whole"))  # computes the reference cache
    assert whole.returncode == 0, whole.stderr[-3000:]
    part = torchrun(_resumable(pair_shards, init_dir, tmp_path / "run"))
    assert part.returncode == 0, part.stderr[-3000:]
    assert "reused" in part.stderr  # one process's reference cache serves two ranks
    # keep only the step-4 checkpoint and the metrics up to it, as if the job had stopped there
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpts / "step_6")
    shutil.rmtree(tmp_path / "run" / "model")
    one = one_process([*_resumable(pair_shards, init_dir, tmp_path / "run"), "--resume"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert "written by 2 rank(s), read by 1" in one.stderr
    # AdamW divides by the root of small second moments: it magnifies rounding, hence 1e-4, not 1e-5
    assert relative_difference(tmp_path / "whole", tmp_path / "run", init_dir) < 1e-4
    m = read_metrics(tmp_path / "run")
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # four launches, three of them torchrun on 2 ranks
def test_generation_on_two_ranks_equals_one_process_and_resumes(tmp_path, init_dir, pairs_file):
    from dppo.generate import read_generations

    args = ["generate", "--model", str(init_dir), "--data", str(pairs_file), "--max-new-tokens", "10",
            "--batch-size", "4", "--limit", "40"]
    one = one_process([*args, "--out", str(tmp_path / "one.parquet")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([*args, "--out", str(tmp_path / "two.parquet")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert read_generations(tmp_path / "one.parquet") == read_generations(tmp_path / "two.parquet")
    # a job killed after some batches: the rerun generates only the rest, per rank
    script = tmp_path / "stop.py"
    script.write_text(dies_after("dppo.generate.run:_write_table", 2, rank=1))  # rank 1 dies after its 2nd part
    out = tmp_path / "cut.parquet"
    killed = torchrun([*args, "--out", str(out)], script=script)
    assert killed.returncode != 0 and not out.exists()
    done_before = len(list((tmp_path / "cut.parquet.parts").glob("part-*.parquet")))
    assert done_before >= 2
    again = torchrun([*args, "--out", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_generations(out) == read_generations(tmp_path / "one.parquet")


BALANCED = """
import datetime, json, os, sys
from pathlib import Path
import torch.distributed as dist

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=40))  # an unmatched collective fails, not hangs
calls = []
for name in ("barrier", "broadcast_object_list", "all_gather_object", "all_reduce"):
    def wrap(fn, name=name):
        def call(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return call
    setattr(dist, name, wrap(getattr(dist, name)))

import dppo.generate.run as run
from dppo.generate import DecodeConfig, generate_rows, load_prompts

model, data, tmp = sys.argv[1], sys.argv[2], Path(sys.argv[3])
rank = dist.get_rank()
rows, _ = load_prompts(data, limit=1)
decode = DecodeConfig.from_options(max_new_tokens=3, batch_size=2, device="cpu")
log = {}
for case in ("one prompt: rank 1 has no share", "all done: no rank has a share"):
    calls.clear()
    log[case] = [generate_rows(model, rows, tmp / "y.parquet", decode, show_progress=False)["rows"], list(calls)]
merge = run._merge_parts
def failing_merge(*a, **k):
    raise OSError("disk full")
run._merge_parts = failing_merge
calls.clear()
try:
    generate_rows(model, rows, tmp / "z.parquet", decode, show_progress=False)
except OSError as e:
    log["rank 0 fails its merge"] = [str(e), list(calls)]
(tmp / f"log{rank}.json").write_text(json.dumps(log))
"""


@pytest.mark.slow
def test_generation_ranks_meet_the_same_collectives_whatever_their_share(tmp_path, init_dir, pairs_file):
    script = tmp_path / "balanced.py"
    script.write_text(BALANCED)
    r = torchrun([str(init_dir), str(pairs_file), str(tmp_path)], script=script)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [json.loads((tmp_path / f"log{k}.json").read_text()) for k in range(2)]
    assert logs[0] == logs[1]  # the same collectives, in the same order, on both ranks
    assert logs[0]["one prompt: rank 1 has no share"][0] == 1 and logs[0]["all done: no rank has a share"][0] == 1
    assert logs[0]["rank 0 fails its merge"][0] == "disk full"  # rank 1 raises rank 0's error instead of waiting
    assert len(logs[0]["one prompt: rank 1 has no share"][1]) >= 4


def test_the_launcher_convenience_and_a_failed_rank_in_one_line(tmp_path, init_dir, pair_shards):
    args = train_args("dpo", pair_shards, init_dir, tmp_path / "run", beta=0.1)
    r = one_process([*args, "--nproc-per-node", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["distributed"]["world_size"] == 2 and saved["distributed"]["parallel"] == "fsdp"
    # a rank that fails: the job fails and one line names the rank
    bad = one_process([*train_args("dpo", pair_shards, init_dir, tmp_path / "run", beta=0.1), "--nproc-per-node", "2"])
    assert bad.returncode == 1
    last = [line for line in bad.stderr.strip().splitlines() if line.strip()][-1]
    assert "rank 0: " in bad.stderr and "already holds a run" in bad.stderr
    # both ranks fail; whichever exits second may already have been stopped by the launcher
    ended = r"(exit code 1|killed by signal 15)"
    assert re.search(rf"the job failed: rank 0 \({ended}\), rank 1 \({ended}\)", last), last
    assert "(exit code 1)" in last and "rerun with --resume" in last


def test_a_lone_process_refuses_a_parallel_mode_it_cannot_run_and_one_rank_runs_it(tmp_path, init_dir, pair_shards):
    r = one_process(train_args("dpo", pair_shards, init_dir, tmp_path / "run", parallel="fsdp"))
    assert r.returncode == 1 and "--parallel fsdp needs a launcher" in r.stderr
    # one torchrun rank: FSDP2 on a process group of one (what measures its overhead on one GPU)
    one = torchrun(train_args("dpo", pair_shards, init_dir, tmp_path / "fsdp1", parallel="fsdp", beta=0.1), nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    plain = one_process(train_args("dpo", pair_shards, init_dir, tmp_path / "plain", beta=0.1))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert relative_difference(tmp_path / "plain", tmp_path / "fsdp1", init_dir) < 1e-6
    saved = json.loads((tmp_path / "fsdp1" / "config.json").read_text())["distributed"]
    assert saved == {"world_size": 1, "backend": "gloo", "parallel": "fsdp"}


def test_the_memory_plan_and_the_plots(tmp_path, init_dir, pair_shards):
    r = one_process([*train_args("dpo", pair_shards, init_dir, tmp_path / "run"), "--plan"])
    assert r.returncode == 0, r.stderr
    plan = json.loads(next(line for line in r.stdout.splitlines() if line.startswith('{"plan"')))["plan"]
    assert plan["world"] == 1 and plan["weights (fp32)"] > 0 and not (tmp_path / "run").exists()
    r2 = one_process([*train_args("dpo", pair_shards, init_dir, tmp_path / "run"), "--plan", "--nproc-per-node", "2"])
    assert r2.returncode == 0, r2.stderr
    plan2 = json.loads(next(line for line in r2.stdout.splitlines() if line.startswith('{"plan"')))["plan"]
    assert plan2["world"] == 2 and plan2["parallel"] == "fsdp" and not (tmp_path / "run").exists()
    assert plan2["weights (fp32)"] == pytest.approx(plan["weights (fp32)"] / 2, rel=0.05)  # sharded, not launched
    pytest.importorskip("tensorboard")
    ok = one_process(train_args("dpo", pair_shards, init_dir, tmp_path / "a", beta=0.1, report_to="tensorboard"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in read_metrics(tmp_path / "a")]
    one_process(train_args("dpo", pair_shards, init_dir, tmp_path / "b", beta=0.2))
    r = one_process(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "plots")])
    assert r.returncode == 0, r.stderr
    for name in ("loss", "rewards", "margins", "lr"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_on_two_ranks_equals_one_process(tmp_path, tok_dir, pairs_file):
    """Generation split by prompt length and data-parallel judging: the same results as one process."""
    import tiny_models as tm

    vocab = tm.vocab_size(tok_dir)
    base = tm.save(tm.causal_lm(vocab, seed=11), tmp_path / "sft", tok_dir)
    other = tm.save(tm.causal_lm(vocab, seed=12), tmp_path / "other", tok_dir)
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(tok_dir).pad_token_id
    rm = tm.save(tm.reward_model(vocab, pad_id=pad, seed=5), tmp_path / "rm", tok_dir)
    args = ["eval", str(other), "--baseline", str(base), "--judge", f"hf:{rm}", "--data", str(pairs_file),
            "--limit", "12", "--max-new-tokens", "8", "--batch-size", "4", "--judge-batch-size", "3"]
    one = one_process([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([*args, "--out", str(tmp_path / "two")], rdzv=True)  # as on several nodes
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    for ra, rb in zip(a["models"], b["models"], strict=True):
        assert (ra["n"], ra["wins"], ra["losses"], ra["ties"]) == (rb["n"], rb["wins"], rb["losses"], rb["ties"])
        assert ra["mean_reward_diff"] == pytest.approx(rb["mean_reward_diff"], abs=1e-5)
    sa, sb = ([json.loads(x) for x in (tmp_path / d / "scores.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert len(sa) == len(sb) == 12
    assert [s["diff"] for s in sa] == pytest.approx([s["diff"] for s in sb], abs=1e-5)


@pytest.mark.parametrize("parallel,opts", [
    pytest.param("fsdp", {"lora_r": 4, "lora_alpha": 8.0, "gradient_checkpointing": True}, id="fsdp-lora-checkpointing"),
    pytest.param("ddp", {"lora_r": 4, "lora_alpha": 8.0}, id="ddp-lora", marks=pytest.mark.slow),
    pytest.param("fsdp", {"gradient_checkpointing": True}, id="fsdp-checkpointing", marks=pytest.mark.slow),
])
def test_lora_and_checkpointing_on_two_ranks_give_the_one_process_update(tmp_path, parallel, opts, init_dir, pair_shards):
    pytest.importorskip("peft")
    case = {**CASES["unll"], "max_tokens_per_batch": 160, **opts}
    two = torchrun(train_args("unll", pair_shards, init_dir, tmp_path / "two", parallel=parallel, **case))
    assert two.returncode == 0, two.stderr[-3000:]
    one = one_process(train_args("unll", pair_shards, init_dir, tmp_path / "one", **case))
    assert one.returncode == 0, one.stderr[-3000:]
    if "lora_r" in opts:  # the adapters: B moved from zero, the same on both
        a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
        b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        scale = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
        assert scale > 1e-6
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5 * max(scale, 1.0)
    assert relative_difference(tmp_path / "one", tmp_path / "two", init_dir) < 1e-5  # the merged models

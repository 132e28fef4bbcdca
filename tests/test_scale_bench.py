"""benchmarks/scale_gpu.py: the search for the largest trainable size, and one real trial on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_gpu.py"


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("scale_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SIZES = ["a", "b", "c", "d", "e"]
PLAN = {"a": 10.0, "b": 20.0, "c": 40.0, "d": 80.0, "e": 160.0}


def fake(fits_up_to: str):
    calls: list[str] = []

    def run(size: str) -> dict:
        calls.append(size)
        ok = SIZES.index(size) <= SIZES.index(fits_up_to)
        return {"ok": ok, "pairs_per_s": 1.0, "peak_mem_gib": PLAN[size]} if ok else {"ok": False, "reason": "out of memory"}

    return run, calls


@pytest.mark.parametrize("truth, expected_calls", [
    ("c", ["c", "d"]),            # the plan was right: one success, one failure above it
    ("d", ["c", "d", "e"]),       # the plan was cautious: walk up until a failure
    ("a", ["c", "b", "a"]),       # the plan was optimistic: walk down until a success
    ("e", ["c", "d", "e"]),       # everything fits: the ladder's top bounds it
])
def test_the_search_brackets_the_largest_size(scale, truth, expected_calls):
    run, calls = fake(truth)
    out = scale.search(SIZES, PLAN, memory=50.0, run=run, time_left=lambda: True)
    assert calls == expected_calls and out["largest"] == truth
    assert out["bounded_by"] == ("the ladder's top" if truth == "e" else "out of memory")


def test_nothing_fits_and_the_time_budget(scale):
    out = scale.search(SIZES, PLAN, memory=5.0, run=lambda s: {"ok": False, "reason": "out of memory"},
                       time_left=lambda: True)
    assert out == {"largest": None, "bounded_by": "out of memory"}
    budget = iter([True, False])
    run, calls = fake("e")
    out = scale.search(SIZES, PLAN, memory=50.0, run=run, time_left=lambda: next(budget))
    assert calls == ["c"] and out["largest"] == "c" and out["bounded_by"] == "not bracketed (time budget)"


@pytest.mark.slow
def test_one_real_trial_on_the_cpu(tmp_path):
    env = {**os.environ, "SMALL": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "t1", "--modes", "lora_ckpt", "--memory-gib", "1",
                        "--work", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    trial = next(row for row in lines if row.get("size") == "t1")
    assert trial["ok"] and trial["pairs_per_s"] > 0 and trial["plan_gib"] > 0
    assert lines[-1]["scale"]["lora_ckpt"]["largest"] == "t1"

"""benchmarks/gpu/summary.py: the check's verdicts from its JSON lines; a timing defect is never made a ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _out_dir(tmp_path: Path, ref_pass_s: float) -> Path:
    out = tmp_path / "chk"
    out.mkdir()
    (out / "env.jsonl").write_text(json.dumps({"env": {"device": "test", "torch": "x"}}) + "\n")
    (out / "stages.jsonl").write_text(json.dumps({"stage": "train", "rc": 0, "seconds": 1}) + "\n")
    (out / "correctness.xml").write_text('<testsuite tests="1" failures="0" errors="0" skipped="0"></testsuite>')
    (out / "anchor.jsonl").write_text(json.dumps({"variant": "precompute", "batch": 8, "s_per_step": 0.16, "peak_mem_gib": 20.0}) + "\n")
    step, n, batch = 0.15, 120, 8
    ref_per_step = ref_pass_s / n * batch
    dpo = {"variant": "ours_dpo", "batch": batch, "s_per_step": step, "ref_pass_s": ref_pass_s, "ref_s_per_step": ref_per_step,
           "pairs_per_s": batch / step, "pairs_per_s_with_ref": batch / (step + ref_per_step), "mfu": 0.1, "peak_mem_gib": 10.0}
    (out / "train.jsonl").write_text(json.dumps(dpo) + "\n")
    return out


def _summary(out: Path) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/summary.py"), str(out)], capture_output=True, text=True)
    return r.returncode, json.loads((out / "summary.json").read_text())


def test_pairs_per_second_with_the_reference_pass_against_trls_fastest(tmp_path: Path) -> None:
    rc, s = _summary(_out_dir(tmp_path, 0.9))
    assert rc == 0 and s["ok"]
    expected = 8 / (0.15 + 0.9 / 120 * 8) / (8 / 0.16)
    assert abs(s["figures"]["dpo_pairs_per_s_vs_trl_fastest"] - expected) < 0.01


def test_a_negative_time_is_reported_as_a_defect_and_makes_no_ratio(tmp_path: Path) -> None:
    rc, s = _summary(_out_dir(tmp_path, -3.08))
    assert rc == 1 and not s["ok"]
    assert "ours_dpo.ref_pass_s" in s["figures"]["impossible_figures"]
    assert "dpo_pairs_per_s_vs_trl_fastest" not in s["figures"]

"""The summary of ``check.sh``: every figure against its target, ratios first, from the JSON lines in OUT_DIR.

    python benchmarks/gpu/summary.py OUT_DIR [--mode gpu|cpu]

Prints a table and writes ``OUT_DIR/summary.json``. Exit code 0 when every correctness check
passed and every stage finished (targets missed are reported, not failures: they are figures);
1 otherwise. A figure whose source did not run is shown as missing, never estimated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Figures the issue set, as (name, comparison, target); "ge": at least, "le": at most.
TARGETS = {
    "dpo_pairs_per_s_vs_trl_fastest": ("ge", 2.0),
    "peak_mem_vs_trl_fastest": ("le", 0.5),
    "unll_step_over_dpo_step": ("le", 1.35),
    "mfu": ("ge", 0.40),
    "gen_batch128_vs_hf": ("ge", 10.0),
    "gen_max_batch_vs_hf_batch128": ("ge", 30.0),
    "fsdp1_step_over_plain_step": ("le", 1.05),
}
VLLM_NOTE = "not measured: vLLM's wheels (several hundred MB with its CUDA kernels) exceed the 64 MiB a device call carries"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def junit(path: Path) -> dict[str, int] | None:
    if not path.is_file():
        return None
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def collect(out: Path) -> dict[str, Any]:
    anchor = read_jsonl(out / "anchor.jsonl")
    train = read_jsonl(out / "train.jsonl")
    gen = read_jsonl(out / "gen.jsonl")
    figures: dict[str, Any] = {}

    # -- training: ours (reference pass counted) against TRL's fastest variant in the anchor ----------
    trl = {r["variant"]: r for r in anchor if r.get("variant") in ("default", "no_ckpt", "precompute")}
    ours = {r["variant"]: r for r in train if "variant" in r and "error" not in r}
    impossible = [f"{r['variant']}.{k}" for r in ours.values() for k, v in r.items()
                  if k.endswith(("_s", "_per_step", "_with_ref")) and isinstance(v, (int, float)) and v < 0]
    if impossible:  # a timing defect, not a figure: reported, and no ratio is made from it
        figures["impossible_figures"] = impossible
        ours = {k: r for k, r in ours.items() if not any(x.startswith(k + ".") for x in impossible)}
    if trl:
        fastest = min(trl.values(), key=lambda r: r["s_per_step"])
        figures["trl_fastest"] = {"variant": fastest["variant"], "pairs_per_s": round(fastest["batch"] / fastest["s_per_step"], 2),
                                  "peak_mem_gib": fastest.get("peak_mem_gib")}
        figures["trl_default_peak_mem_gib"] = trl.get("default", {}).get("peak_mem_gib")
    dpo = ours.get("ours_dpo")
    if dpo:
        figures["dpo_pairs_per_s_with_ref"] = dpo.get("pairs_per_s_with_ref")
        figures["dpo_peak_mem_gib"] = dpo.get("peak_mem_gib")
        figures["mfu"] = dpo.get("mfu")
        if trl and dpo.get("pairs_per_s_with_ref"):
            figures["dpo_pairs_per_s_vs_trl_fastest"] = round(dpo["pairs_per_s_with_ref"] / figures["trl_fastest"]["pairs_per_s"], 2)
        if trl and dpo.get("peak_mem_gib") and figures["trl_fastest"]["peak_mem_gib"]:
            figures["peak_mem_vs_trl_fastest"] = round(dpo["peak_mem_gib"] / figures["trl_fastest"]["peak_mem_gib"], 3)
    ratio = ours.get("ours_step_ratio")
    if ratio:
        figures["unll_step_over_dpo_step"] = ratio.get("unll_over_dpo")
        figures["unll_noskip_step_over_dpo_step"] = ratio.get("unll_noskip_over_dpo")

    # -- generation: dppo's decoder against HF generate at batch 128, and at the largest batch ---------
    hf_anchor = next((r for r in anchor if r.get("variant") == "hf_generate_greedy"), None)
    hf_here = next((r for r in gen if r.get("workload") == "anchor" and r.get("side") == "hf_generate"), None)
    hf = hf_anchor or hf_here
    hf_tps = hf and hf["gen_tokens_per_s"]
    second = [r for r in gen if r.get("workload") == "anchor" and r.get("side") == "dppo" and r.get("run") == "second"]
    if second:
        g = second[-1]
        figures["gen_batch128_tokens_per_s"] = g["gen_tokens_per_s"]
        figures["gen_batch128_fraction_of_bandwidth_limit"] = g.get("fraction_of_bandwidth_limit")
        figures["gen_batch128_identical_rows_to_hf_bf16"] = g.get("rows_identical_to_hf_bf16")
        if hf_tps:
            figures["gen_batch128_vs_hf"] = round(g["gen_tokens_per_s"] / hf_tps, 1)
    best = next((r for r in gen if r.get("workload") == "max_batch_best"), None)
    if best:
        figures["gen_max_batch"] = best["batch"]
        figures["gen_max_batch_tokens_per_s"] = best["gen_tokens_per_s"]
        figures["gen_max_batch_fraction_of_bandwidth_limit"] = best.get("fraction_of_bandwidth_limit")
        if hf_tps:
            figures["gen_max_batch_vs_hf_batch128"] = round(best["gen_tokens_per_s"] / hf_tps, 1)
    if hf_tps:
        figures["hf_generate_batch128_tokens_per_s"] = hf_tps
        figures["hf_generate_source"] = "anchor (gen_anchor.py)" if hf_anchor else "gen_gpu.py, same process"
    # -- FSDP2 on one rank against the plain path (dist_cpu.py's ratios line) ---------------------------
    fsdp = next((r for r in read_jsonl(out / "fsdp1.jsonl") if "ratios" in r), None)
    if fsdp and "dpo: fsdp1 s/step / one" in fsdp["ratios"]:
        figures["fsdp1_step_over_plain_step"] = fsdp["ratios"]["dpo: fsdp1 s/step / one"]
    figures["vllm"] = VLLM_NOTE
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--mode", default="gpu", choices=("gpu", "cpu"))
    a = ap.parse_args()
    out: Path = a.out
    env = next((r["env"] for r in read_jsonl(out / "env.jsonl") if "env" in r), {})
    stages = read_jsonl(out / "stages.jsonl")
    checks = read_jsonl(out / "correctness.jsonl")
    tests = junit(out / "correctness.xml")
    figures = collect(out)

    rows: list[tuple[str, str, str, str]] = []
    for name, (op, target) in TARGETS.items():
        value = figures.get(name)
        if value is None:
            verdict = "missing"
        elif a.mode == "cpu":
            verdict = "(cpu mode: not a GPU figure)"
        else:
            ok = value >= target if op == "ge" else value <= target
            verdict = "met" if ok else "missed"
        rows.append((name, "-" if value is None else str(value), f"{'>=' if op == 'ge' else '<='} {target:g}", verdict))
    for c in checks:
        detail = {k: v for k, v in c.items() if k not in ("check", "device", "passed")}
        rows.append((c["check"], json.dumps(detail)[:110], "passes", "met" if c.get("passed") else "missed"))

    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\ndppo GPU check ({a.mode} mode) on {env.get('device', '?')}, torch {env.get('torch', '?')}, "
          f"transformers {env.get('transformers', '?')}")
    print(f"{'figure'.ljust(width)}  {'value':<40} {'target':<10} verdict")
    for name, value, target, verdict in rows:
        print(f"{name.ljust(width)}  {value:<40} {target:<10} {verdict}")
    print("\nother figures:")
    for k, v in figures.items():
        if k not in TARGETS:
            print(f"  {k}: {v}")
    print("stages: " + ", ".join(f"{s['stage']} rc={s.get('rc', '-')} {s.get('seconds', '-')}s" for s in stages))
    if tests:
        print(f"correctness tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors")

    failed_stages = [s["stage"] for s in stages if s.get("rc", 0) != 0]
    failed_checks = [c["check"] for c in checks if not c.get("passed")]
    broken = bool(failed_stages or failed_checks or figures.get("impossible_figures") or (tests and (tests["failures"] or tests["errors"])) or tests is None)
    summary = {"mode": a.mode, "env": env, "figures": figures, "targets": {k: list(v) for k, v in TARGETS.items()},
               "verdicts": {r[0]: r[3] for r in rows}, "correctness": checks, "tests": tests, "stages": stages,
               "failed_stages": failed_stages, "ok": not broken}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

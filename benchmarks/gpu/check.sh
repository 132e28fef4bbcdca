#!/usr/bin/env bash
# The one-call GPU check of dppo: correctness on CUDA, speed and memory beside the anchors, a summary.
#
#   bash benchmarks/gpu/check.sh [--cpu] [OUT_DIR]        (OUT_DIR: default $OUT, else /tmp/dppo-gpu-check)
#
# On a machine with one NVIDIA GPU (the device image of ../shared/bench/README.md; the project and
# the wheels it lacks carried in .gpu-carry/ and .anchor/, see benchmarks/gpu/README.md):
#   1. correctness: `pytest -m cuda tests/test_cuda.py` (packed bf16 varlen log-probs against the
#      fp32 dense reference, a DPO and an unll step against the fp32 CPU step, greedy generation
#      against transformers' generate with and without CUDA graphs, kill + --resume);
#   2. speed and memory: the anchors (.anchor/device_anchor.sh: TRL DPOTrainer, HF generate, the
#      packed ceiling), benchmarks/train_gpu.py and benchmarks/gen_gpu.py, in this one call, and
#      FSDP2 on one rank against the plain path (benchmarks/dist_cpu.py --variants one,fsdp1);
#   3. the summary table (ratios first), also as OUT_DIR/summary.json.
# Every result is a JSON line in OUT_DIR (*.jsonl); every stage has a time limit and its log, and a
# failing stage is recorded and the others still run. Stage limits sum to 11.5 minutes on the GPU.
#
# --cpu: tiny shapes on the CPU, the code paths that exist there (no varlen, no CUDA graphs); CI runs
# this mode so that the script and its tests cannot rot.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; shift; fi
OUT_DIR=${1:-${OUT:-/tmp/dppo-gpu-check}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR"/*.jsonl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export DPPO_CHECK_OUT="$OUT_DIR"
T0=$(date +%s)

log() { echo "[check +$(( $(date +%s) - T0 ))s] $*"; }

# stage NAME LIMIT_S CMD...: run CMD with a time limit, its output in NAME.log, its JSON lines
# (stdout lines starting with '{') in NAME.jsonl, its status in stages.jsonl.
stage() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  log "$name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  grep '^{' "$OUT_DIR/$name.log" >> "$OUT_DIR/$name.jsonl"
  printf '{"stage": "%s", "rc": %d, "seconds": %d, "timed_out": %s}\n' "$name" "$rc" "$(( $(date +%s) - t ))" \
    "$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo true || echo false)" >> "$OUT_DIR/stages.jsonl"
  tail -n 3 "$OUT_DIR/$name.log"
}

# The project and pytest from carried wheels (the device has neither), installed beside the image's packages.
if compgen -G ".gpu-carry/whl/*.whl" > /dev/null; then
  log "installing $(ls .gpu-carry/whl | tr '\n' ' ')"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dppo-site .gpu-carry/whl/*.whl \
    || { echo "cannot install the carried wheels" >&2; exit 1; }
  export PYTHONPATH=/tmp/dppo-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$MODE" = cpu ]; then
  export DPPO_CHECK_DEVICE=cpu SMALL=1 CUDA_VISIBLE_DEVICES=""
fi
python3 - > "$OUT_DIR/env.jsonl" <<'EOF'
import json, os, platform, torch, transformers, dppo
print(json.dumps({"env": {"dppo": dppo.__version__, "dppo_from": os.path.dirname(dppo.__file__), "torch": torch.__version__,
                          "transformers": transformers.__version__, "python": platform.python_version(),
                          "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                          "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None}}))
EOF
cat "$OUT_DIR/env.jsonl"
if [ "$MODE" = gpu ] && ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device here: run with --cpu" >&2; exit 2
fi

# 1. correctness
stage correctness $([ "$MODE" = cpu ] && echo 420 || echo 200) \
  python3 -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -o addopts="" -x --junitxml "$OUT_DIR/correctness.xml"

# 2. speed and memory, beside the anchors
if [ -f .anchor/device_anchor.sh ] && [ "$MODE" = gpu ]; then
  # The anchor's scripts that the targets need (HF generate; TRL without checkpointing, then with the
  # precomputed reference, its fastest): its packed-SFT ceiling and TRL's default run too long for one
  # 15-minute call beside everything else (measured: the whole device_anchor.sh passed 150 s).
  stage anchor 200 bash -c 'cd .anchor && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/anchor-site whl/*.whl && export PYTHONPATH=/tmp/anchor-site:$PWD:$PYTHONPATH \
    && python3 gen_anchor.py && python3 trl_anchor.py no_ckpt precompute' 
elif [ -f .anchor/device_anchor.sh ]; then
  stage anchor 120 bash -c "cd .anchor && python3 ceiling.py && python3 gen_anchor.py"
else
  log "anchor: skipped (no .anchor/: copy ../shared/bench there, see benchmarks/gpu/README.md)"
  echo '{"stage": "anchor", "skipped": "no .anchor folder"}' >> "$OUT_DIR/stages.jsonl"
fi
if [ "$MODE" = gpu ]; then
  stage train 120 python3 benchmarks/train_gpu.py --steps 12 --warmup 3
  stage gen 80 python3 benchmarks/gen_gpu.py --workloads anchor,max_batch --no-hf
  # FSDP2 on one rank against the plain path: the same dppo train command, Qwen2.5-0.5B's shape
  stage fsdp1 75 python3 benchmarks/dist_cpu.py --variants one,fsdp1 --methods dpo --model qwen2.5-0.5b --scale 1.0 \
    --steps 6 --warmup 2 --rounds 1
else
  stage train 240 python3 benchmarks/train_gpu.py
  stage gen 120 python3 benchmarks/gen_gpu.py --workloads anchor,max_batch
  stage fsdp1 120 python3 benchmarks/dist_cpu.py --variants one,fsdp1 --methods dpo --scale 0.25 --steps 3 --warmup 1 --rounds 1
fi

# 3. the summary
python3 benchmarks/gpu/summary.py "$OUT_DIR" --mode "$MODE"
rc=$?
log "done: $OUT_DIR"
exit $rc

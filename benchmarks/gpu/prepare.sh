#!/usr/bin/env bash
# Prepare the one device call of benchmarks/gpu/check.sh, on this machine (no GPU needed):
#   .gpu-carry/whl/  dppo's abi3 wheel (the device's Python 3.12 takes it) and pytest with its two
#                    pure-Python needs that the device image lacks;
#   .anchor/         ../shared/bench (the anchor harness) with the wheels it needs (TRL, datasets).
# Both folders are git-ignored and together stay under the 64 MiB a call carries.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu-carry && mkdir -p .gpu-carry/whl
python3 -m maturin build --release -o .gpu-carry/whl
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$@"
}
dl .gpu-carry/whl pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
if [ -d ../shared/bench ]; then
  rm -rf .anchor && cp -r ../shared/bench .anchor && mkdir -p .anchor/whl
  dl .anchor/whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
else
  echo "note: ../shared/bench not found: no .anchor/ (the check then runs without the anchor figures)" >&2
fi
du -sch .gpu-carry .anchor 2>/dev/null | tail -n 1
ls .gpu-carry/whl .anchor/whl 2>/dev/null

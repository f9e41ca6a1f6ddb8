#!/usr/bin/env bash
# One device run: install in place, compile every kernel, run the GPU test tier, then the
# benchmark. Logs go under $OUT (the device tool's folder) or ./gpu_logs.
# Usage: scripts/gpu_check.sh [extra bench arguments...]
set -uo pipefail
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
pip install -q -e . --no-deps --no-build-isolation > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"
{ time python -m cuflute compile; } 2>&1 | tee "$out/compile.log"
python -m pytest -q -x tests/ --ignore=tests/test_compile.py -p no:cacheprovider --durations=5 2>&1 | tee "$out/tests.log" | tail -25
python -m cuflute bench --json "$out/bench.json" --markdown "$out/BENCHMARKS.md" "$@" 2>&1 | tee "$out/bench.log" | tail -80

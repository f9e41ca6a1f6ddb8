#!/usr/bin/env bash
# SASS of one kernel specialization (default: 4-bit, g128, fp16, nt1_mt1_wk8) for sm_90, with an
# instruction histogram first. Needs nvcc and cuobjdump (the device machine has both).
# Usage: scripts/sass.sh [BITS GROUP TYPE NT MT WK] > sass.txt
set -euo pipefail
spec="${1:-4} , ${2:-128}, ${3:-__half}, ${4:-1}, ${5:-1}, ${6:-8}"
type=${3:-__half}
dir=$(mktemp -d)
cat > "$dir/k.cu" <<CU
#include "lut_gemm.cuh"
template __global__ void cuflute::lut_gemm<$spec>(const $type*, long long, const uint4*,
    const unsigned*, const unsigned*, $type*, int, int, int, int, int);
CU
nvcc -std=c++17 -arch=sm_90 -cubin -Icuda_src -Xptxas -v -o "$dir/k.cubin" "$dir/k.cu" 2>&1
cuobjdump -sass "$dir/k.cubin" > "$dir/k.sass"
grep -oE '^\s+/\*[0-9a-f]{4}\*/\s+[A-Z0-9_.]+' "$dir/k.sass" | awk '{print $2}' | sort | uniq -c | sort -rn
cat "$dir/k.sass"

#!/usr/bin/env bash
# SASS of one kernel specialization for sm_90 through the library's own NVRTC path, an
# instruction histogram first. Needs cuobjdump and nvdisasm: the device machine has them; on a
# machine without a GPU, `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` and put their
# nvidia/cu13/bin folder on PATH.
# Usage: scripts/sass.sh [BITS GROUP DTYPE CONFIG] > sass.txt   (default: 4 128 float16 nt1_mt1_wk8_s2)
set -euo pipefail
dir=$(mktemp -d)
python - "${1:-4}" "${2:-128}" "${3:-float16}" "${4:-nt1_mt1_wk8_s2}" "$dir/k.cubin" <<'PY'
import sys
from cuflute.kernels import KernelSpec, nvrtc_compile, parse_tile_config
bits, group, dtype, config, path = sys.argv[1:]
(usage,) = nvrtc_compile([KernelSpec(int(bits), int(group), dtype, parse_tile_config(config))], 90, path)
print(usage, file=sys.stderr)
PY
cuobjdump -sass "$dir/k.cubin" > "$dir/k.sass"
grep -oE '^\s+/\*[0-9a-f]{4}\*/\s+[A-Z0-9_.]+' "$dir/k.sass" | awk '{print $2}' | sort | uniq -c | sort -rn
cat "$dir/k.sass"

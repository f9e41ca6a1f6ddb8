"""Three qgemm launches of one problem, to profile under ncu (the third is the one to read):

ncu --clock-control none -k regex:lut_gemm --launch-skip 2 --launch-count 1 \
    python scripts/profile_one.py N K M BITS [CONFIG]
"""
import sys

import torch

import cuflute
from cuflute.kernels import parse_tile_config
from cuflute.packing import random_packed

n, k, m, bits = (int(v) for v in sys.argv[1:5])
config = parse_tile_config(sys.argv[5]) if len(sys.argv) > 5 else None
packed = random_packed(n, k, bits, 128, "float16", device=0)
x = torch.randn(m, k, dtype=torch.float16, device="cuda")
out = torch.empty(m, n, dtype=torch.float16, device="cuda")
for _ in range(3):
    cuflute.qgemm(x, packed, out=out, config=config)
torch.cuda.synchronize()

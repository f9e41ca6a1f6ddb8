"""LUT-GEMM's binary-coding quantization (BCQ): sign planes with per-group alphas and an
optional offset, multiplied without dequantization through tables of activation partial sums.

    bw = cuflute.bcq.quantize(w, bits=3, group_size=128)        # NumPy, offline
    packed = cuflute.bcq.pack(bw, dtype="float16").to_device(0)
    y = cuflute.bcq.gemm(x, packed)                               # x [..., K], M <= 8

Nothing here touches a GPU at import time.
"""
from .formats import BCQWeight, from_uniform, quantize
from .gemm import MAX_M, gemm
from .packing import BCQPacked, pack, random_packed

__all__ = ["MAX_M", "BCQPacked", "BCQWeight", "from_uniform", "gemm", "pack", "quantize",
           "random_packed"]

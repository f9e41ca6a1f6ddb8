"""cuflute: CUDA kernels for matrix products with lookup-table-quantized weights.

Nothing here touches a GPU at import time: kernels compile on first use.
"""
__version__ = "0.3.1"

from . import dense_cache
from .formats import QuantizedWeight, int_table, nf_table, quantize
from .gemm import dequantize, gpu_available, qgemm
from .packing import PackedWeight, pack

__all__ = [
    "PackedWeight",
    "QuantizedWeight",
    "dense_cache",
    "dequantize",
    "gpu_available",
    "int_table",
    "nf_table",
    "pack",
    "qgemm",
    "quantize",
]

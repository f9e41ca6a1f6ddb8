"""The two half types on the host: rounding to them and their 16-bit patterns, in NumPy.

NumPy has float16 but no bfloat16, so bfloat16 is handled as the upper half of a float32,
rounded to nearest even, as the GPU's conversions do.
"""
from __future__ import annotations

import numpy as np

DTYPES = ("float16", "bfloat16")


def check_dtype(dtype) -> str:
    name = getattr(dtype, "name", None) or str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def to_bits(values, dtype: str) -> np.ndarray:
    """Round float values to ``dtype`` and return their bit patterns as uint16.

    Raises if a value overflows the type (float16 tops out at 65504).
    """
    v = np.asarray(values, dtype=np.float64)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            h = v.astype(np.float16)
        bits = h.view(np.uint16)
    else:
        u = v.astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    overflow = ~np.isfinite(from_bits(bits, dtype)) & np.isfinite(v)
    if np.any(overflow):
        raise ValueError(f"{v[overflow].flat[0]} overflows {dtype}")
    return bits


def from_bits(bits, dtype: str) -> np.ndarray:
    """uint16 bit patterns of ``dtype`` -> float64 values."""
    b = np.asarray(bits, dtype=np.uint16)
    if dtype == "float16":
        return b.view(np.float16).astype(np.float64)
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def round_to(values, dtype: str) -> np.ndarray:
    """float64 values rounded to the nearest ``dtype`` value (ties to even)."""
    return from_bits(to_bits(values, dtype), dtype)

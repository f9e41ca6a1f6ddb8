"""Lookup tables (NormalFloat, uniform int, user-given) and the group-wise quantizer.

A weight ``W[n, k]`` is stored as ``b``-bit codes ``Q[n, k]`` into one table ``T`` of ``2**b``
values and one scale ``S[n, j]`` per group of ``g`` consecutive ``k`` in a row:
``W'[n, k] = T[Q[n, k]] * S[n, k // g]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

SUPPORTED_BITS = (2, 3, 4)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def nf_table(bits: int) -> np.ndarray:
    """The NormalFloat table of ``2**bits`` values in [-1, 1], ascending, with an exact zero.

    QLoRA's construction, generalised from 4 bits: with ``h = 2**(bits-1)``, the positive half is
    the normal quantiles at ``h`` points spaced evenly from ``offset`` down to (excluding) 0.5, the
    negative half the same at ``h - 1`` points, then zero, and everything is divided by the largest
    value. ``offset = (1 - 1/(2 (2**bits - 1)) + 1 - 1/(2 * 2**bits)) / 2`` is the midpoint of
    the two half-step tail quantiles; for 4 bits it is QLoRA's 0.9677083 and the result equals
    its published NF4 values.
    """
    bits = _check_bits(bits)
    n = 2**bits
    half = n // 2
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    inv_cdf = NormalDist().inv_cdf
    positive = [inv_cdf(p) for p in np.linspace(offset, 0.5, half + 1)[:-1]]
    negative = [-inv_cdf(p) for p in np.linspace(offset, 0.5, half)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative, dtype=np.float64))
    return values / values.max()


def int_table(bits: int) -> np.ndarray:
    """The symmetric uniform table ``{-2**(b-1), ..., 2**(b-1) - 1} / 2**(b-1)``, ascending."""
    bits = _check_bits(bits)
    half = 2 ** (bits - 1)
    return np.arange(-half, half, dtype=np.float64) / half


def validate_table(values, bits: int) -> np.ndarray:
    """A user table as float64: exactly ``2**bits`` finite values, not all zero."""
    bits = _check_bits(bits)
    table = np.asarray(values, dtype=np.float64)
    if table.ndim != 1 or table.shape[0] != 2**bits:
        raise ValueError(
            f"a {bits}-bit table needs {2**bits} values in one dimension, got shape {table.shape}"
        )
    if not np.all(np.isfinite(table)):
        raise ValueError(f"table values must be finite, got {table.tolist()}")
    if not np.any(table):
        raise ValueError("table values must not all be zero")
    return table


def resolve_table(table, bits: int) -> np.ndarray:
    """``"nf"`` / ``"int"`` or an explicit array of ``2**bits`` values -> a float64 table."""
    if isinstance(table, str):
        makers = {"nf": nf_table, "int": int_table}
        if table not in makers:
            raise ValueError(f"table must be one of {sorted(makers)} or 2**bits values, got {table!r}")
        return makers[table](bits)
    return validate_table(table, bits)


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes, scales and table of one ``[N, K]`` weight; ``group_size == K`` is per-channel."""

    codes: np.ndarray  # uint8 [N, K], each < 2**bits
    scales: np.ndarray  # float32 [N, K // group_size]
    table: np.ndarray  # float64 [2**bits]
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        """``T[Q] * S`` in float64 (no rounding to a half type: see cuflute.reference for that)."""
        n, k = self.shape
        w = self.table[self.codes].reshape(n, k // self.group_size, self.group_size)
        return (w * self.scales.astype(np.float64)[:, :, None]).reshape(n, k)


def nearest_codes(normalized: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 codes of the table entry nearest each value (ties to the lower value)."""
    order = np.argsort(table, kind="stable")
    ascending = table[order]
    midpoints = (ascending[1:] + ascending[:-1]) / 2
    return order[np.searchsorted(midpoints, normalized, side="left")].astype(np.uint8)


def check_weight(weight, group_size: int | None) -> tuple[np.ndarray, int]:
    """``weight`` as a finite, non-empty, floating-point [N, K] array, and its group size
    (``None``: K) checked against K; the errors name what was expected and what came."""
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"weight must be floating point, got dtype {w.dtype}")
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight must be non-empty, got shape {w.shape}")
    if group_size is None:
        group_size = k
    if group_size != k and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size must be one of {SUPPORTED_GROUP_SIZES} or None (per-channel), got {group_size!r}"
        )
    if k % group_size:
        raise ValueError(f"K = {k} is not divisible by group_size = {group_size}")
    if not np.all(np.isfinite(w)):
        bad = np.argwhere(~np.isfinite(w))[0]
        raise ValueError(f"weight has a non-finite value at [{bad[0]}, {bad[1]}]: {w[tuple(bad)]}")
    return w, group_size


def quantize(weight, bits: int = 4, group_size: int | None = 128, table="nf") -> QuantizedWeight:
    """Absmax-scaled, nearest-entry quantization of ``weight [N, K]``.

    ``group_size`` is one of 32, 64, 128, 256, or ``None`` (or ``K``) for one scale per row.
    Each group's scale maps its largest magnitude onto the table's largest magnitude; each
    element takes the code of the nearest table entry (ties to the lower value).
    """
    bits = _check_bits(bits)
    values = resolve_table(table, bits)
    w, group_size = check_weight(weight, group_size)
    n, k = w.shape
    w = w.astype(np.float32, copy=False)

    grouped = w.reshape(n, k // group_size, group_size)
    scales = np.abs(grouped).max(axis=2) / np.abs(values).max()
    safe = np.where(scales > 0, scales, 1.0)
    normalized = grouped / safe[:, :, None]

    codes = nearest_codes(normalized, values)
    return QuantizedWeight(
        codes=codes.reshape(n, k),
        scales=scales.astype(np.float32),
        table=values,
        bits=bits,
        group_size=group_size,
    )

"""The BCQ ground truth: unpack exactly what cuflute.bcq.packing wrote, dequantize in float64.

Reads only the packed arrays (qweight, alphas), so a packer bug or a layout disagreement shows
up as a mismatch against the original signs or the kernel.
"""
from __future__ import annotations

import numpy as np

from .. import dtypes
# ||y - ref|| / ||ref|| bounds for the kernel's output, ref in float64 from the same packed weight:
# the kernel's tables and sums are float32, so, as for the main kernel, only the output's
# rounding and float32 summation order remain.
from ..reference import REL_ERROR_BOUND  # noqa: F401
from .packing import BCQPacked, qweight_to_planes


def unpack_signs(packed: BCQPacked) -> np.ndarray:
    """uint8 [bits, N, K], 1 for +1: the signs the packer was given."""
    p = packed.to_host()
    return qweight_to_planes(p.qweight, p.n, p.k)


def unpack_alphas(packed: BCQPacked) -> tuple[np.ndarray, np.ndarray]:
    """(alphas float64 [N, n_groups, bits], offsets float64 [N, n_groups]) as the dtype holds
    them, padding groups included; offsets are zeros for a weight packed without them."""
    p = packed.to_host()
    a = dtypes.from_bits(p.alphas[: p.n], p.dtype)
    return a[..., : p.bits], a[..., p.bits]


def dequantize(packed: BCQPacked) -> np.ndarray:
    """float64 [N, K]: ``sum_i alpha_i (2 s_i - 1) + z`` with alphas and offsets as the dtype
    holds them. The kernel multiplies exactly these and rounds only its float32 sums."""
    p = packed.to_host()
    planes = 2.0 * unpack_signs(p) - 1.0  # [bits, N, K]
    alphas, offsets = unpack_alphas(p)
    per_k = np.arange(p.k) >> (p.group_shift + 5)
    return np.einsum("bnk,nkb->nk", planes, alphas[:, per_k]) + offsets[:, per_k]


def gemm(x, packed: BCQPacked) -> np.ndarray:
    """float64 ``x [..., K] @ dequantize(packed).T``: the kernel's output before its rounding."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] != packed.k:
        raise ValueError(f"x has K = {x.shape[-1]}, the weight has K = {packed.k}")
    return x @ dequantize(packed).T

"""The ground truth: unpack exactly what cuflute.packing wrote, dequantize as the kernel does.

Everything here reads only the packed arrays (qweight, scales, pair_lut), so a packer bug or a
layout disagreement shows up as a mismatch against the original codes or the kernel.
"""
from __future__ import annotations

import numpy as np

from . import dtypes

# ||y - ref|| / ||ref|| that a kernel output in each dtype must stay under, ref in float64 from the
# same dequantized weight: the output's own rounding is ~2**-11 (fp16) or ~2**-8 (bf16) relative,
# and the bounds leave room for float32 accumulation order, nothing more.
REL_ERROR_BOUND = {"float16": 1e-3, "bfloat16": 8e-3}
from .packing import (
    CHUNK_K,
    FRAGMENT_K,
    FRAGMENT_ROW,
    LANES,
    PAIRS,
    PLANE_WIDTHS,
    STEPS_PER_CHUNK,
    TILE_N,
    PackedWeight,
    field_rotations,
    lut_field,
    lut_field_codes,
    unpack_fields,
)


def _scatter_to_matrix(per_pair: np.ndarray, packed: PackedWeight) -> np.ndarray:
    """[tile, chunk, step, lane, pair, element] -> [N, K], cropping the padding."""
    n_tiles, k_chunks = packed.n_tiles, packed.k_chunks
    blocks = np.empty((n_tiles, k_chunks, TILE_N, CHUNK_K), dtype=per_pair.dtype)
    blocks[:, :, FRAGMENT_ROW, FRAGMENT_K] = per_pair
    full = blocks.transpose(0, 2, 1, 3).reshape(n_tiles * TILE_N, k_chunks * CHUNK_K)
    return full[: packed.n, : packed.k]


def lut_fields(packed: PackedWeight) -> np.ndarray:
    """The pair-LUT index of every pair: int64 [tile, chunk, step, lane, pair]."""
    p = packed.to_host()
    lane_words = p.qweight.transpose(0, 1, 3, 2, 4).reshape(p.n_tiles, p.k_chunks, LANES, -1)
    fields, start = [], 0
    for width, rotations in zip(PLANE_WIDTHS[p.bits], field_rotations(p.bits)):
        n_words = STEPS_PER_CHUNK * PAIRS * width // 32
        fields.append(unpack_fields(lane_words[..., start : start + n_words], width, rotations))
        start += n_words
    f = lut_field(fields, p.bits)  # [tile, chunk, lane, 4s + p]
    return f.reshape(p.n_tiles, p.k_chunks, LANES, STEPS_PER_CHUNK, PAIRS).transpose(0, 1, 3, 2, 4)


def unpack_codes(packed: PackedWeight) -> np.ndarray:
    """uint8 [N, K]: the codes the packer was given."""
    c0, c1 = lut_field_codes(packed.bits)
    f = lut_fields(packed)
    return _scatter_to_matrix(np.stack([c0[f], c1[f]], axis=-1), packed).astype(np.uint8)


def unpack_scales(packed: PackedWeight) -> np.ndarray:
    """float64 [N, n_groups]: the scales as the dtype holds them (padding groups included)."""
    p = packed.to_host()
    s = p.scales.transpose(0, 3, 2, 1).reshape(p.n_tiles * TILE_N, p.n_groups)
    return dtypes.from_bits(s[: p.n], p.dtype)


def dequantize(packed: PackedWeight) -> np.ndarray:
    """float64 [N, K]: ``T[q] * S`` with T from the pair LUT and S from the scales, both as the
    dtype holds them. The kernel multiplies exactly these and rounds only its fp32 sums."""
    p = packed.to_host()
    f = lut_fields(p)
    lut = p.pair_lut
    halves = np.stack([lut[f] & 0xFFFF, lut[f] >> 16], axis=-1).astype(np.uint16)
    values = dtypes.from_bits(_scatter_to_matrix(halves, p), p.dtype)
    scales = unpack_scales(p)
    group = p.kernel_group
    per_k = np.zeros(p.k, dtype=np.int64) if group == 0 else np.arange(p.k) // group
    return values * scales[:, per_k]


def qgemm(x, packed: PackedWeight) -> np.ndarray:
    """float64 ``x [..., K] @ dequantize(packed).T``: the kernel's output before its final rounding."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] != packed.k:
        raise ValueError(f"x has K = {x.shape[-1]}, the weight has K = {packed.k}")
    return x @ dequantize(packed).T

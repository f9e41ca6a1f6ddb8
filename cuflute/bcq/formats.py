"""Binary-coding quantization (BCQ, as in LUT-GEMM, Park et al. 2022) and its quantizer.

Each group of ``g`` consecutive k in a row is approximated as a sum of ``b`` scaled sign
planes plus an optional offset::

    W'[n, k] = sum_i alpha[n, j, i] * B_i[n, k] + z[n, j],    B_i in {-1, +1},  j = k // g

With the offset, uniform quantization is a special case (alpha_i = s * 2**(i-1), z = the zero
point): the binary expansion of the integer code. Signs are stored as bits, 1 for +1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats import SUPPORTED_GROUP_SIZES, check_weight

SUPPORTED_BITS = (1, 2, 3, 4)
REFINE_ITERATIONS = 15
# Rows are quantized in blocks of about this many weights, so that the 2**bits candidate
# distances per weight stay a few hundred MB; groups are independent, so blocks change nothing.
ROW_BLOCK_WEIGHTS = 1 << 21


@dataclass(frozen=True)
class BCQWeight:
    """Sign planes, per-group alphas and offsets of one ``[N, K]`` weight; group_size == K is
    one group per row (per-channel)."""

    signs: np.ndarray  # uint8 [bits, N, K], 1 for +1 and 0 for -1
    alphas: np.ndarray  # float32 [N, K // group_size, bits]
    offsets: np.ndarray | None  # float32 [N, K // group_size], or None: no offset
    group_size: int

    @property
    def bits(self) -> int:
        return self.signs.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.signs.shape[1:]

    def dequantize(self) -> np.ndarray:
        """``sum_i alpha_i B_i + z`` in float64 (no rounding to a half type: cuflute.bcq.reference
        dequantizes what the packer wrote, as the kernel reads it)."""
        n, k = self.shape
        return _combine(self.signs, self.alphas, self.offsets, self.group_size).reshape(n, k)


def _combine(signs, alphas, offsets, group_size) -> np.ndarray:
    """float64 [N, groups, group_size] from signs [bits, N, K] and per-group alphas/offsets."""
    bits, n, k = signs.shape
    planes = 2.0 * signs.reshape(bits, n, k // group_size, group_size) - 1.0
    w = np.einsum("bngk,ngb->ngk", planes, alphas.astype(np.float64))
    if offsets is not None:
        w += offsets.astype(np.float64)[:, :, None]
    return w


def _check_weight(weight, bits, group_size):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    w, group_size = check_weight(weight, group_size)
    return w.astype(np.float64), group_size


def _greedy(groups: np.ndarray, bits: int, offset: bool):
    """Plane by plane: the sign of the residual, scaled by its mean magnitude."""
    z = groups.mean(axis=-1) if offset else np.zeros(groups.shape[:-1])
    residual = groups - z[..., None]
    signs, alphas = [], []
    for _ in range(bits):
        s = residual >= 0
        a = np.abs(residual).mean(axis=-1)
        residual = residual - a[..., None] * np.where(s, 1.0, -1.0)
        signs.append(s)
        alphas.append(a)
    return np.stack(signs), np.stack(alphas, axis=-1), z


def _fit_alphas(groups, signs, offset: bool):
    """Least squares alphas (and offset) per group for fixed sign planes. The pseudo-inverse of
    the small normal equations copes with planes that coincide."""
    columns = [2.0 * s - 1.0 for s in signs] + ([np.ones_like(groups)] if offset else [])
    a = np.stack(columns, axis=-1)  # [N, groups, g, P]
    gram = np.einsum("ngkp,ngkq->ngpq", a, a)
    rhs = np.einsum("ngkp,ngk->ngp", a, groups)
    sol = np.einsum("ngpq,ngq->ngp", np.linalg.pinv(gram), rhs)
    bits = len(signs)
    z = sol[..., bits] if offset else np.zeros(groups.shape[:-1])
    return sol[..., :bits], z


def _nearest_signs(groups, alphas, z):
    """For fixed alphas and offset, every element takes the nearest of the 2**bits values."""
    bits = alphas.shape[-1]
    combos = (np.arange(2**bits)[:, None] >> np.arange(bits)) & 1  # [2**bits, bits]
    values = np.einsum("cb,ngb->ngc", 2.0 * combos - 1.0, alphas) + z[..., None]
    best = np.argmin(np.abs(groups[..., None] - values[:, :, None, :]), axis=-1)
    return np.stack([(best >> i) & 1 for i in range(bits)]).astype(bool)


def _group_errors(groups, signs, alphas, z):
    planes = np.where(signs, 1.0, -1.0)
    approx = np.einsum("bngk,ngb->ngk", planes, alphas) + z[..., None]
    return ((groups - approx) ** 2).sum(axis=-1)


def from_uniform(codes, scales, zero_points, bits: int,
                 group_size: int | None = None) -> BCQWeight:
    """The exact BCQ form of uniformly quantized weights ``W = s * (q - zp)`` per group (the
    GPTQ/AWQ convention): ``q = sum_i 2**i b_i`` with ``b_i = (B_i + 1) / 2`` gives
    ``alpha_i = s * 2**(i-1)`` and ``z = s * ((2**bits - 1) / 2 - zp)``.

    codes: integers [N, K] in [0, 2**bits); scales, zero_points: [N, K // group_size]
    (``group_size`` None: one per row).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    q = np.asarray(codes)
    if q.ndim != 2 or not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"codes must be a 2-D integer array [N, K], got {q.dtype} {q.shape}")
    n, k = q.shape
    group_size = group_size or k
    if k % group_size or (group_size != k and group_size not in SUPPORTED_GROUP_SIZES):
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES} dividing K = {k}, "
                         f"or None (per-channel); got {group_size!r}")
    if q.min(initial=0) < 0 or q.max(initial=0) >= 2**bits:
        raise ValueError(f"{bits}-bit codes must be in [0, {2**bits}), got [{q.min()}, {q.max()}]")
    s = np.asarray(scales, dtype=np.float64)
    zp = np.asarray(zero_points, dtype=np.float64)
    if s.shape != (n, k // group_size) or zp.shape != s.shape:
        raise ValueError(f"scales and zero_points must be [{n}, {k // group_size}], got "
                         f"{s.shape} and {zp.shape}")
    signs = np.stack([(q >> i) & 1 for i in range(bits)]).astype(np.uint8)
    alphas = s[..., None] * 2.0 ** (np.arange(bits) - 1)
    offsets = s * ((2**bits - 1) / 2 - zp)
    return BCQWeight(signs=signs, alphas=alphas.astype(np.float32),
                     offsets=offsets.astype(np.float32), group_size=group_size)


def quantize(weight, bits: int = 3, group_size: int | None = 128, offset: bool = False,
             iterations: int = REFINE_ITERATIONS) -> BCQWeight:
    """Binary-coding quantization of ``weight [N, K]``: greedy, then alternating refinement.

    Greedy: each plane takes the sign of what the planes before it left, with the mean
    magnitude of that residual as its alpha (after subtracting the group mean when ``offset``).
    Then ``iterations`` rounds of: least-squares alphas (and offset) for the current signs, and
    the nearest of the ``2**bits`` representable values for each element given those alphas.
    Each group keeps the best round by squared error, so refinement never makes a group worse.
    Deterministic: no randomness, ties to the first candidate.
    """
    w, group_size = _check_weight(weight, bits, group_size)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations!r}")
    n, k = w.shape
    rows = max(1, ROW_BLOCK_WEIGHTS // k)
    blocks = [_quantize_rows(w[start:start + rows].reshape(-1, k // group_size, group_size),
                             bits, offset, iterations) for start in range(0, n, rows)]
    signs, alphas, z = (np.concatenate(parts, axis=axis)
                        for parts, axis in zip(zip(*blocks), (1, 0, 0)))
    return BCQWeight(
        signs=signs.reshape(bits, n, k).astype(np.uint8),
        alphas=alphas.astype(np.float32),
        offsets=z.astype(np.float32) if offset else None,
        group_size=group_size,
    )


def _quantize_rows(groups, bits: int, offset: bool, iterations: int):
    """quantize() on whole rows: groups [rows, n_groups, g] -> (signs [bits, rows, n_groups, g],
    alphas [rows, n_groups, bits], offsets [rows, n_groups])."""
    signs, alphas, z = _greedy(groups, bits, offset)
    best_err = _group_errors(groups, signs, alphas, z)
    for _ in range(iterations):
        alphas_new, z_new = _fit_alphas(groups, signs, offset)
        signs_new = _nearest_signs(groups, alphas_new, z_new)
        err = _group_errors(groups, signs_new, alphas_new, z_new)
        better = err < best_err
        if not np.any(better):
            break
        signs = np.where(better[None, :, :, None], signs_new, signs)
        alphas = np.where(better[..., None], alphas_new, alphas)
        z = np.where(better, z_new, z)
        best_err = np.minimum(err, best_err)
    return signs, alphas, z

"""Learned NormalFloat (NFL): NormalFloat's table, with group scales fitted to a layer's inputs.

NormalFloat picks each group's scale from its largest magnitude alone. NFL starts there and
lowers the error of the layer's *output* on calibration activations X [M, K]:

    loss(row n) = ||X (w_n - w'_n)||^2 + lambda ||w_n - w'_n||^2 = (w_n - w'_n)^T H (w_n - w'_n),
    H = X^T X + lambda I,  lambda = damp * mean(diag(X^T X)),  w'_n[k] = T[Q[n, k]] * S[n, k // g]

by alternating two exact steps (no random state, so the result is the same on every run):

1. codes fixed: w'_n = B_n s_n is linear in the row's G = K/g scales (column j of B_n holds
   T[Q[n, k]] for the k of group j), so the best scales solve the G x G normal equations
   (B_n^T H B_n) s_n = B_n^T H w_n.
2. scales fixed: each weight takes the nearest table entry to w / s.

Step 2 minimises the plain weight error, not the output error, so a row's loss can rise; each
row keeps the codes and scales of its lowest loss seen (the NF start included), so NFL's loss
on the calibration set never exceeds NF's. The result is an ordinary QuantizedWeight: it packs
and runs through the kernel unchanged. The damping term (GPTQ's habit) keeps the fit from
leaning on directions a few hundred calibration tokens do not span.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .formats import QuantizedWeight, nearest_codes, quantize

DEFAULT_ITERATIONS = 4
DEFAULT_DAMP = 0.01


def _check_inputs(weight: np.ndarray, x: np.ndarray) -> None:
    if x.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"calibration activations must be [M, K = {weight.shape[1]}], "
                         f"got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("calibration activations have no rows")
    if not np.all(np.isfinite(x)):
        raise ValueError("calibration activations have non-finite values")


def hessian(x, damp: float) -> np.ndarray:
    """float64 [K, K]: X^T X + damp * mean(diag(X^T X)) * I, the quadratic form of the damped
    output error (w - w')^T H (w - w') of one row."""
    x = np.asarray(x, dtype=np.float64)
    h = x.T @ x
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    return h


def row_losses(weight, dequantized, h: np.ndarray) -> np.ndarray:
    """float64 [N]: each row's damped output error (w - w')^T H (w - w')."""
    diff = np.asarray(weight, dtype=np.float64) - dequantized
    return ((diff @ h) * diff).sum(axis=1)


def fit_scales(weight, values, h: np.ndarray, group_size: int) -> np.ndarray:
    """float64 [N, G]: per row, the scales minimising (w - B s)^T H (w - B s) for the fixed code
    values ``values`` (= T[Q], [N, K]); column j of B holds the values of group j."""
    n, k = values.shape
    groups = k // group_size
    # gram[n, j, l] = sum over k in group j, k' in group l of T[Q[n, k]] H[k, k'] T[Q[n, k']]:
    # built one j at a time as (values of group j) @ H[group j, :], so each product is a
    # well-shaped [N, g] x [g, K] matrix multiply.
    gram = np.empty((n, groups, groups))
    for j in range(groups):
        cols = slice(j * group_size, (j + 1) * group_size)
        gram[:, j, :] = ((values[:, cols] @ h[cols]) * values).reshape(n, groups, -1).sum(axis=2)
    rhs = ((np.asarray(weight, dtype=np.float64) @ h) * values).reshape(n, groups, -1).sum(axis=2)
    # A group whose codes are all zero has a zero row and column: pin its scale to 0.
    empty = (values.reshape(n, groups, -1) ** 2).sum(axis=2) == 0
    gram[:, np.arange(groups), np.arange(groups)] += empty
    return np.linalg.solve(gram, rhs[..., None])[..., 0]


def learn(weight, x, bits: int, group_size: int, iterations: int = DEFAULT_ITERATIONS,
          damp: float = DEFAULT_DAMP) -> QuantizedWeight:
    """NFL quantization of ``weight [N, K]`` for calibration activations ``x [M, K]``.

    Starts from ``quantize(weight, bits, group_size, "nf")`` and runs ``iterations`` rounds of
    (fit scales, re-assign codes); ``damp`` scales the weight-error term by the mean of
    diag(X^T X). Returns the QuantizedWeight with each row's lowest calibration loss.
    """
    start = quantize(weight, bits, group_size, "nf")
    w = np.asarray(weight, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    _check_inputs(w, x)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    g, table = start.group_size, start.table
    n, k = w.shape
    h = hessian(x, damp)

    best_codes, best_scales = start.codes.copy(), start.scales.astype(np.float64)
    best_loss = row_losses(w, start.dequantize(), h)

    def keep_better(codes, scales):
        dequantized = (table[codes].reshape(n, -1, g) * scales[:, :, None]).reshape(n, k)
        loss = row_losses(w, dequantized, h)
        better = loss < best_loss
        best_loss[better] = loss[better]
        best_codes[better] = codes[better]
        best_scales[better] = scales[better]

    codes = start.codes
    for _ in range(iterations):
        scales = fit_scales(w, table[codes], h, g)
        keep_better(codes, scales)
        safe = np.where(scales != 0, scales, 1.0)
        codes = nearest_codes((w.reshape(n, -1, g) / safe[:, :, None]).reshape(n, k), table)
        keep_better(codes, scales)
    return QuantizedWeight(codes=best_codes, scales=best_scales.astype(np.float32), table=table,
                           bits=start.bits, group_size=g)


def learn_layers(weights: dict, inputs: dict, bits: int, group_size: int,
                 iterations: int = DEFAULT_ITERATIONS, damp: float = DEFAULT_DAMP,
                 progress: bool = True) -> dict[str, QuantizedWeight]:
    """``learn`` for each named weight [N, K] with its calibration activations ``inputs[name]``,
    with a progress bar over the layers."""
    missing = sorted(set(weights) - set(inputs))
    if missing:
        raise ValueError(f"no calibration activations for {missing}")
    bar = tqdm(weights.items(), desc=f"NFL{bits} g={group_size}", unit="layer",
               disable=not progress, leave=False)
    return {name: learn(w, inputs[name], bits, group_size, iterations, damp) for name, w in bar}

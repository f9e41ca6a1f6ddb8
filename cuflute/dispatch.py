"""Which tile config runs a given problem: a pure heuristic, overridden by tuned YAML per GPU."""
from __future__ import annotations

from .kernels import TileConfig

_M8 = TileConfig(nt=2, mt=1, wk=8)
_M16 = TileConfig(nt=2, mt=2, wk=8)
_M32 = TileConfig(nt=2, mt=4, wk=4)
_NARROW = TileConfig(nt=1, mt=1, wk=8)


def select_config(m: int, n: int, k: int, bits: int, group: int, arch: int,
                  sm_count: int = 132) -> TileConfig:
    """The tile config for y[m, n] = x[m, k] @ W'^T on a GPU of ``sm_count`` SMs.

    One CTA covers 16*nt rows of W and 8*mt rows of x, its wk warps splitting K. Up to 8 rows of
    x fit one m8 mma tile; past that, more m tiles reuse each dequantized weight fragment. When
    the 2-tile-per-warp grid would leave SMs without two CTAs, one tile per warp doubles the CTAs.
    """
    if m > 16:
        return _M32
    if m > 8:
        return _M16
    n_tiles = -(-n // 16)
    return _NARROW if n_tiles // _M8.nt < 2 * sm_count else _M8

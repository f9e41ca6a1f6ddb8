"""BCQ kernel specializations (cuda_src/bcq_gemv.cuh), compiled by cuflute.kernels' JIT."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..dtypes import DTYPES
from ..kernels import _CXX_TYPE
from .formats import SUPPORTED_BITS

M_TILES = (1, 4, 8)  # rows of x per CTA
CTA_ROWS = (32, 64)  # rows of W per CTA
K_SPLITS = (1, 2)  # K parts per CTA
CHUNK_RUNS = 16  # tables per row of x and chunk: kRunsPerChunk
SUPER_RUNS = 64  # runs of x per super-chunk: kRunsPerSuper
TABLE_BYTES = 256 * 4  # one float32 table of 2**8 partial sums


@dataclass(frozen=True)
class BCQSpec:
    bits: int
    dtype: str
    m_tile: int
    rows: int
    ksplit: int

    def __post_init__(self):
        for name, value, allowed in (("bits", self.bits, SUPPORTED_BITS),
                                     ("dtype", self.dtype, DTYPES),
                                     ("m_tile", self.m_tile, M_TILES),
                                     ("rows", self.rows, CTA_ROWS),
                                     ("ksplit", self.ksplit, K_SPLITS)):
            if value not in allowed:
                raise ValueError(f"BCQ kernel {name} must be one of {allowed}, got {value!r}")

    @property
    def threads(self) -> int:
        return 4 * self.rows * self.ksplit

    @property
    def stages(self) -> int:
        """Table buffers: bcq_gemv.cuh's table_stages<M_TILE>()."""
        return 2 if self.m_tile == 1 else 1

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory, per K part: float tables [stages][m_tile][16 runs][256],
        then x double-buffered, uint4 [2][m_tile][64 runs]."""
        return self.ksplit * (self.stages * self.m_tile * CHUNK_RUNS * TABLE_BYTES
                              + 2 * self.m_tile * SUPER_RUNS * 16)

    @property
    def name_expression(self) -> str:
        return (f"cuflute::bcq::bcq_gemv<{self.bits}, {_CXX_TYPE[self.dtype]}, "
                f"{self.m_tile}, {self.rows}, {self.ksplit}>")


def all_specs() -> list[BCQSpec]:
    return [BCQSpec(b, d, m, r, s) for b, d, m, r, s
            in itertools.product(SUPPORTED_BITS, DTYPES, M_TILES, CTA_ROWS, K_SPLITS)]

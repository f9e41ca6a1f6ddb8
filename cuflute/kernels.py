"""Kernel specializations and their JIT: CuPy RawModule (NVRTC) over cuda_src/.

One specialization per (bits, group, dtype, tile config), named by a C++ template instantiation
and compiled through ``name_expressions``, lazily on first use and once per device; CuPy caches
the binaries on disk. The source string carries a hash of every file in cuda_src/, so an edited
header never reuses a stale binary.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from .dtypes import DTYPES
from .formats import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .packing import CHUNK_K

_PACKAGE = Path(__file__).resolve().parent
CUDA_SRC = next(p for p in (_PACKAGE / "cuda_src", _PACKAGE.parent / "cuda_src") if p.is_dir())
KERNEL_GROUPS = SUPPORTED_GROUP_SIZES + (0,)  # 0: one group per row
TARGET_ARCHS = (80, 86, 89, 90)
# The pair LUT's copies in shared memory (cuda_src/lut_gemm.cuh's CodeLayout), unless a tile
# config says otherwise; lut_dequant always has these.
LUT_COPIES = 32
_CXX_TYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16"}
# One header per kernel family; every specialization of every family compiles from one source.
KERNEL_HEADERS = ("lut_gemm.cuh", "lut_wgmma.cuh", "lut_dequant.cuh", "bcq_gemv.cuh")


# The most CTAs of a cluster that split K (cuda_src/lut_gemm.cuh's KS): a portable cluster size.
MAX_K_SPLITS = 8

# Where a tile config's B fragments (x) come from: cuda_src/lut_gemm.cuh's XS.
X_GLOBAL = 0  # global memory, a batch ahead
X_WARP = 1  # each warp's pipeline stage, copied by the warp along with its codes
X_SHARED = 2  # one copy a stage for the WN warps of a K slice, filled by them together
X_ROW = 3  # M = 1 only: each warp's pipeline stage, the one row's 256 values of a chunk
_X_SUFFIX = {X_GLOBAL: "", X_WARP: "_xs", X_SHARED: "_xsh", X_ROW: "_xr"}
_X_FROM_SUFFIX = {suffix: key for key, suffix in _X_SUFFIX.items()}
# A config's name, as TileConfig.__str__ writes it (matched whole).
_CONFIG_NAME = re.compile(r"nt(\d+)_mt(\d+)(?:_wn(\d+))?_wk(\d+)(?:_ks(\d+))?_s(\d+)(" +
                          "|".join(filter(None, _X_SUFFIX.values())) + r")?(?:_c(\d+))?(_wl)?")
# A warpgroup config's name, as WarpgroupConfig.__str__ writes it (matched whole).
_WARPGROUP_NAME = re.compile(r"wg(\d+)_bm(\d+)(?:_ks(\d+))?(_sk)?_s(\d+)_b(\d+)(_rc)?")


@dataclass(frozen=True, order=True)
class TileConfig:
    """A CTA shape: NT 16-row n tiles per warp, MT 8-column m tiles, WN warps side by side
    along n times WK warps splitting K, each warp's cp.async pipeline STAGES chunks deep; XS
    where x comes from (X_GLOBAL, X_WARP, X_SHARED, X_ROW: M = 1 only); LUT_COPIES copies of
    the pair LUT in shared memory (16: half the bytes, some bank conflicts); KS CTAs of a
    thread-block cluster splitting K between them (sm_90 and later; 1: no cluster); WIDE_LUT
    the LUT's entries 256 bytes apart instead of 128 (twice the bytes, 32 copies only), so that
    a 4-bit lookup's address is one byte permute (cuda_src/lut_gemm.cuh's CodeLayout)."""

    nt: int
    mt: int
    wk: int
    stages: int = 2
    wn: int = 1
    xs: int = X_GLOBAL
    lut_copies: int = LUT_COPIES
    ks: int = 1
    wide_lut: bool = False

    def __post_init__(self):
        if self.mt not in (1, 2, 4, 8):
            raise ValueError(f"mt must be 1, 2, 4 or 8, got {self.mt}")
        if not 1 <= self.ks <= MAX_K_SPLITS:
            raise ValueError(f"ks (CTAs of a cluster splitting K) must be 1 to {MAX_K_SPLITS}, got {self.ks}")
        if self.xs not in _X_SUFFIX:
            raise ValueError(f"xs must be one of {sorted(_X_SUFFIX)}, got {self.xs!r}")
        if self.xs == X_SHARED and self.wn < 2:
            raise ValueError("x shared by the warps along n (_xsh) needs wn >= 2")
        if self.xs == X_ROW and self.mt != 1:
            raise ValueError("x of one row (_xr) needs mt = 1")
        if self.wide_lut and self.lut_copies != LUT_COPIES:
            raise ValueError(f"a wide LUT (_wl) has {LUT_COPIES} copies, got {self.lut_copies}")

    @property
    def max_m(self) -> int | None:
        """The most rows of x the config takes (None: any)."""
        return 1 if self.xs == X_ROW else None

    def takes(self, m: int) -> bool:
        """Whether the config can multiply m rows of x."""
        return self.max_m is None or m <= self.max_m

    @property
    def scales_a_operand(self) -> bool:
        """Whether the kernel multiplies the A operand (the looked-up weight) by its group scale
        instead of scaling each group's sums: a warp of 16 or more 16 x 8 tiles, whose
        accumulators leave no registers for a second set (cuda_src/lut_gemm.cuh's
        WarpTile::kScaleA). The products are W' as lut_dequant rounds it."""
        return self.nt * self.mt >= 16

    @property
    def block_m(self) -> int:
        return 8 * self.mt

    @property
    def block_n_tiles(self) -> int:
        return self.nt * self.wn

    @property
    def needs_clusters(self) -> bool:
        """Whether the config runs as thread-block clusters (compute capability 9.0 and later)."""
        return self.ks > 1

    @property
    def warps(self) -> int:
        return self.wn * self.wk

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def __str__(self) -> str:
        wn = f"_wn{self.wn}" if self.wn > 1 else ""
        ks = f"_ks{self.ks}" if self.ks > 1 else ""
        copies = f"_c{self.lut_copies}" if self.lut_copies != LUT_COPIES else ""
        wide = "_wl" if self.wide_lut else ""
        return f"nt{self.nt}_mt{self.mt}{wn}_wk{self.wk}{ks}_s{self.stages}{_X_SUFFIX[self.xs]}{copies}{wide}"


@dataclass(frozen=True, order=True)
class WarpgroupConfig:
    """A CTA of cuda_src/lut_wgmma.cuh, sm_90a's warpgroup kernel: WG warpgroups of 64 weight rows
    each, BM rows of x, STAGES chunks of codes, scales and x in shared memory (x by a bulk copy
    from the image that XImageSpec's kernel writes first, codes and scales by each warp's
    cp.async), KS CTAs of a thread-block cluster splitting K, BATCH mma steps decoded before
    their wgmmas go as one group; STREAM_K: one wave of CTAs splits each M block's (strip, chunk)
    units evenly, shared strips summed through global memory (no cluster); REG_CODES: each lane
    loads its words of the codes and scales into registers one chunk ahead instead (no
    cp.async, nothing of the weight in shared memory but the LUT; STAGES counts x's stages). Every
    warp scales its A operand, as TileConfig.scales_a_operand."""

    bm: int
    wg: int = 4
    stages: int = 2
    ks: int = 1
    batch: int = 4
    stream_k: bool = False
    reg_codes: bool = False

    def __post_init__(self):
        if self.bm not in (32, 64, 128):
            raise ValueError(f"bm must be 32, 64 or 128, got {self.bm}")
        if self.wg not in (1, 2, 4) or self.bm % (4 * self.wg):
            raise ValueError(f"wg must be 1, 2 or 4 warpgroups, each of whose warps copies whole rows "
                             f"of x (bm a multiple of 4 wg), got wg={self.wg} bm={self.bm}")
        if not 1 <= self.ks <= MAX_K_SPLITS:
            raise ValueError(f"ks (CTAs of a cluster splitting K) must be 1 to {MAX_K_SPLITS}, got {self.ks}")
        if self.stages < 2 or self.batch not in (1, 2, 4, 8):
            raise ValueError(f"stages must be 2 or more and batch 1, 2, 4 or 8, got {self.stages}, {self.batch}")
        if self.stream_k and self.ks > 1:
            raise ValueError(f"stream_k splits K without a cluster: ks must be 1, got {self.ks}")

    max_m = None
    scales_a_operand = True

    def takes(self, m: int) -> bool:
        """Any m: a CTA takes BM rows of x, the grid as many CTAs along M as m needs."""
        return True

    @property
    def block_m(self) -> int:
        return self.bm

    @property
    def block_n_tiles(self) -> int:
        return self.warps  # one 16-row tile a warp

    @property
    def needs_clusters(self) -> bool:
        return self.ks > 1

    @property
    def warps(self) -> int:
        return 4 * self.wg

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def __str__(self) -> str:
        ks = f"_ks{self.ks}" if self.ks > 1 else ""
        sk = "_sk" if self.stream_k else ""
        rc = "_rc" if self.reg_codes else ""
        return f"wg{self.wg}_bm{self.bm}{ks}{sk}_s{self.stages}_b{self.batch}{rc}"


# For compilation time, only the shapes that the dispatcher and the tuner use are instantiated.
TILE_CONFIGS = (
    TileConfig(nt=1, mt=1, wk=8),
    # M = 1: the one row of x through each warp's pipeline, 512 bytes a chunk
    TileConfig(nt=1, mt=1, wk=4, xs=X_ROW),
    TileConfig(nt=1, mt=1, wk=4, stages=3, xs=X_ROW),
    TileConfig(nt=1, mt=1, wk=8, xs=X_ROW),
    TileConfig(nt=2, mt=1, wk=8, xs=X_ROW),
    # five n tiles a warp, one CTA an SM: 10240 rows are 640 tiles, 4.85 an SM, which 128 CTAs of
    # five take in one wave where CTAs of one, two or four leave part of a second (v23)
    TileConfig(nt=5, mt=1, wk=4, xs=X_ROW),
    # x through each warp's pipeline: two n tiles a warp halve the x each weight byte needs
    TileConfig(nt=1, mt=1, wk=4, xs=X_WARP),
    TileConfig(nt=2, mt=1, wk=4, xs=X_WARP),
    TileConfig(nt=2, mt=2, wk=4, xs=X_WARP),
    TileConfig(nt=2, mt=4, wk=2, xs=X_WARP),
    # four n tiles a warp: half again the x reads from shared memory each weight byte needs, for
    # 168 KiB (4-bit), one CTA an SM (M = 16 and 32: docs/PERF_NOTES.md v22); three and five, for
    # the shapes whose tiles that many a CTA take in one wave of one CTA an SM: 6144 rows (384
    # tiles, 128 CTAs of three) and 10240 (640 tiles, 128 CTAs of five) (v23)
    TileConfig(nt=4, mt=2, wk=4, xs=X_WARP),
    TileConfig(nt=3, mt=2, wk=4, xs=X_WARP),
    TileConfig(nt=5, mt=1, wk=4, xs=X_WARP),
    TileConfig(nt=5, mt=2, wk=4, xs=X_WARP),
    # x copied once for the warps side by side along n: M >= 16, where x fills L2; 16 LUT
    # copies (half the bytes, some bank conflicts) for more CTAs an SM
    TileConfig(nt=1, mt=2, wn=4, wk=1, xs=X_SHARED),
    TileConfig(nt=2, mt=2, wn=4, wk=1, xs=X_SHARED),
    TileConfig(nt=2, mt=2, wn=2, wk=2, xs=X_SHARED),
    TileConfig(nt=2, mt=2, wn=2, wk=2, stages=3, xs=X_SHARED),
    TileConfig(nt=2, mt=4, wn=2, wk=1, xs=X_SHARED),
    TileConfig(nt=2, mt=4, wn=2, wk=1, xs=X_SHARED, lut_copies=16),
    TileConfig(nt=2, mt=4, wn=4, wk=1, xs=X_SHARED, lut_copies=16),
    # sm_90: K split over a cluster of 2 CTAs, for shapes whose strips of x-sharing warps are
    # too few to fill the SMs (docs/PERF_NOTES.md, v19)
    TileConfig(nt=2, mt=2, wn=2, wk=2, xs=X_SHARED, ks=2),
    TileConfig(nt=2, mt=4, wn=2, wk=1, xs=X_SHARED, lut_copies=16, ks=2),
    TileConfig(nt=2, mt=4, wn=4, wk=1, xs=X_SHARED, lut_copies=16, ks=2),
    # M = 16: x read once for 128 rows of W (half of what nt4_mt2_wk4 reads from L2 a weight
    # byte), with K split over a cluster of two or four for the shapes with 64 or 32 such strips.
    # They won 2 of the 192 tuned cells from M = 16 by ties (v28): L2 is not what limits M = 16.
    # The v29 retune of M = 16 picks the first for one cell and the second for two (3-bit,
    # 10240 and 57344 rows), the third for none (docs/PERF_NOTES.md v28, v29)
    TileConfig(nt=2, mt=2, wn=4, wk=1, xs=X_SHARED, ks=2),
    TileConfig(nt=2, mt=2, wn=4, wk=1, xs=X_SHARED, ks=4),
    TileConfig(nt=4, mt=2, wn=2, wk=2, xs=X_SHARED, ks=2),
    # 16 and 32 tiles a warp, the A operand scaled (TileConfig.scales_a_operand): every weight
    # looked up once for 32 or 64 rows of x (docs/PERF_NOTES.md v24, v26)
    TileConfig(nt=4, mt=4, wn=2, wk=2, xs=X_SHARED, ks=2),
    TileConfig(nt=2, mt=8, wn=4, wk=1, xs=X_SHARED),
    TileConfig(nt=4, mt=8, wn=4, wk=1, xs=X_SHARED),
    # nt2_mt8 with K split over a cluster of two or four, for the shapes whose strips of 128 rows
    # are too few or leave part of a wave, and eight of its warps on one x stage (two a
    # scheduler), alone or with K split in two (docs/PERF_NOTES.md v27)
    TileConfig(nt=2, mt=8, wn=4, wk=1, xs=X_SHARED, ks=2),
    TileConfig(nt=2, mt=8, wn=4, wk=1, xs=X_SHARED, ks=4),
    TileConfig(nt=2, mt=8, wn=8, wk=1, xs=X_SHARED),
    TileConfig(nt=2, mt=8, wn=8, wk=1, xs=X_SHARED, ks=2),
    # 4-bit, the LUT's entries 256 bytes apart: a lookup's address is one prmt, not a shift and
    # a lop3 (nt4_mt2_wk4 1269 -> 1013 instructions a chunk, nt2_mt8_wn4_wk1 1032 -> 904; sm_90),
    # for 32 KiB more shared memory: the configs the table picks most from M = 16 whose CTAs an
    # SM that does not lower (docs/PERF_NOTES.md v29; v30: 39 of the 60 4-bit cells retuned from M = 16)
    TileConfig(nt=4, mt=2, wk=4, xs=X_WARP, wide_lut=True),
    TileConfig(nt=2, mt=2, wk=4, xs=X_WARP, wide_lut=True),
    TileConfig(nt=4, mt=4, wn=2, wk=2, xs=X_SHARED, ks=2, wide_lut=True),
    TileConfig(nt=2, mt=8, wn=4, wk=1, xs=X_SHARED, ks=2, wide_lut=True),
    TileConfig(nt=2, mt=8, wn=8, wk=1, xs=X_SHARED, wide_lut=True),
    TileConfig(nt=2, mt=8, wn=8, wk=1, xs=X_SHARED, ks=2, wide_lut=True),
)

# The warpgroup kernel (sm_90 only), from 32 rows of x: four warpgroups a CTA (256 weight rows
# on one copy of x), K split over a cluster of two, three or four for the shapes of few such
# strips. Clusters are placed whole within a GPC: the H100 holds 66 clusters of two CTAs of one
# SM each, but only 39 of three and 30 of four (117 and 120 CTAs), so which split fills a wave
# depends on the strips (docs/PERF_NOTES.md v35: eight, 15 clusters a wave, won no cell). Each
# won cells of the H100 benchmark's shapes at M = 32 to 128 against every TileConfig (v32, v35);
# two steps a group at BM = 128, whose 64 accumulators leave no registers for four.
WARPGROUP_CONFIGS = (
    WarpgroupConfig(bm=32, stages=3),
    WarpgroupConfig(bm=64),
    WarpgroupConfig(bm=64, ks=2),
    WarpgroupConfig(bm=64, ks=3),
    WarpgroupConfig(bm=64, ks=4),
    WarpgroupConfig(bm=128, batch=2),
    WarpgroupConfig(bm=128, ks=2, batch=2),
    WarpgroupConfig(bm=128, ks=3, batch=2),
    WarpgroupConfig(bm=128, ks=4, batch=2),
    # Stream-K: one wave for any count of strips, no cluster to place (at BM = 128 its sums at
    # each strip's end, inside the K loop, spill: 64 accumulators under the 128 registers of 512
    # threads)
    WarpgroupConfig(bm=32, stages=3, stream_k=True),
    WarpgroupConfig(bm=64, stream_k=True),
    # the codes and scales in registers (v37; measured and kept in v38)
    WarpgroupConfig(bm=32, stages=3, reg_codes=True),
    WarpgroupConfig(bm=64, reg_codes=True),
    WarpgroupConfig(bm=64, ks=2, reg_codes=True),
    WarpgroupConfig(bm=64, ks=3, reg_codes=True),
    WarpgroupConfig(bm=32, stages=3, stream_k=True, reg_codes=True),
    WarpgroupConfig(bm=64, stream_k=True, reg_codes=True),
)


def built_configs() -> tuple:
    """Every config compiled, of both LUT GEMM kernels: TILE_CONFIGS, then WARPGROUP_CONFIGS (read
    at each call, so that a tool that admits more TILE_CONFIGS, scripts/compare_configs.py, is heard)."""
    return TILE_CONFIGS + WARPGROUP_CONFIGS


def instantiated(bits: int, group: int, tile: TileConfig) -> bool:
    """Whether (bits, kernel GROUP, tile) is compiled, in either dtype. Where a warp holds many tiles, ptxas
    needs more than 255 registers and spills (sm_80 to sm_90), so these are not: eight 16 x 8
    tiles a warp (four m tiles of two n tiles, or four n tiles of two m tiles) with scale groups of
    32 or 64 k (nt4_mt2: 3-bit bfloat16 with groups of 64 on sm_90); ten (five n tiles of two m
    tiles) with 3-bit codes, whose fields take a select more a step; five n tiles of 2-bit codes
    with groups of 64 (one m tile: 32 bytes on sm_80, 86 and 89). A warp that scales the A
    operand (16 tiles or more) keeps no group sums, so small groups cost it nothing; at 32 tiles
    (four n tiles of eight m tiles) one group a row spills on sm_90: 3-bit codes under every
    NVRTC, 2- and 4-bit under 13.0 (4 bytes at 255 registers; none under 13.5). A wide
    LUT is for 4-bit codes only, the one width whose pair fields are whole bytes. (Ten tiles in
    bfloat16 spilled 20 bytes on sm_90 until bfloat16 scales were widened by a shift and a mask,
    cuda_src/dtype_traits.cuh.)"""
    if isinstance(tile, WarpgroupConfig):
        return True  # one 16-row tile a warp: no width or group spills (NVRTC, sm_90a)
    if tile.wide_lut and bits != 4:
        return False
    tiles = tile.mt * tile.nt
    if tile.scales_a_operand:
        return not (tiles >= 32 and group == 0)
    return not (tiles >= 8 and group in (32, 64)) and not (tiles >= 10 and bits == 3) \
        and not (tile.nt == 5 and bits == 2 and group == 64)


def tile_config_from_name(text: str) -> TileConfig | WarpgroupConfig:
    """'nt2_mt1_wk8_s3' -> TileConfig(2, 1, 8, 3), 'nt2_mt4_wn4_wk1_ks2_s2_xsh_c16' ->
    TileConfig(2, 4, 1, 2, wn=4, xs=X_SHARED, lut_copies=16, ks=2) (no _wn: one warp along n;
    no _ks: no cluster; _xs: X_WARP, _xsh: X_SHARED, _xr: X_ROW, none: X_GLOBAL; no _c:
    LUT_COPIES; _wl: a wide LUT), or 'wg4_bm64_ks4_s2_b4' -> WarpgroupConfig(64, 4, 2, 4, 4)
    ('wg4_bm64_sk_s2_b4': stream_k=True, 'wg4_bm64_s2_b4_rc': reg_codes=True), whether or not it
    is one of TILE_CONFIGS or WARPGROUP_CONFIGS."""
    if match := _WARPGROUP_NAME.fullmatch(text.strip()):
        wg, bm, ks, sk, stages, batch, rc = match.groups()
        return WarpgroupConfig(int(bm), int(wg), int(stages), int(ks or 1), int(batch),
                               stream_k=sk is not None, reg_codes=rc is not None)
    match = _CONFIG_NAME.fullmatch(text.strip())
    if not match:
        raise ValueError(f"tile config must look like nt2_mt1_wk8_s3, nt2_mt4_wn4_wk1_ks2_s2_xsh_c16 or "
                         f"wg4_bm64_ks4_s2_b4, got {text!r}")
    nt, mt, wn, wk, ks, stages, xs, copies, wide = match.groups()
    return TileConfig(int(nt), int(mt), int(wk), int(stages), int(wn or 1), _X_FROM_SUFFIX[xs or ""],
                      int(copies or LUT_COPIES), int(ks or 1), wide is not None)


def parse_tile_config(text: str) -> TileConfig | WarpgroupConfig:
    """A config name (see tile_config_from_name) that is one of TILE_CONFIGS or WARPGROUP_CONFIGS."""
    try:
        config = tile_config_from_name(text)
    except ValueError:
        config = None
    if config not in built_configs():
        raise ValueError(f"tile config must be one of {[str(c) for c in built_configs()]}, got {text!r}")
    return config


def lut_bytes(bits: int, copies: int, wide: bool = False) -> int:
    """Shared memory of the pair LUT: cuda_src/lut_gemm.cuh's CodeLayout::kLutBytes."""
    return 4**bits * copies * 4 * (2 if wide else 1)


def _check_template_args(bits: int, group: int, dtype: str) -> None:
    for name, value, allowed in (("bits", bits, SUPPORTED_BITS), ("group", group, KERNEL_GROUPS),
                                 ("dtype", dtype, DTYPES)):
        if value not in allowed:
            raise ValueError(f"kernel {name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class KernelSpec:
    bits: int
    group: int  # kernel GROUP: group size, or 0 for one group per row
    dtype: str
    tile: TileConfig | WarpgroupConfig

    def __post_init__(self):
        _check_template_args(self.bits, self.group, self.dtype)
        if self.tile not in built_configs():
            raise ValueError(f"kernel tile must be one of {built_configs()}, got {self.tile!r}")
        if not instantiated(self.bits, self.group, self.tile):
            raise ValueError(f"tile config {self.tile} is not compiled for {self.bits}-bit codes "
                             f"with scale groups of {self.group} in {self.dtype}: it would spill registers")

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory of a CTA: cuda_src/lut_gemm.cuh's SharedLayout, or
        lut_wgmma.cuh's WgmmaLayout."""
        t = self.tile
        groups_per_chunk = 1 if self.group == 0 else CHUNK_K // self.group
        warp_codes = 32 * 16 * self.bits + 32 * groups_per_chunk  # a 16-row tile's codes, scales
        if isinstance(t, WarpgroupConfig):
            x_bytes = CHUNK_K * t.bm * 2
            warp_stages = 0 if t.reg_codes else t.warps * warp_codes
            pipeline = lut_bytes(self.bits, LUT_COPIES) + t.stages * (x_bytes + warp_stages)
            barriers = 16 * t.stages  # a stage's mbarrier and its count of warps done with it
            return max(pipeline + barriers, t.threads * t.bm // 2 * 4 if t.ks > 1 else 0)
        lut = lut_bytes(self.bits, t.lut_copies, t.wide_lut)
        x_bytes = 32 * 16 * t.mt * CHUNK_K // 32  # a chunk's x: 8 16-byte pieces a lane an m tile
        warp_stage = t.nt * warp_codes
        warp_stage += x_bytes if t.xs == X_WARP else 2 * CHUNK_K if t.xs == X_ROW else 0
        shared_x = t.stages * t.wk * x_bytes if t.xs == X_SHARED else 0
        pipeline = lut + t.stages * t.warps * warp_stage + shared_x
        partial = t.warps * t.nt * t.mt * 4 * 32 * 4 if t.wk > 1 or t.ks > 1 else 0
        return max(pipeline, partial)

    @property
    def threads(self) -> int:
        return self.tile.threads

    @property
    def name_expression(self) -> str:
        t = self.tile
        if isinstance(t, WarpgroupConfig):
            return (f"cuflute::lut_wgmma<{self.bits}, {self.group}, {_CXX_TYPE[self.dtype]}, {t.bm}, {t.wg}, "
                    f"{t.stages}, {t.ks}, {t.batch}, {str(t.stream_k).lower()}, {str(t.reg_codes).lower()}>")
        args = (f"{self.bits}, {self.group}, {_CXX_TYPE[self.dtype]}, {t.nt}, {t.mt}, {t.wn}, {t.wk}, "
                f"{t.stages}, {int(t.xs)}, {t.lut_copies}, {int(t.wide_lut)}")
        return f"cuflute::lut_gemm_split<{args}, {t.ks}>" if t.ks > 1 else f"cuflute::lut_gemm<{args}>"


@dataclass(frozen=True)
class DequantSpec:
    """cuda_src/lut_dequant.cuh's kernel for one (bits, group, dtype): W' written out dense."""

    bits: int
    group: int  # kernel GROUP, as KernelSpec's
    dtype: str

    WARPS = 8  # kDequantWarps
    UNITS_PER_WARP = 4  # kDequantUnitsPerWarp: (n tile, chunk) units, one after the other

    def __post_init__(self):
        _check_template_args(self.bits, self.group, self.dtype)

    @property
    def shared_bytes(self) -> int:
        return lut_bytes(self.bits, LUT_COPIES)

    @property
    def threads(self) -> int:
        return 32 * self.WARPS

    @property
    def name_expression(self) -> str:
        return f"cuflute::lut_dequant<{self.bits}, {self.group}, {_CXX_TYPE[self.dtype]}>"


@dataclass(frozen=True)
class XImageSpec:
    """cuda_src/lut_wgmma.cuh's wgmma_x_image for a warpgroup config's BM: x rewritten, before
    each lut_wgmma launch, as the shared-memory images of its chunks (the layout is that file's)."""

    bm: int

    THREADS = 256  # kXImageThreads
    shared_bytes = 0
    threads = THREADS

    def image_elements(self, m: int, k_chunks: int) -> int:
        """The image's 2-byte elements: BM-row blocks of x, each chunk 256 k (zero past M and K)."""
        return -(-m // self.bm) * self.bm * k_chunks * CHUNK_K

    def grid(self, m: int, k_chunks: int) -> tuple[int, int, int]:
        """One thread a 64-byte run of x (32 k of a row)."""
        return (-(-self.image_elements(m, k_chunks) // 32 // self.THREADS), 1, 1)

    @property
    def name_expression(self) -> str:
        return f"cuflute::wgmma_x_image<{self.bm}>"


def all_specs() -> list[KernelSpec]:
    return [KernelSpec(b, g, d, t)
            for b, g, d, t in itertools.product(SUPPORTED_BITS, KERNEL_GROUPS, DTYPES, built_configs())
            if instantiated(b, g, t)]


def dequant_specs() -> list[DequantSpec]:
    return [DequantSpec(b, g, d) for b, g, d in itertools.product(SUPPORTED_BITS, KERNEL_GROUPS, DTYPES)]


def x_image_specs() -> list[XImageSpec]:
    return sorted({XImageSpec(t.bm) for t in built_configs() if isinstance(t, WarpgroupConfig)},
                  key=lambda spec: spec.bm)


# Thread-block clusters, hence tile configs with ks > 1, exist from sm_90 on.
CLUSTER_MIN_ARCH = 90
# wgmma, hence WarpgroupConfig's kernel, is sm_90a's alone: it is built for the H100 and H200
# and for no other target (sm_100 has other tensor-core instructions).
WARPGROUP_ARCH = 90


def device_arch(props: dict) -> int:
    """The sm_ number of a device from its CUDA properties: 90 for compute capability 9.0."""
    return 10 * props["major"] + props["minor"]


# The most dynamic shared memory a CTA may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin) on
# each target: the CUDA C++ Programming Guide's table of compute capabilities.
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def builds_for(spec, arch: int) -> bool:
    """Whether ``spec`` is a kernel of sm_``arch``: not a tile config that splits K over clusters
    before sm_90, nor a warpgroup config (or its x image) but on sm_90, nor, on a target of
    TARGET_ARCHS, one that needs more shared memory than a CTA there can have (it could never
    launch, so it is neither compiled nor checked for spills; elsewhere cuflute.gemm checks the
    device's own limit)."""
    if isinstance(spec, XImageSpec):
        return arch == WARPGROUP_ARCH  # lut_wgmma's alone
    if not isinstance(spec, KernelSpec):
        return True
    if isinstance(spec.tile, WarpgroupConfig) and arch != WARPGROUP_ARCH:
        return False
    fits = spec.shared_bytes <= MAX_SHARED_BYTES.get(arch, spec.shared_bytes)
    return fits and not (spec.tile.needs_clusters and arch < CLUSTER_MIN_ARCH)


def arch_option(arch: int) -> str:
    """NVRTC's target for sm_``arch``: sm_90a on sm_90, for lut_wgmma's wgmma (the others compile
    as for sm_90); ahead of CuPy's own -arch, the first of which NVRTC takes."""
    return f"-arch=sm_{arch}a" if arch == WARPGROUP_ARCH else f"-arch=sm_{arch}"


def every_spec(arch: int | None = None) -> list:
    """Every specialization of both kernel families: the LUT GEMM's, its dequantization's, the
    warpgroup kernel's x image, then BCQ's; with ``arch``, those of sm_``arch`` (builds_for)."""
    from .bcq.kernels import all_specs as bcq_specs

    specs = all_specs() + dequant_specs() + x_image_specs() + bcq_specs()
    return specs if arch is None else [s for s in specs if builds_for(s, arch)]


@lru_cache(maxsize=None)
def source() -> str:
    """The translation unit: a hash line of all of cuda_src/ (for caches), then the includes."""
    from . import __version__

    digest = hashlib.sha256()
    for path in sorted(CUDA_SRC.glob("*.cuh")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    includes = "".join(f'#include "{header}"\n' for header in KERNEL_HEADERS)
    return f"// cuflute {__version__}, cuda_src sha256 {digest.hexdigest()}\n{includes}"


def compile_options() -> tuple[str, ...]:
    return ("-std=c++17", f"-I{CUDA_SRC}")


@lru_cache(maxsize=None)
def _kernel(spec: KernelSpec, device: int):
    import cupy
    from cupy.cuda import driver

    with cupy.cuda.Device(device):
        arch = device_arch(cupy.cuda.runtime.getDeviceProperties(device))
        module = cupy.RawModule(code=source(), options=(*compile_options(), arch_option(arch)),
                                name_expressions=[spec.name_expression])
        function = module.get_function(spec.name_expression).kernel
        # all the device allows, not spec.shared_bytes: a launch may ask for more than the kernel
        # needs, to hold an SM's CTAs down (cuflute.gemm.spread_shared_bytes)
        driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                cupy.cuda.runtime.getDeviceProperties(device)["sharedMemPerBlockOptin"])
        return function


def get_kernel(spec: KernelSpec, device: int):
    """The compiled kernel of ``spec`` loaded on CUDA device ``device`` (a cupy.cuda.Function,
    called as ``f(grid, block, args, stream=...)`` with that device current)."""
    return _kernel(spec, device)


def precompile(device: int = 0, specs=None, workers: int = 8) -> tuple[int, int]:
    """Compile (and cache on disk) every specialization that ``device`` can launch; returns
    (compiled, left out because they need more shared memory than the device has). Cluster
    configs are not counted on a device without clusters."""
    from concurrent.futures import ThreadPoolExecutor

    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device)
    arch = device_arch(props)
    specs = [s for s in (every_spec() if specs is None else specs) if builds_for(s, arch)]
    fitting = [spec for spec in specs if spec.shared_bytes <= props["sharedMemPerBlockOptin"]]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda spec: get_kernel(spec, device), fitting))
    return len(fitting), len(specs) - len(fitting)


# --- Compilation without a GPU: NVRTC directly, for the CPU test tier and `cuflute compile-check`.

@dataclass(frozen=True)
class ResourceUsage:
    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_bytes: int


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_\w+'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def cuda_include_dir() -> Path:
    """CUDA headers from the nvidia-cuda-runtime wheel (cuda_fp16.h and friends)."""
    import nvidia

    for root in nvidia.__path__:
        for sub in ("cu13", "cuda_runtime"):
            candidate = Path(root) / sub / "include"
            if (candidate / "cuda_fp16.h").exists():
                return candidate
    raise FileNotFoundError("cuda_fp16.h not found: pip install nvidia-cuda-runtime")


def parse_ptxas_log(log: str) -> list[ResourceUsage]:
    """Per-entry resource usage from an ``-Xptxas=-v`` program log."""
    usages, name, spills = [], None, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            name, spills = m.group(1), None
        elif (m := _SPILLS.search(line)) and name:
            spills = tuple(int(v) for v in m.groups())
        elif (m := _REGS.search(line)) and name and spills:
            usages.append(ResourceUsage(name=name, registers=int(m.group(1)),
                                        stack_frame=spills[0], spill_stores=spills[1],
                                        spill_loads=spills[2], shared_bytes=int(m.group(2) or 0)))
            name = None
    return usages


def _cubin(program) -> bytes:
    """The program's machine code, whole. CuPy's getCUBIN returns one byte less than NVRTC's
    size (as if it were text ending in a NUL), and cuobjdump refuses such a file ("does not
    contain device code"), so this asks the NVRTC library CuPy uses for it directly."""
    import ctypes

    from cuda.pathfinder import load_nvidia_dynamic_lib

    lib = ctypes.CDLL(load_nvidia_dynamic_lib("nvrtc").abs_path)
    size = ctypes.c_size_t()
    if lib.nvrtcGetCUBINSize(ctypes.c_void_p(program), ctypes.byref(size)):
        raise RuntimeError("nvrtcGetCUBINSize failed")
    buffer = ctypes.create_string_buffer(size.value)
    if lib.nvrtcGetCUBIN(ctypes.c_void_p(program), buffer):
        raise RuntimeError("nvrtcGetCUBIN failed")
    return buffer.raw


def nvrtc_compile(specs, arch: int, cubin_path: str | None = None) -> list[ResourceUsage]:
    """Compile ``specs`` to sm_``arch`` machine code in one NVRTC program; no GPU needed.
    ``cubin_path``: also write the machine code there (for cuobjdump)."""
    from cupy_backends.cuda.libs import nvrtc

    specs = list(specs)
    program = nvrtc.createProgram(source(), "cuflute.cu", [], [])
    try:
        for spec in specs:
            nvrtc.addNameExpression(program, spec.name_expression)
        options = [*compile_options(), f"-I{cuda_include_dir()}", arch_option(arch), "-Xptxas=-v"]
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            raise RuntimeError(f"NVRTC failed for sm_{arch}:\n{nvrtc.getProgramLog(program)}") from error
        lowered = {nvrtc.getLoweredName(program, s.name_expression): s for s in specs}
        usages = parse_ptxas_log(nvrtc.getProgramLog(program))
        if cubin_path:
            Path(cubin_path).write_bytes(_cubin(program))
    finally:
        nvrtc.destroyProgram(program)
    by_name = {lowered[u.name].name_expression: replace(u, name=lowered[u.name].name_expression)
               for u in usages if u.name in lowered}
    missing = [s.name_expression for s in specs if s.name_expression not in by_name]
    if missing:
        raise RuntimeError(f"no ptxas report for {missing[:3]} ... ({len(missing)} in all)")
    return [by_name[s.name_expression] for s in specs]

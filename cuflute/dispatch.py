"""Which tile config runs a given problem: the tuned table for this GPU, else a heuristic."""
from __future__ import annotations

import os
import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import yaml

from .kernels import (TILE_CONFIGS, X_ROW, X_SHARED, X_WARP, KernelSpec, TileConfig, instantiated,
                      parse_tile_config)

_PACKAGE = Path(__file__).resolve().parent
# Not a tile config: W' dequantized into a temporary buffer (cuda_src/lut_dequant.cuh), then a
# dense tensor-core GEMM over it (cuBLAS, through torch or CuPy). Wins at large M, where the
# LUT GEMM's per-fragment lookups and x traffic cost more than writing and reading W' once.
DENSE = "dense"
# The heuristic's threshold: on the H100 the best tile config beats the dense path at M = 128 and
# loses to it at M = 256 (docs/PERF_NOTES.md, v16).
DENSE_MIN_M = 256
# Not a tile config either: cuBLAS over a W' held by cuflute.dense_cache, where that cache has a
# limit set. Without a tuned table that says where it wins, from this many rows: on the H100 the
# best tile config runs at 0.91 to 1.21x of cuBLAS fp16 at M = 64 and takes 1.4 to 1.9x its time
# at 128 (BENCHMARKS.md), and a tuned bucket of 128 stands for 65 to 128 rows.
DENSE_CACHED = "dense_cached"
DENSE_CACHED_MIN_M = 65
_ONE_ROW = TileConfig(nt=1, mt=1, wk=4, xs=X_ROW)
_DECODE = TileConfig(nt=2, mt=1, wk=4, xs=X_WARP)
_DECODE_WIDE_M = TileConfig(nt=2, mt=2, wk=4, xs=X_WARP)
_MID_M = TileConfig(nt=2, mt=2, wn=2, wk=2, xs=X_SHARED)
_LARGE_M = TileConfig(nt=2, mt=4, wn=2, wk=1, xs=X_SHARED)


def tuning_dir() -> Path:
    """``$CUFLUTE_TUNING_DIR``, else the tuned tables shipped with the package."""
    if os.environ.get("CUFLUTE_TUNING_DIR"):
        return Path(os.environ["CUFLUTE_TUNING_DIR"])
    installed = _PACKAGE / "tuning_configs"
    return installed if installed.is_dir() else _PACKAGE.parent / "tuning" / "configs"


def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the tuned table's file name."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")


def table_key(bits: int, group: int, dtype: str, n: int, k: int) -> tuple:
    return bits, group, dtype, n, k


class TunedEntry(NamedTuple):
    """One M bucket of a tuned shape: its winning config (a TileConfig or DENSE) and whether
    cuBLAS over a held W' (DENSE_CACHED) beat it; None where the table did not time that."""

    m: int
    config: TileConfig | str
    dense_cached_wins: bool | None


@lru_cache(maxsize=None)
def tuned_table(gpu_name: str) -> dict[tuple, list[TunedEntry]]:
    """{(bits, group, dtype, n, k): [TunedEntry, ...] by ascending m}; empty if none exists."""
    path = tuning_dir() / f"{gpu_slug(gpu_name)}.yaml"
    if not path.exists():
        return {}
    table: dict[tuple, list[TunedEntry]] = {}
    unknown = set()
    for e in yaml.safe_load(path.read_text())["entries"]:
        try:
            config = parse_config(e["config"])
        except ValueError:
            unknown.add(e["config"])  # a table tuned for another version's configs
            continue
        key = table_key(e["bits"], e["group"], e["dtype"], e["n"], e["k"])
        cached_us = e.get("dense_cached_us")
        wins = None if cached_us is None else cached_us < e["us"]
        table.setdefault(key, []).append(TunedEntry(e["m"], config, wins))
    if unknown:
        warnings.warn(f"{path} names tile configs this version does not build ({sorted(unknown)}); "
                      f"those entries are ignored: re-run `python -m cuflute tune`", stacklevel=2)
    return {key: sorted(rows) for key, rows in table.items()}


def parse_config(text: str) -> TileConfig | str:
    """A tile config's name (kernels.parse_tile_config), or DENSE."""
    return DENSE if text.strip() == DENSE else parse_tile_config(text)


def heuristic_config(m: int, bits: int, group: int) -> TileConfig | str:
    """One row of x: one 16-row n tile a warp, 4 warps splitting K, the row staged by each
    warp. Two n tiles a warp: up to 8 rows of x, one m tile and 4 warps splitting K, x staged by
    each warp; up to 16, two m tiles. Past that, x shared by 2 warps side by side
    along n: up to 32 rows, two m tiles and 2 K slices; then four m tiles and one K slice
    (two m tiles for scale groups too small for four, kernels.instantiated). From DENSE_MIN_M
    rows, DENSE. Per M, the config that the H100 tuning picked most often (tuning/configs) or,
    where the picks spread, the one closest to the best on the benchmark's shapes
    (docs/PERF_NOTES.md, v16 and v17)."""
    if m >= DENSE_MIN_M:
        return DENSE
    if m == 1:
        return _ONE_ROW
    if m <= 8:
        return _DECODE
    if m <= 16:
        return _DECODE_WIDE_M
    return _LARGE_M if m > 32 and instantiated(bits, group, _LARGE_M) else _MID_M


def select_config(m: int, n: int, k: int, bits: int, group: int, dtype: str,
                  gpu_name: str | None = None,
                  max_shared_bytes: int | None = None,
                  dense_cache: bool = False) -> TileConfig | str:
    """The tile config for y[m, n] = x[m, k] @ W'^T, DENSE, or (``dense_cache``: a dense cache
    limit is set) DENSE_CACHED.

    A tuned table for ``gpu_name`` answers for the shapes it holds, with the smallest tuned
    m bucket at or above m (the largest past the end, unless the heuristic says DENSE there);
    anything else takes the heuristic. With ``dense_cache``, DENSE_CACHED replaces DENSE, and
    any config where the bucket measured cuBLAS over W' faster (or, where it did not time
    that, from DENSE_CACHED_MIN_M rows). A choice whose shared memory exceeds
    ``max_shared_bytes`` (smaller on sm_86/sm_89 than on sm_80/sm_90) gives way to the config
    of least shared memory that takes m rows (the widest tile among equals, never a cluster
    config), which fits every target (DENSE needs only the LUT's). The heuristic never picks a
    cluster config either: only a tuned table for a GPU that has clusters does.
    """
    rows = tuned_table(gpu_name).get(table_key(bits, group, dtype, n, k)) if gpu_name else None
    heuristic = heuristic_config(m, bits, group)
    entry = None
    if rows and (m <= rows[-1].m or heuristic != DENSE):
        entry = next((row for row in rows if row.m >= m), rows[-1])
        config = entry.config
        if config != DENSE and not config.takes(m):
            config = heuristic  # the largest bucket's config takes fewer rows than m
    else:
        config = heuristic
    if dense_cache:
        measured = None if entry is None else entry.dense_cached_wins
        if config == DENSE or (m >= DENSE_CACHED_MIN_M if measured is None else measured):
            return DENSE_CACHED
    if config == DENSE or max_shared_bytes is None or \
            KernelSpec(bits, group, dtype, config).shared_bytes <= max_shared_bytes:
        return config
    fitting = (c for c in TILE_CONFIGS if instantiated(bits, group, c) and c.takes(m) and not c.needs_clusters)
    return min(fitting, key=lambda c: (KernelSpec(bits, group, dtype, c).shared_bytes, -c.mt * c.nt))

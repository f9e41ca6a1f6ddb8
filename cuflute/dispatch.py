"""Which tile config runs a given problem: the tuned table for this GPU, else a heuristic."""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import yaml

from .kernels import TILE_CONFIGS, KernelSpec, TileConfig, parse_tile_config

_PACKAGE = Path(__file__).resolve().parent
_SMALL_M = TileConfig(nt=1, mt=1, wk=8)
_SMALL_M_WIDE = TileConfig(nt=2, mt=1, wk=8)
_MEDIUM_M = TileConfig(nt=1, mt=2, wk=8)
_LARGE_M = TileConfig(nt=2, mt=2, wk=4)


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


@lru_cache(maxsize=None)
def tuned_table(gpu_name: str) -> dict[tuple, list[tuple[int, TileConfig]]]:
    """{(bits, group, dtype, n, k): [(m bucket, config), ...] ascending}; empty if none exists."""
    path = tuning_dir() / f"{gpu_slug(gpu_name)}.yaml"
    if not path.exists():
        return {}
    table: dict[tuple, list[tuple[int, TileConfig]]] = {}
    for e in yaml.safe_load(path.read_text())["entries"]:
        key = table_key(e["bits"], e["group"], e["dtype"], e["n"], e["k"])
        table.setdefault(key, []).append((e["m"], parse_tile_config(e["config"])))
    return {key: sorted(rows) for key, rows in table.items()}


def heuristic_config(m: int, n: int, sm_count: int) -> TileConfig:
    """One CTA covers 16*nt rows of W and 8*mt rows of x, its wk warps splitting K.

    Up to 8 rows of x fit one m8 mma tile; past that, more m tiles reuse each dequantized weight
    fragment. Two tiles per warp only when that still leaves every SM several CTAs.
    """
    if m > 16:
        return _LARGE_M
    if m > 8:
        return _MEDIUM_M
    n_tiles = -(-n // 16)
    return _SMALL_M_WIDE if n_tiles // _SMALL_M_WIDE.nt >= 8 * sm_count else _SMALL_M


def select_config(m: int, n: int, k: int, bits: int, group: int, dtype: str,
                  sm_count: int = 132, gpu_name: str | None = None,
                  max_shared_bytes: int | None = None) -> TileConfig:
    """The tile config for y[m, n] = x[m, k] @ W'^T.

    A tuned table for ``gpu_name`` answers for the shapes it holds, with the smallest tuned
    m bucket at or above m (the largest past the end); anything else takes the heuristic. A
    choice whose shared memory exceeds ``max_shared_bytes`` (smaller on sm_86/sm_89 than on
    sm_80/sm_90) gives way to the config of fewest warps, which fits every target.
    """
    rows = tuned_table(gpu_name).get(table_key(bits, group, dtype, n, k)) if gpu_name else None
    if rows:
        config = next((config for bucket, config in rows if bucket >= m), rows[-1][1])
    else:
        config = heuristic_config(m, n, sm_count)
    if max_shared_bytes is None or KernelSpec(bits, group, dtype, config).shared_bytes <= max_shared_bytes:
        return config
    return min(TILE_CONFIGS, key=lambda c: (KernelSpec(bits, group, dtype, c).shared_bytes, -c.mt * c.nt))

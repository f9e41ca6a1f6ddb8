"""``python -m cuflute tune tuning/sweeps/<name>.yaml``: time every candidate tile config per
(shape, bits, group, dtype, M bucket), each checked against the reference before it is timed,
and write the winners to ``tuning/configs/<gpu>.yaml``, which the dispatcher reads at run time.

A sweep file::

    name: h100-decode
    shapes: [[4096, 4096], [8192, 28672]]     # (N, K)
    bits: [4, 3]
    group_sizes: [128]                        # or "channel" for one group per row
    dtypes: [float16]
    m_buckets: [1, 4, 16, 32, 64, 128]
    candidates: all                           # or a list like [nt1_mt1_wk8_s2, dense]

With ``dense`` among the candidates, each bucket from 32 rows also records ``dense_cached_us``:
cuBLAS over the dequantized weight, which the dispatcher runs instead where that is faster and
``cuflute.dense_cache`` has a limit set.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import yaml

from . import bench, reference
from .dispatch import DENSE, DENSE_CACHED, gpu_slug, heuristic_config, parse_config, table_key, tuning_dir
from .dtypes import DTYPES
from .formats import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .gemm import dequantize, device_properties, qgemm
from .kernels import KernelSpec, TileConfig, built_configs, builds_for, device_arch, instantiated
from .packing import TILE_N, packed_nbytes, random_packed

CHECK_TILES = 4  # row tiles of each weight compared with the NumPy reference


@dataclass(frozen=True)
class Sweep:
    name: str
    shapes: tuple[tuple[int, int], ...]
    bits: tuple[int, ...]
    group_sizes: tuple  # ints, or "channel"
    dtypes: tuple[str, ...]
    m_buckets: tuple[int, ...]
    candidates: tuple[TileConfig | str, ...]  # tile configs and DENSE


def _as_list(doc: dict, key: str) -> list:
    if key not in doc:
        raise ValueError(f"sweep file has no '{key}'")
    value = doc[key]
    return value if isinstance(value, list) else [value]


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every error names the key and the allowed values."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    shapes = tuple(tuple(int(v) for v in s) for s in _as_list(doc, "shapes"))
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"shapes must be [N, K] pairs of positive integers, got {doc['shapes']}")
    checks = (("bits", SUPPORTED_BITS), ("group_sizes", SUPPORTED_GROUP_SIZES + ("channel",)),
              ("dtypes", DTYPES))
    for key, allowed in checks:
        bad = [v for v in _as_list(doc, key) if v not in allowed]
        if bad:
            raise ValueError(f"{key} must be among {allowed}, got {bad}")
    m_buckets = tuple(sorted(int(m) for m in _as_list(doc, "m_buckets")))
    if min(m_buckets) < 1:
        raise ValueError(f"m_buckets must be positive, got {list(m_buckets)}")
    candidates = doc.get("candidates", "all")
    configs = built_configs() + (DENSE,) if candidates == "all" else tuple(parse_config(c) for c in candidates)
    return Sweep(name=str(doc.get("name", Path(path).stem)), shapes=shapes,
                 bits=tuple(doc["bits"]), group_sizes=tuple(_as_list(doc, "group_sizes")),
                 dtypes=tuple(_as_list(doc, "dtypes")), m_buckets=m_buckets, candidates=configs)


def useful_at(config: TileConfig | str, m: int) -> bool:
    """Whether timing ``config`` at ``m`` rows can pay (or can run at all: a config of one row of
    x takes m = 1 only): an m tile more than twice the rows (or wider than 8 at all when m <= 4)
    only multiplies by padding; below 32 rows, writing W' out (DENSE) costs more than the whole
    LUT GEMM."""
    if config == DENSE:
        return m >= 32
    return config.block_m <= max(8, 2 * m) and config.takes(m)


def _torch_dense(packed, dtype: str):
    """W' of a packed weight as a torch tensor of ``dtype`` (cuflute.dequantize's array)."""
    import torch

    w = torch.from_dlpack(dequantize(packed))
    return w.view(torch.bfloat16) if dtype == "bfloat16" else w


def _rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def tune_problem(n, k, bits, group_size, dtype, sweep: Sweep, rotate_bytes, replays, bar) -> list[dict]:
    """The winning config of each M bucket for one weight shape; failures are errors."""
    import torch

    group = None if group_size == "channel" else group_size
    device = torch.cuda.current_device()
    copies = bench.rotation_copies(rotate_bytes, packed_nbytes(n, k, bits, group))
    weights = [random_packed(n, k, bits, group, dtype, device=device, seed=s) for s in range(copies)]
    rng = np.random.default_rng(n * 31 + k)
    tiles = rng.choice(n // TILE_N, size=min(CHECK_TILES, n // TILE_N), replace=False)
    rows = (tiles[:, None] * TILE_N + np.arange(TILE_N)).ravel()
    sample = weights[0].take_tiles(tiles)
    group_arg = 0 if group is None else group
    props = device_properties(device)

    def runs_here(config) -> bool:
        if config == DENSE:
            return True
        if not instantiated(bits, group_arg, config):
            return False
        spec = KernelSpec(bits, group_arg, dtype, config)
        return builds_for(spec, device_arch(props)) and spec.shared_bytes <= props["sharedMemPerBlockOptin"]

    fitting = [c for c in sweep.candidates if runs_here(c)]
    # W' of each copy, for timing cuBLAS over it as dense_cache would hold it (DENSE_CACHED)
    held_ms = [m for m in sweep.m_buckets if DENSE in sweep.candidates and useful_at(DENSE, m)]
    dense = [_torch_dense(w, dtype) for w in weights] if held_ms else []
    check_rows = torch.as_tensor(rows, device="cuda")
    entries = []
    for m in sweep.m_buckets:
        x = torch.randn(m, k, dtype=getattr(torch, dtype), device="cuda")
        ref = reference.qgemm(x.double().cpu().numpy(), sample)

        def check(y, what):
            err = _rel_error(y[:, check_rows].double().cpu().numpy(), ref)
            if not err < reference.REL_ERROR_BOUND[dtype]:
                raise RuntimeError(f"{what} is wrong for {n=} {k=} {bits=} group={group_size} "
                                   f"{dtype} {m=}: relative error {err:.2e}")

        times = {}
        for config in [c for c in fitting if useful_at(c, m)]:
            bar.set_description(f"{n}x{k} {bits}-bit M={m} {config}")
            check(qgemm(x, weights[0], config=config), config)
            calls = [partial(qgemm, x, w, out=x.new_empty(m, n), config=config) for w in weights]
            times[config] = bench.time_graph_us(calls, replays)
        bar.update(len(sweep.candidates))
        best = min(times, key=times.get)
        heuristic_us = times.get(heuristic_config(m, bits, group_arg))
        entry = {"bits": bits, "group": group_arg, "dtype": dtype,
                 "n": n, "k": k, "m": m, "config": str(best), "us": round(times[best], 2),
                 "heuristic_us": None if heuristic_us is None else round(heuristic_us, 2)}
        if m in held_ms:
            check(x @ dense[0].t(), DENSE_CACHED)
            calls = [partial(torch.mm, x, w.t(), out=x.new_empty(m, n)) for w in dense]
            entry["dense_cached_us"] = round(bench.time_graph_us(calls, replays), 2)
        entries.append(entry)
    del weights, dense
    bench.release_memory()
    return entries


def run_sweep(sweep: Sweep, rotate_bytes: int | None, replays: int) -> dict:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    rotate = rotate_bytes or 2 * props.L2_cache_size
    problems = [(n, k, b, g, d) for n, k in sweep.shapes for b in sweep.bits
                for g in sweep.group_sizes for d in sweep.dtypes]
    bar = bench.progress_bar(len(problems) * len(sweep.m_buckets) * len(sweep.candidates))
    entries = []
    for problem in problems:
        entries += tune_problem(*problem, sweep, rotate, replays, bar)
    bar.close()
    return {"gpu": props.name, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "sweep": sweep.name, "versions": bench.package_versions(),
            "method": f"median of {replays} CUDA-graph replays of at least {bench.DEFAULT_GRAPH_CALLS} "
                      f"calls, weights rotated over {rotate} bytes",
            "entries": entries}


def entry_key(entry: dict) -> tuple:
    """What a table entry is the winner for: the dispatcher's shape key, then the M bucket."""
    return *table_key(entry["bits"], entry["group"], entry["dtype"], entry["n"], entry["k"]), entry["m"]


def merge_tables(table: dict, result: dict) -> tuple[dict, list[str]]:
    """``result`` (a sweep of some cells) written into ``table`` (the GPU's whole file): its entries
    replace those of the same key and add the keys the table lacks; the others stay. The header
    (date, versions, method) becomes the new run's, and ``sweep`` names both sweeps. An entry keeps
    the table's ``dense_cached_us`` where the new run timed none (a sweep without ``dense``), so
    that a partial retune does not turn the dense cache off for its cells. Returns the merged table
    and a line for each cell whose config changed."""
    if table["gpu"] != result["gpu"]:
        raise ValueError(f"cannot merge a sweep run on {result['gpu']} into the table of {table['gpu']}")
    entries = {entry_key(e): e for e in table["entries"]}
    changed = []
    for new in result["entries"]:
        old = entries.get(entry_key(new))
        if old is not None and "dense_cached_us" in old and "dense_cached_us" not in new:
            new = {**new, "dense_cached_us": old["dense_cached_us"]}
        if old is not None and old["config"] != new["config"]:
            changed.append(f"{entry_key(new)}: {old['config']} {old['us']} us -> {new['config']} {new['us']} us")
        entries[entry_key(new)] = new
    names = table["sweep"].split(" + ")
    names += [] if result["sweep"] in names else [result["sweep"]]
    return {**result, "sweep": " + ".join(names), "entries": list(entries.values())}, changed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="a sweep file, e.g. tuning/sweeps/h100.yaml")
    parser.add_argument("--out", help="default: tuning/configs/<gpu>.yaml")
    parser.add_argument("--merge", action="store_true",
                        help="write the sweep's cells into the file already at --out (default: the GPU's), "
                             "keeping its other cells (a retune of some shapes or M buckets), instead of "
                             "replacing it")
    parser.add_argument("--replays", type=bench.positive_int, default=bench.DEFAULT_REPLAYS)
    parser.add_argument("--rotate-bytes", type=bench.parse_bytes, default=None,
                        help="weight bytes to rotate over (default: twice the L2 size)")


def run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep)
    reason = bench.gpu_skip_reason()
    if reason:
        print(f"cuflute tune: {reason}; the sweep {sweep.name!r} is valid, nothing was timed")
        return 1
    result = run_sweep(sweep, args.rotate_bytes, args.replays)
    out = Path(args.out) if args.out else tuning_dir() / f"{gpu_slug(result['gpu'])}.yaml"
    for e in result["entries"]:
        print(f"{e['n']:>6} {e['k']:>6} {e['bits']}-bit g{e['group']:<4} {e['dtype']:<8} "
              f"M={e['m']:<4} {e['config']:<12} {e['us']:8.2f} us")
    merging = args.merge and out.exists()
    table = result
    if merging:
        table, changed = merge_tables(yaml.safe_load(out.read_text()), result)
        print("\n".join(changed) or "no cell changed its config")
    out.parent.mkdir(parents=True, exist_ok=True)
    bench.write_atomically(str(out), yaml.safe_dump(table, sort_keys=False, width=120))
    print(f"{'merged into' if merging else 'wrote'} {out}")
    return 0

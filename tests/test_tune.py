from pathlib import Path

import pytest

from cuflute.dispatch import DENSE
from cuflute.kernels import TILE_CONFIGS, WARPGROUP_CONFIGS, X_ROW, X_SHARED, X_WARP, TileConfig, WarpgroupConfig
from cuflute.tune import entry_key, load_sweep, merge_tables, useful_at

SWEEPS = Path(__file__).resolve().parent.parent / "tuning" / "sweeps"


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_committed_sweeps_load(path):
    sweep = load_sweep(path)
    assert sweep.shapes and sweep.m_buckets == tuple(sorted(sweep.m_buckets))
    assert set(sweep.candidates) <= set(TILE_CONFIGS + WARPGROUP_CONFIGS) | {DENSE}


def _write(tmp_path, body):
    path = tmp_path / "s.yaml"
    path.write_text(body)
    return path


BASE = ("shapes: [[64, 256]]\nbits: [4]\ngroup_sizes: [128, channel]\ndtypes: [float16]\n"
        "m_buckets: [16, 1]\n")


def test_sweep_fields(tmp_path):
    sweep = load_sweep(_write(tmp_path, BASE + "candidates: [nt2_mt1_wk4_s2_xs, nt2_mt2_wn2_wk2_s2_xsh, dense]\n"))
    assert sweep.name == "s" and sweep.shapes == ((64, 256),) and sweep.m_buckets == (1, 16)
    assert sweep.group_sizes == (128, "channel")
    assert sweep.candidates == (TileConfig(2, 1, 4, xs=X_WARP), TileConfig(2, 2, 2, wn=2, xs=X_SHARED), DENSE)
    assert load_sweep(_write(tmp_path, BASE)).candidates == TILE_CONFIGS + WARPGROUP_CONFIGS + (DENSE,)


@pytest.mark.parametrize("replace, match", [
    (("bits: [4]", "bits: [5]"), r"bits must be among \(2, 3, 4\), got \[5\]"),
    (("group_sizes: [128, channel]", "group_sizes: [100]"), "group_sizes must be among"),
    (("dtypes: [float16]", "dtypes: [float32]"), "dtypes must be among"),
    (("shapes: [[64, 256]]", "shapes: [[64]]"), r"shapes must be \[N, K\] pairs"),
    (("m_buckets: [16, 1]", "m_buckets: [0]"), "m_buckets must be positive"),
    (("bits: [4]\n", ""), "sweep file has no 'bits'"),
])
def test_sweep_errors(tmp_path, replace, match):
    with pytest.raises(ValueError, match=match):
        load_sweep(_write(tmp_path, BASE.replace(*replace)))


def test_unknown_candidate(tmp_path):
    with pytest.raises(ValueError, match="tile config must be one of"):
        load_sweep(_write(tmp_path, BASE + "candidates: [nt9_mt9_wk9_s2]\n"))


def test_useful_at_prunes_wide_m_tiles_for_small_m():
    wide = TileConfig(1, 4, 4)
    assert not useful_at(wide, 1) and not useful_at(wide, 15) and useful_at(wide, 16)
    assert all(useful_at(c, m) for c in TILE_CONFIGS if c.mt == 1 and c.max_m is None
               for m in (1, 4, 128))
    one_row = TileConfig(1, 1, 4, xs=X_ROW)
    assert useful_at(one_row, 1) and not useful_at(one_row, 2)
    assert not useful_at(DENSE, 16) and useful_at(DENSE, 32)
    warpgroups = WarpgroupConfig(bm=128, batch=2)
    assert not useful_at(warpgroups, 63) and useful_at(warpgroups, 64) and useful_at(warpgroups, 10**4)


def _entry(n, m, config, us, **extra):
    return {"bits": 4, "group": 128, "dtype": "float16", "n": n, "k": 4096, "m": m, "config": config,
            "us": us, "heuristic_us": None, **extra}


def test_merge_replaces_the_swept_cells_and_keeps_the_rest():
    table = {"gpu": "G", "date": "2026-12-01", "sweep": "full",
             "entries": [_entry(4096, 1, "a", 5.0), _entry(4096, 32, "b", 9.0, dense_cached_us=8.5),
                         _entry(8192, 32, "c", 20.0)]}
    result = {"gpu": "G", "date": "2026-12-08", "sweep": "m32",
              "entries": [_entry(4096, 32, "d", 7.0), _entry(8192, 32, "c", 19.0), _entry(1024, 32, "e", 3.0)]}
    merged, changed = merge_tables(table, result)
    assert merged["date"] == "2026-12-08" and merged["sweep"] == "full + m32"
    by_key = {entry_key(e): e for e in merged["entries"]}
    assert len(by_key) == len(merged["entries"]) == 4
    assert by_key[(4, 128, "float16", 4096, 4096, 1)]["config"] == "a"  # not swept: kept
    # swept: the new winner, with the held-W' time the new run did not take
    assert by_key[(4, 128, "float16", 4096, 4096, 32)] == _entry(4096, 32, "d", 7.0, dense_cached_us=8.5)
    assert by_key[(4, 128, "float16", 8192, 4096, 32)]["us"] == 19.0
    assert by_key[(4, 128, "float16", 1024, 4096, 32)]["config"] == "e"  # a cell the table lacked
    assert changed == ["(4, 128, 'float16', 4096, 4096, 32): b 9.0 us -> d 7.0 us"]
    assert merge_tables(merged, result)[0]["sweep"] == "full + m32"  # the same sweep merged again


def test_merge_refuses_another_gpus_table():
    with pytest.raises(ValueError, match="run on H200 into the table of H100"):
        merge_tables({"gpu": "H100", "sweep": "s", "entries": []}, {"gpu": "H200", "sweep": "s", "entries": []})

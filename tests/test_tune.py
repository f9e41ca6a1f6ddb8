from pathlib import Path

import pytest

from cuflute.dispatch import DENSE
from cuflute.kernels import TILE_CONFIGS, WARPGROUP_CONFIGS, X_ROW, X_SHARED, X_WARP, TileConfig, WarpgroupConfig
from cuflute.tune import load_sweep, useful_at

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

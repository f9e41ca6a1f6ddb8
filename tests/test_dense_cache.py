"""cuflute.dense_cache's bookkeeping and the dispatcher's DENSE_CACHED pick: no GPU needed."""
import gc

import pytest

from cuflute import dense_cache
from cuflute.dispatch import DENSE, DENSE_CACHED, DENSE_CACHED_MIN_M, DENSE_MIN_M, select_config


class Weight:
    """What the cache reads of a PackedWeight: N, K and a weak reference to the object."""

    def __init__(self, n, k):
        self.n, self.k = n, k


@pytest.fixture
def cache():
    dense_cache.set_limit(1000)
    yield dense_cache
    dense_cache.set_limit(0)
    dense_cache.clear()


def test_a_weight_is_held_while_it_fits_and_goes_with_it(cache):
    a, b = Weight(10, 20), Weight(10, 20)  # 400 bytes each in 16 bits
    assert cache.admits(a)
    cache.put(a, "torch", "W' of a")
    cache.put(a, "torch", "again")  # held once
    assert cache.held_bytes() == 400 and cache.get(a, "torch") == "W' of a"
    assert cache.get(b, "torch") is None
    cache.put(b, "cupy", "W' of b")
    assert cache.held_bytes() == 800 and not cache.admits(Weight(10, 20))
    del a
    gc.collect()
    assert cache.held_bytes() == 400 and cache.get(b, "cupy") == "W' of b"
    cache.clear()
    assert cache.held_bytes() == 0 and cache.get(b, "cupy") is None


def test_a_lower_limit_lets_what_is_held_go(cache):
    a = Weight(10, 20)
    cache.put(a, "torch", "W'")
    cache.set_limit(1000)  # still room: kept
    assert cache.get(a, "torch") == "W'"
    cache.set_limit(399)
    assert cache.held_bytes() == 0 and cache.get(a, "torch") is None and cache.enabled()
    cache.set_limit(0)
    assert not cache.enabled()


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", True, None])
def test_limit_must_be_a_byte_count(bad):
    with pytest.raises(ValueError, match="byte count"):
        dense_cache.set_limit(bad)


def test_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv("CUFLUTE_DENSE_CACHE_BYTES", "4096")
    assert dense_cache._env_limit() == 4096
    monkeypatch.setenv("CUFLUTE_DENSE_CACHE_BYTES", "4GiB")
    with pytest.raises(ValueError, match="CUFLUTE_DENSE_CACHE_BYTES"):
        dense_cache._env_limit()


def test_heuristic_holds_from_dense_cached_min_m():
    pick = lambda m, held: select_config(m, 4096, 4096, 4, 128, "float16", dense_cache=held)
    assert pick(DENSE_CACHED_MIN_M - 1, True) == pick(DENSE_CACHED_MIN_M - 1, False) != DENSE_CACHED
    assert pick(DENSE_CACHED_MIN_M, True) == pick(DENSE_MIN_M, True) == DENSE_CACHED
    assert pick(DENSE_CACHED_MIN_M, False) != DENSE_CACHED and pick(DENSE_MIN_M, False) == DENSE


def test_tuned_table_says_where_holding_wins(tuned_table_file):
    cell = "{bits: 4, group: 128, dtype: float16, n: %d, k: 4096, m: %d, config: nt2_mt2_wk4_s2_xs, us: %s"
    tuned_table_file("Test GPU", [cell % (4096, 32, "2.0, dense_cached_us: 2.5}"),
                                  cell % (4096, 64, "3.0, dense_cached_us: 2.9}"),
                                  cell % (4096, 128, "3.0, dense_cached_us: 3.1}"),
                                  cell % (8192, 128, "3.0}")])
    pick = lambda m, n=4096, held=True: select_config(m, n, 4096, 4, 128, "float16",
                                                      gpu_name="Test GPU", dense_cache=held)
    assert pick(32) != DENSE_CACHED  # measured slower there
    assert pick(33) == pick(64) == DENSE_CACHED  # measured faster in the 64 bucket
    assert pick(65) == pick(128) == pick(200) != DENSE_CACHED  # slower in the last one
    assert pick(DENSE_MIN_M) == DENSE_CACHED  # the heuristic's DENSE, held
    assert pick(64, held=False) != DENSE_CACHED
    # no timing of it in the table: the heuristic's threshold
    assert pick(DENSE_CACHED_MIN_M - 1, n=8192) != DENSE_CACHED
    assert pick(DENSE_CACHED_MIN_M, n=8192) == DENSE_CACHED

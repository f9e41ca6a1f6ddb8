import numpy as np
import pytest

from cuflute import dtypes, pack, quantize, reference
from cuflute.packing import lut_field_codes, pair_lut, random_packed

SHAPES = [(16, 256), (40, 288), (33, 512), (7, 96), (130, 1280)]


def _quantized(n, k, bits, group_size, seed=0):
    w = np.random.default_rng(seed).standard_normal((n, k))
    return quantize(w, bits=bits, group_size=group_size)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, None])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_round_trip(bits, group_size, dtype):
    for n, k in SHAPES:
        if group_size and k % group_size:
            continue
        qw = _quantized(n, k, bits, group_size, seed=n * k)
        packed = pack(qw, dtype)
        assert packed.qweight.shape == (-(-n // 16), -(-k // 256), bits, 32, 4)
        np.testing.assert_array_equal(reference.unpack_codes(packed), qw.codes,
                                      err_msg=f"{bits=} {group_size=} {n=} {k=}")
        s = reference.unpack_scales(packed)
        np.testing.assert_array_equal(s[:, : qw.scales.shape[1]],
                                      dtypes.round_to(qw.scales, dtype))
        assert np.all(s[:, qw.scales.shape[1]:] == 0), "padding groups must have zero scales"


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_land_where_the_kernel_reads_them(bits):
    """One code set to the maximum in a zero matrix shows up at exactly one field."""
    for n_, k_ in [(0, 0), (9, 17), (15, 255), (3, 130)]:
        codes = np.zeros((16, 256), dtype=np.uint8)
        codes[n_, k_] = 2**bits - 1
        qw = _quantized(16, 256, bits, 256)
        packed = pack(type(qw)(codes, qw.scales, qw.table, bits, 256))
        words = np.asarray(packed.qweight).reshape(-1)
        assert np.count_nonzero(words) == (2 if bits == 3 else 1)
        np.testing.assert_array_equal(reference.unpack_codes(packed), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pair_lut_fields_are_a_bijection(bits):
    c0, c1 = lut_field_codes(bits)
    pairs = set(zip(c0.tolist(), c1.tolist()))
    assert len(pairs) == 4**bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pair_lut_entries(bits):
    table = np.linspace(-2, 3, 2**bits)
    lut = pair_lut(table, bits, "float16")
    c0, c1 = lut_field_codes(bits)
    lo = dtypes.from_bits(lut & 0xFFFF, "float16")
    hi = dtypes.from_bits(lut >> 16, "float16")
    np.testing.assert_array_equal(lo, dtypes.round_to(table[c0], "float16"))
    np.testing.assert_array_equal(hi, dtypes.round_to(table[c1], "float16"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_reference_matches_plain_dequantize_matmul(bits, dtype):
    qw = _quantized(72, 352, bits, 32, seed=bits)
    packed = pack(qw, dtype)
    w64 = (dtypes.round_to(qw.table, dtype)[qw.codes]
           * np.repeat(dtypes.round_to(qw.scales, dtype), 32, axis=1))
    np.testing.assert_array_equal(reference.dequantize(packed), w64)
    x = dtypes.round_to(np.random.default_rng(1).standard_normal((5, 352)), dtype)
    np.testing.assert_allclose(reference.qgemm(x, packed), x @ w64.T, rtol=1e-12, atol=1e-12)
    # and rounding table and scales to the dtype is the only difference from float64
    rel = np.linalg.norm(reference.qgemm(x, packed) - x @ qw.dequantize().T) / np.linalg.norm(x @ w64.T)
    assert rel < (4e-3 if dtype == "bfloat16" else 5e-4), rel


def test_bfloat16_rounding_is_nearest_even():
    v = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 3.0e38])
    np.testing.assert_array_equal(dtypes.round_to(v, "bfloat16"),
                                  [1.0, 1.0, 1.0 + 2**-6, -2.5, 226 * 2.0**120])


def test_float16_scale_overflow_is_an_error():
    qw = quantize(np.full((2, 32), 1e6), bits=4, group_size=32)
    with pytest.raises(ValueError, match="overflows float16"):
        pack(qw, "float16")
    pack(qw, "bfloat16")


def test_odd_k_and_bad_dtype():
    with pytest.raises(ValueError, match="K must be a multiple of 8"):
        pack(quantize(np.ones((4, 36)), group_size=None))
    with pytest.raises(ValueError, match="dtype must be one of"):
        pack(quantize(np.ones((4, 32)), group_size=32), "float32")


def test_random_packed_is_valid():
    packed = random_packed(40, 500, bits=3, group_size=None, dtype="bfloat16", seed=3)
    assert packed.kernel_group == 0 and packed.n_groups == 1
    codes = reference.unpack_codes(packed)
    assert codes.shape == (40, 500) and codes.max() == 7 and codes.min() == 0
    w = reference.dequantize(packed)
    assert np.all(np.isfinite(w)) and np.abs(w).max() <= 0.03


def test_take_tiles_is_those_rows():
    qw = _quantized(70, 512, 3, 64, seed=9)
    packed = pack(qw, "bfloat16")
    part = packed.take_tiles([3, 0])
    assert part.n == 32 and part.k == 512
    np.testing.assert_array_equal(reference.unpack_codes(part),
                                  qw.codes[np.r_[48:64, 0:16]])
    np.testing.assert_array_equal(reference.dequantize(part),
                                  reference.dequantize(packed)[np.r_[48:64, 0:16]])
    with pytest.raises(ValueError, match="whole tiles below 4"):
        packed.take_tiles([4])


@pytest.mark.parametrize("group_size", [32, 256, None])
def test_packed_nbytes_counts_what_pack_makes(group_size):
    from cuflute.packing import packed_nbytes

    qw = _quantized(40, 512, 3, group_size)
    assert packed_nbytes(40, 512, 3, group_size) == pack(qw).nbytes
    assert packed_nbytes(40, 512, 3, group_size) == random_packed(40, 512, 3, group_size).nbytes

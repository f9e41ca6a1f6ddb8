import numpy as np
import pytest

from cuflute import int_table, nf_table, quantize
from cuflute.formats import validate_table

# QLoRA's published NF4 values (bitsandbytes, functional.py).
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def test_nf4_matches_qlora():
    np.testing.assert_allclose(nf_table(4), QLORA_NF4, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_tables_shape(bits):
    t = nf_table(bits)
    assert t.shape == (2**bits,)
    assert np.all(np.diff(t) > 0), t
    assert t[0] == -1.0 and t[-1] == 1.0 and 0.0 in t
    # more values on the positive side, as in QLoRA: the zero sits at index 2**(b-1) - 1
    assert t[2 ** (bits - 1) - 1] == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int_table(bits):
    t = int_table(bits)
    assert t.shape == (2**bits,) and t[0] == -1.0 and 0.0 in t
    np.testing.assert_allclose(np.diff(t), 2.0 / 2**bits)


def test_unsupported_bits():
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4\), got 5"):
        nf_table(5)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(np.ones((4, 32)), bits=8)


@pytest.mark.parametrize("values, match", [
    ([0.0, 1.0, 2.0], "needs 4 values"),
    ([0.0, 1.0, np.nan, 2.0], "finite"),
    ([0.0, 0.0, 0.0, 0.0], "all be zero"),
    ([[0.0, 1.0], [2.0, 3.0]], "one dimension"),
])
def test_user_table_validation(values, match):
    with pytest.raises(ValueError, match=match):
        validate_table(values, 2)


def test_unknown_table_name():
    with pytest.raises(ValueError, match="table must be one of"):
        quantize(np.ones((4, 32)), table="fp4")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight(bad):
    w = np.ones((4, 64))
    w[2, 17] = bad
    with pytest.raises(ValueError, match=r"non-finite value at \[2, 17\]"):
        quantize(w, group_size=32)


def test_k_not_divisible_by_group():
    with pytest.raises(ValueError, match="K = 100 is not divisible by group_size = 32"):
        quantize(np.ones((4, 100)), group_size=32)


def test_unsupported_group_size():
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize(np.ones((4, 96)), group_size=48)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, None])
def test_quantize_is_nearest_entry_with_absmax_scales(bits, group_size):
    rng = np.random.default_rng(bits * 1000 + (group_size or 0))
    w = rng.standard_normal((24, 512)).astype(np.float32)
    qw = quantize(w, bits=bits, group_size=group_size)
    g = group_size or 512
    assert qw.codes.shape == w.shape and qw.codes.max() < 2**bits
    assert qw.scales.shape == (24, 512 // g)
    grouped = np.abs(w).reshape(24, -1, g).max(axis=2)
    np.testing.assert_allclose(qw.scales, grouped, rtol=1e-6)
    # brute force: no other entry is strictly closer than the chosen one
    x = (w.reshape(24, -1, g) / qw.scales[:, :, None]).reshape(w.shape)
    dist = np.abs(x[..., None] - qw.table)
    chosen = np.take_along_axis(dist, qw.codes[..., None].astype(np.int64), axis=-1)[..., 0]
    assert np.all(chosen <= dist.min(axis=-1) + 1e-6)


def test_user_table_and_zero_group():
    table = [-3.0, -1.0, 0.5, 2.0]
    w = np.zeros((2, 64), dtype=np.float32)
    w[1] = np.linspace(-1, 1, 64)
    qw = quantize(w, bits=2, group_size=32, table=table)
    assert np.all(qw.scales[0] == 0) and np.all(qw.dequantize()[0] == 0)
    # the largest magnitude (-1 at k=0) maps onto the table's largest magnitude (-3)
    assert qw.codes[1, 0] == 0 and qw.dequantize()[1, 0] == pytest.approx(-1.0, rel=1e-6)


def test_dequantize_error_shrinks_with_bits():
    w = np.random.default_rng(0).standard_normal((64, 1024))
    errors = [np.linalg.norm(quantize(w, b, 64).dequantize() - w) / np.linalg.norm(w)
              for b in (2, 3, 4)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.12, errors

"""CPU tier of cuflute.bcq: quantizer, packer round trips and layout, reference, validation,
kernel selection (tests/test_compile.py compiles every BCQ specialization with the LUT GEMM's)."""
import numpy as np
import pytest

import cuflute.bcq as bcq
from cuflute import dtypes
from cuflute.bcq import packing, reference
from cuflute.bcq.gemm import select_spec
from cuflute.bcq.kernels import BCQSpec

GROUPS = [32, 64, 128, 256, None]


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def weight(n, k, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)) * rng.uniform(0.5, 2.0, (n, 1))


# ----------------------------------------------------------------------------- quantizer

@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("group_size", GROUPS)
def test_quantizer_shapes_determinism_and_refinement(group_size, offset):
    w = weight(24, 256, seed=1)
    errors = []
    for bits in (1, 2, 3, 4):
        bw = bcq.quantize(w, bits, group_size, offset=offset)
        again = bcq.quantize(w, bits, group_size, offset=offset)
        g = group_size or 256
        where = f"{bits=} {group_size=} {offset=}"
        assert bw.signs.shape == (bits, 24, 256) and bw.signs.dtype == np.uint8, where
        assert set(np.unique(bw.signs)) <= {0, 1}, where
        assert bw.alphas.shape == (24, 256 // g, bits) and bw.group_size == g, where
        assert (bw.offsets is None) == (not offset), where
        assert np.array_equal(bw.signs, again.signs) and np.array_equal(bw.alphas, again.alphas)
        greedy = bcq.quantize(w, bits, group_size, offset=offset, iterations=0)
        err, greedy_err = rel(bw.dequantize(), w), rel(greedy.dequantize(), w)
        assert err <= greedy_err + 1e-12, f"{where}: refined {err} > greedy {greedy_err}"
        if bits >= 3:
            assert err < 0.9 * greedy_err, f"{where}: refinement gained nothing ({err}, {greedy_err})"
        errors.append(err)
    assert errors == sorted(errors, reverse=True), f"{group_size=} {offset=}: {errors}"


def test_one_bit_without_offset_is_sign_times_mean_magnitude():
    w = weight(8, 128, seed=2)
    bw = bcq.quantize(w, 1, 64)
    groups = w.reshape(8, 2, 64)
    np.testing.assert_allclose(bw.alphas[..., 0], np.abs(groups).mean(-1), rtol=1e-6)
    np.testing.assert_array_equal(bw.signs[0], (w >= 0).astype(np.uint8))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_uniform_quantization_is_expressible_with_the_offset(bits):
    """W = s * (q - zp) with integer codes q is the binary expansion of q: from_uniform gives
    the exact BCQ weight (the paper's point that BCQ covers uniform quantization), and the
    quantizer with an offset stays within the uniform grid's own error on such a weight."""
    rng = np.random.default_rng(bits)
    n, k, g = 16, 256, 128
    q = rng.integers(0, 2**bits, (n, k))
    s = rng.uniform(0.01, 0.1, (n, k // g))
    zp = rng.uniform(0, 2**bits - 1, (n, k // g))
    w = np.repeat(s, g, axis=1) * (q - np.repeat(zp, g, axis=1))
    bw = bcq.from_uniform(q, s, zp, bits, g)
    assert bw.bits == bits and bw.offsets is not None
    assert rel(bw.dequantize(), w) < 1e-6, f"{bits=}"
    packed = bcq.pack(bw, "float16")
    assert rel(reference.dequantize(packed), w) < 1e-3, f"{bits=}"  # alphas rounded to fp16


def test_from_uniform_rejects_bad_input():
    q = np.zeros((4, 64), dtype=np.int32)
    s = np.ones((4, 2))
    with pytest.raises(ValueError, match=r"3-bit codes must be in \[0, 8\)"):
        bcq.from_uniform(q + 8, s, s, 3, 32)
    with pytest.raises(ValueError, match="scales and zero_points must be"):
        bcq.from_uniform(q, s[:, :1], s, 3, 32)
    with pytest.raises(ValueError, match="integer array"):
        bcq.from_uniform(q.astype(float), s, s, 3, 32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        bcq.from_uniform(q, s, s, 3, 48)
    with pytest.raises(ValueError, match="bits must be one of"):
        bcq.from_uniform(q, s, s, 5, 32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=0), "bits must be one of"), (dict(bits=5), "bits must be one of"),
    (dict(group_size=100), "group_size must be one of"),
    (dict(w=np.ones((4, 96)), group_size=64), "not divisible by group_size"),
    (dict(w=np.ones(64)), "must be 2-D"), (dict(w=np.ones((4, 64), dtype=int)), "floating point"),
    (dict(w=np.full((2, 64), np.inf)), "non-finite value at"), (dict(w=np.ones((0, 64))), "non-empty"),
    (dict(iterations=-1), "iterations must be >= 0"),
])
def test_quantizer_rejects_bad_input(kwargs, message):
    w = kwargs.pop("w", np.ones((4, 128)))
    args = dict(bits=3, group_size=32) | kwargs
    with pytest.raises(ValueError, match=message):
        bcq.quantize(w, **args)


# ----------------------------------------------------------------------------- packer, reference

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n, k, group_size", [(37, 96, 32), (64, 512, 128), (70, 1288, None),
                                              (33, 768, 256), (5, 1536, 64)])
def test_pack_round_trip_and_reference(n, k, group_size, bits, dtype):
    offset = (n + bits) % 2 == 0
    bw = bcq.quantize(weight(n, k, seed=n + bits), bits, group_size, offset=offset, iterations=2)
    packed = bcq.pack(bw, dtype)
    where = f"{n=} {k=} {group_size=} {bits=} {dtype} {offset=}"
    assert packed.nbytes == packing.packed_nbytes(n, k, bits, group_size), where
    np.testing.assert_array_equal(reference.unpack_signs(packed), bw.signs, err_msg=where)
    alphas, offsets = reference.unpack_alphas(packed)
    used = bw.alphas.shape[1]
    np.testing.assert_array_equal(alphas[:, :used], dtypes.round_to(bw.alphas, dtype), where)
    assert not np.any(alphas[:, used:]), where  # padding groups are zero
    expect_offsets = 0 if bw.offsets is None else dtypes.round_to(bw.offsets, dtype)
    np.testing.assert_array_equal(offsets[:, :used], np.broadcast_to(expect_offsets, (n, used)))
    # reference.dequantize (from the packed arrays) against BCQWeight.dequantize of the
    # dtype-rounded alphas, and the reference product against a plain float64 matmul
    rounded = bcq.BCQWeight(bw.signs, dtypes.round_to(bw.alphas, dtype),
                            None if bw.offsets is None else dtypes.round_to(bw.offsets, dtype),
                            bw.group_size)
    w64 = reference.dequantize(packed)
    np.testing.assert_allclose(w64, rounded.dequantize(), rtol=1e-12, atol=1e-12, err_msg=where)
    x = np.random.default_rng(3).standard_normal((3, k))
    np.testing.assert_allclose(reference.gemm(x, packed), x @ rounded.dequantize().T,
                               rtol=1e-10, atol=1e-10, err_msg=where)


def test_layout_matches_the_picture():
    """One sign set at a time lands at the bit the header picture names:
    bit e of byte j of word w of thread t = B_i[32b + t/4][512s + 128w + 32q + 8j + e]."""
    n, k, bits = 70, 1100 // 8 * 8, 3
    rng = np.random.default_rng(4)
    for _ in range(40):
        i, row, col = rng.integers(bits), rng.integers(n), rng.integers(k)
        signs = np.zeros((bits, n, k), dtype=np.uint8)
        signs[i, row, col] = 1
        q = packing.planes_to_qweight(signs)
        b, t = row // 32, 4 * (row % 32) + (col % 512) // 32 % 4
        s, w = col // 512, (col % 512) // 128
        bit = 8 * ((col % 32) // 8) + col % 8
        expected = np.zeros_like(q)
        expected[b, s, i, t, w] = np.uint32(1) << np.uint32(bit)
        np.testing.assert_array_equal(q, expected, err_msg=f"{i=} {row=} {col=}")
        np.testing.assert_array_equal(packing.qweight_to_planes(q, n, k), signs)


def test_random_packed_on_the_host_is_a_valid_weight():
    p = bcq.random_packed(100, 1000, 3, 128, "bfloat16", offset=True)
    assert p.nbytes == packing.packed_nbytes(100, 1000, 3, 128)
    w = reference.dequantize(p)
    assert w.shape == (100, 1000) and np.all(np.isfinite(w)) and np.std(w) > 0
    assert not np.any(reference.unpack_alphas(p)[0][:, 1000 // 128:])  # padding groups zero


def test_pack_and_reference_reject_bad_input():
    bw = bcq.quantize(weight(4, 64, seed=5), 2, 32)
    with pytest.raises(ValueError, match="dtype must be one of"):
        bcq.pack(bw, "float32")
    odd = bcq.BCQWeight(np.zeros((2, 4, 36), np.uint8), np.ones((4, 1, 2), np.float32), None, 36)
    with pytest.raises(ValueError, match="K must be a multiple of 8"):
        bcq.pack(odd)
    bad = bcq.BCQWeight(bw.signs * 2, bw.alphas, None, 32)
    with pytest.raises(ValueError, match="signs must be 0 or 1"):
        bcq.pack(bad)
    with pytest.raises(ValueError, match="x has K = 32"):
        reference.gemm(np.ones((1, 32)), bcq.pack(bw))


# ----------------------------------------------------------------------------- kernel choice

def test_select_spec():
    h100 = dict(sm_count=132, shared_limit=227 * 1024)
    assert select_spec(1, 4096, 3, "float16", **h100) == BCQSpec(3, "float16", 1, 32, 2)
    assert select_spec(1, 8448, 3, "float16", **h100) == BCQSpec(3, "float16", 1, 64, 2)
    assert [select_spec(m, 4096, 4, "bfloat16", **h100).m_tile for m in range(1, 9)] == \
        [1, 4, 4, 4, 8, 8, 8, 8]
    assert select_spec(8, 4096, 4, "float16", **h100).ksplit == 1  # 2 x 144 KiB do not fit
    # sm_86/89 allow 99 KiB: no 8-row tile (144 KiB), so M = 8 takes two CTA rows of 4
    sm86 = dict(sm_count=84, shared_limit=99 * 1024)
    assert select_spec(8, 4096, 4, "float16", **sm86) == BCQSpec(4, "float16", 4, 32, 1)
    assert select_spec(1, 4096, 4, "float16", **sm86) == BCQSpec(4, "float16", 1, 32, 2)


def test_spec_validation_and_shared_memory():
    with pytest.raises(ValueError, match="BCQ kernel m_tile must be one of"):
        BCQSpec(3, "float16", 3, 32, 1)
    with pytest.raises(ValueError, match="BCQ kernel bits must be one of"):
        BCQSpec(5, "float16", 1, 32, 1)
    with pytest.raises(ValueError, match="BCQ kernel ksplit must be one of"):
        BCQSpec(3, "float16", 1, 32, 4)
    # per K part: tables float [stages][m_tile][16 runs][256], double-buffered for one row of
    # x, and x uint4 [2][m_tile][64 runs]
    assert [BCQSpec(3, "float16", m, 64, 1).shared_bytes // 1024 for m in (1, 4, 8)] == \
        [34, 72, 144]
    assert BCQSpec(3, "float16", 1, 64, 2).shared_bytes // 1024 == 68
    assert BCQSpec(2, "bfloat16", 4, 32, 2).threads == 256
    assert BCQSpec(2, "bfloat16", 4, 32, 2).name_expression == \
        "cuflute::bcq::bcq_gemv<2, __nv_bfloat16, 4, 32, 2>"

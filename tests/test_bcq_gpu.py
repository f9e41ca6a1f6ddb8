"""GPU tier of cuflute.bcq: the LUT-GEMM kernel against the NumPy reference. Skipped without a GPU.

Every case draws fresh random activations (never zeros), poisons the output with NaN before the
call, and bounds ||y - ref|| / ||ref|| with ref in float64 from the same packed weight.
"""
import zlib
from functools import lru_cache

import numpy as np
import pytest

import cuflute
import cuflute.bcq as bcq
from cuflute import dtypes
from cuflute.bcq import reference
from cuflute.bcq.kernels import CTA_ROWS, K_SPLITS, M_TILES, BCQSpec
from cuflute.gemm import device_properties
from cuflute.packing import random_packed

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch") if cuflute.gpu_available() else None

REL_ERROR_BOUND = reference.REL_ERROR_BOUND
# Odd N (partial 32-row blocks and CTAs), K not a multiple of 512 (padded super-chunks), and
# 8480 rows: enough 64-row CTAs for the H100's 132 SMs, so that path runs too.
SHAPES = [(64, 512), (200, 768), (37, 96), (1000, 1280), (72, 2056), (8480, 512)]
GROUPS = [32, 64, 128, 256, None]
MS = [1, 2, 3, 5, 8]


def random_bcq(n, k, bits, group_size, offset, seed) -> bcq.BCQWeight:
    """Random signs, alphas on a halving ladder and offsets: every sign pattern appears."""
    rng = np.random.default_rng(seed)
    g = group_size or k
    alphas = rng.uniform(0.5, 1.5, (n, k // g, bits)) * 0.5 ** np.arange(bits)
    offsets = rng.uniform(-0.5, 0.5, (n, k // g)) if offset else None
    return bcq.BCQWeight(signs=rng.integers(0, 2, (bits, n, k), dtype=np.uint8),
                         alphas=alphas.astype(np.float32),
                         offsets=None if offsets is None else offsets.astype(np.float32),
                         group_size=g)


@lru_cache(maxsize=8)
def _weight(n, k, bits, group_size, offset, dtype):
    """(packed on the GPU, float64 dequantized reference weight)."""
    seed = zlib.crc32(repr((n, k, bits, group_size, offset, dtype)).encode())
    packed = bcq.pack(random_bcq(n, k, bits, group_size, offset, seed), dtype)
    return packed.to_device(0), reference.dequantize(packed)


def _random_x(m, k, dtype, seed):
    return dtypes.round_to(np.random.default_rng(seed).standard_normal((m, k)), dtype)


def _to_torch(x64, dtype):
    return torch.tensor(x64, dtype=getattr(torch, dtype), device="cuda")


def _rel_error(y, ref):
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _check(packed, w64, m, dtype, where, spec=None):
    x64 = _random_x(m, packed.k, dtype, seed=zlib.crc32(where.encode()))
    out = torch.full((m, packed.n), float("nan"), dtype=getattr(torch, dtype), device="cuda")
    y = bcq.gemm(_to_torch(x64, dtype), packed, out=out, spec=spec)
    assert y is out
    y64 = y.double().cpu().numpy()
    assert np.all(np.isfinite(y64)), f"unwritten or non-finite outputs: {where}"
    err = _rel_error(y64, x64 @ w64.T)
    assert err < REL_ERROR_BOUND[dtype], f"rel error {err:.2e}: {where}"


CASES = [(bits, g, dtype, n, k) for bits in (1, 2, 3, 4) for g in GROUPS
         for dtype in ("float16", "bfloat16") for n, k in SHAPES if not (g and k % g)]


@pytest.mark.parametrize("bits, group_size, dtype, n, k", CASES)
def test_kernel_matches_reference(bits, group_size, dtype, n, k):
    offset = (bits + n) % 2 == 1
    packed, w64 = _weight(n, k, bits, group_size, offset, dtype)
    for m in MS:
        _check(packed, w64, m, dtype,
               f"{bits=} group={group_size} {offset=} {dtype} {m=} {n=} {k=}")


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_specialization_matches_reference(bits, dtype):
    """Each (m_tile, rows, ksplit) the selector may pick, forced, including m_tile < M
    (several CTA rows over M), m_tile > M (unused table rows), and an odd number of
    super-chunks (K = 1536: 3) split over two K parts."""
    n, k = 200, 1536
    packed, w64 = _weight(n, k, bits, 128, True, dtype)
    shared_limit = device_properties(0)["sharedMemPerBlockOptin"]
    for m_tile in M_TILES:
        for rows in CTA_ROWS:
            for ksplit in K_SPLITS:
                spec = BCQSpec(bits, dtype, m_tile, rows, ksplit)
                if spec.shared_bytes > shared_limit:
                    continue
                for m in (1, 3, 8):
                    _check(packed, w64, m, dtype, f"{spec} {m=} {n=} {k=}", spec=spec)


@pytest.mark.parametrize("bits", [1, 3, 4])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_one_hot_rows_read_back_weight_columns_exactly(bits, dtype):
    """x = rows of the identity: the tables hold 0 and +-1, so y[i] is the dequantized column
    k_i summed exactly in float32 and rounded once, bit for bit."""
    n, k = 200, 768
    packed, w64 = _weight(n, k, bits, 64, True, dtype)
    cols = np.random.default_rng(bits).permutation(k)[:8]
    x64 = np.zeros((len(cols), k))
    x64[np.arange(len(cols)), cols] = 1.0
    y = bcq.gemm(_to_torch(x64, dtype), packed).double().cpu().numpy()
    np.testing.assert_array_equal(y, dtypes.round_to(w64[:, cols].T, dtype),
                                  err_msg=f"{bits=} {dtype}")


def test_quantized_weight_end_to_end():
    """quantize -> pack -> gemm against x @ W.T of the original weight, at the quantizer's error."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((300, 1024))
    bw = bcq.quantize(w, bits=4, group_size=128, offset=True)
    packed = bcq.pack(bw, "float16").to_device(0)
    x64 = _random_x(4, 1024, "float16", seed=12)
    y = bcq.gemm(_to_torch(x64, "float16"), packed).double().cpu().numpy()
    assert _rel_error(y, x64 @ reference.dequantize(packed).T) < REL_ERROR_BOUND["float16"]
    weight_error = np.linalg.norm(bw.dequantize() - w) / np.linalg.norm(w)
    assert _rel_error(y, x64 @ w.T) < 2 * weight_error, weight_error


def test_cupy_in_cupy_out():
    import cupy

    packed, w64 = _weight(1000, 1280, 3, 128, False, "float16")
    x64 = _random_x(5, 1280, "float16", seed=1)
    y = bcq.gemm(cupy.asarray(x64.astype(np.float16)), packed)
    assert isinstance(y, cupy.ndarray) and y.dtype == np.float16 and y.shape == (5, 1000)
    assert _rel_error(cupy.asnumpy(y).astype(np.float64), x64 @ w64.T) < REL_ERROR_BOUND["float16"]
    out = cupy.full((5, 1000), np.nan, dtype=np.float16)
    assert bcq.gemm(cupy.asarray(x64.astype(np.float16)), packed, out=out) is out
    assert _rel_error(cupy.asnumpy(out).astype(np.float64), x64 @ w64.T) < 1e-3


def test_batch_dims_views_and_empty():
    packed, w64 = _weight(200, 768, 3, 128, True, "float16")
    x64 = _random_x(2 * 3, 768, "float16", seed=2)
    x = _to_torch(x64, "float16")
    y = bcq.gemm(x.view(2, 3, 768), packed)
    assert y.shape == (2, 3, 200)
    ref = x64 @ w64.T
    assert _rel_error(y.reshape(6, 200).double().cpu().numpy(), ref) < 1e-3
    wide = _to_torch(_random_x(6, 1024, "float16", seed=3), "float16")
    for start in (96, 100):  # an aligned slice is read in place, a misaligned one copied
        wide[:, start:start + 768] = x
        y2 = bcq.gemm(wide[:, start:start + 768], packed).double().cpu().numpy()
        assert _rel_error(y2, ref) < 1e-3, start
    assert bcq.gemm(x[:0], packed).shape == (0, 200)


def test_runs_on_the_callers_stream_and_in_a_cuda_graph():
    packed, w64 = _weight(1000, 1280, 4, 128, False, "float16")
    x = _to_torch(_random_x(4, 1280, "float16", seed=4), "float16")
    out = torch.empty(4, 1000, dtype=torch.float16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        bcq.gemm(x, packed, out=out)  # warm-up compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            bcq.gemm(x, packed, out=out)
    torch.cuda.current_stream().wait_stream(side)
    for seed in (5, 6):
        x64 = _random_x(4, 1280, "float16", seed=seed)
        x.copy_(_to_torch(x64, "float16"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_error(out.double().cpu().numpy(), x64 @ w64.T) < 1e-3, seed


def test_errors():
    packed, _ = _weight(64, 512, 4, 128, False, "float16")
    x = _to_torch(_random_x(2, 512, "float16", seed=7), "float16")
    with pytest.raises(TypeError, match="x has dtype bfloat16, the packed weight was packed for float16"):
        bcq.gemm(x.bfloat16(), packed)
    with pytest.raises(ValueError, match="x has K = 256"):
        bcq.gemm(x[:, :256], packed)
    with pytest.raises(ValueError, match="packed weight is on the host"):
        bcq.gemm(x, packed.to_host())
    with pytest.raises(ValueError, match="M <= 8"):
        bcq.gemm(_to_torch(_random_x(9, 512, "float16", seed=8), "float16"), packed)
    with pytest.raises(ValueError, match="out must be a contiguous torch array of shape"):
        bcq.gemm(x, packed, out=torch.empty(2, 65, dtype=torch.float16, device="cuda"))
    with pytest.raises(TypeError, match="cuflute.bcq.BCQPacked"):
        bcq.gemm(x, random_packed(64, 512, 4, 128, "float16", device=0))
    with pytest.raises(ValueError, match="does not match the packed weight"):
        bcq.gemm(x, packed, spec=BCQSpec(3, "float16", 1, 32, 1))
    with pytest.raises(TypeError, match="CUDA tensor"):
        bcq.gemm(x.cpu(), packed)

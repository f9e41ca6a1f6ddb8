"""GPU tier: the kernel against the NumPy reference. Skipped without a CUDA GPU.

Every case draws fresh random activations (never zeros), poisons the output with NaN before
the call, and bounds ||y - ref|| / ||ref|| with ref in float64 from the same dequantized weight.
"""
import zlib
from functools import lru_cache

import numpy as np
import pytest

import cuflute
from cuflute import dtypes, gemm, reference
from cuflute.dispatch import DENSE
from cuflute.kernels import (CLUSTER_MIN_ARCH, TILE_CONFIGS, WARPGROUP_ARCH, WARPGROUP_CONFIGS, KernelSpec,
                             WarpgroupConfig, builds_for, device_arch, instantiated)

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch") if cuflute.gpu_available() else None

REL_ERROR_BOUND = reference.REL_ERROR_BOUND
SHAPES = [(64, 256), (200, 768), (1000, 1280), (72, 352), (24, 96), (4096, 4096)]
GROUPS = [32, 64, 128, 256, None]
MS = [1, 3, 16, 33, 128, 300]


@lru_cache(maxsize=8)
def _weight(n, k, bits, group_size, dtype):
    """(packed on the GPU, float64 dequantized reference weight) for a fresh random weight."""
    rng = np.random.default_rng(zlib.crc32(repr((n, k, bits, group_size, dtype)).encode()))
    w = rng.standard_normal((n, k)) * rng.uniform(0.5, 2.0, (n, 1))
    packed = cuflute.pack(cuflute.quantize(w, bits, group_size), dtype)
    return packed.to_device(0), reference.dequantize(packed)


def _random_x(m, k, dtype, seed):
    x = np.random.default_rng(seed).standard_normal((m, k))
    return dtypes.round_to(x, dtype)


def _to_torch(x64, dtype):
    return torch.tensor(x64, dtype=getattr(torch, dtype), device="cuda")


def _has_clusters():
    return device_arch(gemm.device_properties(0)) >= CLUSTER_MIN_ARCH


def _skip_unless_built_here(config, bits, group_size, dtype):
    """Skip a config this device cannot run: clusters before sm_90, wgmma but on sm_90, or more
    shared memory than a CTA has."""
    spec = KernelSpec(bits, group_size or 0, dtype, config)
    if not builds_for(spec, device_arch(gemm.device_properties(0))):
        pytest.skip(f"{config} is not built for this device ({bits}-bit, group {group_size})")


def _rel_error(y, ref):
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _eager_and_graphed(calls):
    """``calls`` and the replay of a CUDA graph of them, captured on a side stream after one
    eager run there (which compiles the kernels outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        calls()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            calls()
    torch.cuda.current_stream().wait_stream(side)
    return calls, graph.replay


CASES = [(bits, g, dtype, n, k) for bits in (2, 3, 4) for g in GROUPS
         for dtype in ("float16", "bfloat16") for n, k in SHAPES if not (g and k % g)]


@pytest.mark.parametrize("bits, group_size, dtype, n, k", CASES)
def test_kernel_matches_reference(bits, group_size, dtype, n, k):
    packed, w64 = _weight(n, k, bits, group_size, dtype)
    for m in MS:
        x64 = _random_x(m, k, dtype, seed=m * 7919 + n)
        out = torch.full((m, n), float("nan"), dtype=getattr(torch, dtype), device="cuda")
        y = cuflute.qgemm(_to_torch(x64, dtype), packed, out=out)
        assert y is out
        y64 = y.double().cpu().numpy()
        where = f"{bits=} group={group_size} {dtype} {m=} {n=} {k=}"
        assert np.all(np.isfinite(y64)), f"unwritten or non-finite outputs: {where}"
        err = _rel_error(y64, x64 @ w64.T)
        assert err < REL_ERROR_BOUND[dtype], f"rel error {err:.2e}: {where}"


def _assert_forced_call_matches(packed, w64, x64, dtype, config, where):
    """qgemm with ``config`` forced into a NaN-poisoned output: every output written and within
    the dtype's bound of x @ W'^T."""
    out = torch.full((len(x64), packed.n), float("nan"), dtype=getattr(torch, dtype), device="cuda")
    y64 = cuflute.qgemm(_to_torch(x64, dtype), packed, out=out, config=config).double().cpu().numpy()
    assert np.all(np.isfinite(y64)), f"unwritten or non-finite outputs: {where}"
    err = _rel_error(y64, x64 @ w64.T)
    assert err < REL_ERROR_BOUND[dtype], f"rel error {err:.2e}: {where}"


CONFIG_CASES = [(c, bits, g) for c in TILE_CONFIGS + WARPGROUP_CONFIGS + (DENSE,)
                for bits, g in [(3, 32), (4, None), (2, 128), (4, 64)]
                if c == DENSE or instantiated(bits, g or 0, c)]


@pytest.mark.parametrize("config, bits, group_size", CONFIG_CASES, ids=str)
@pytest.mark.parametrize("n, k", [(24, 256), (1000, 1280), (200, 8192)])
def test_every_tile_config_matches_reference(config, bits, group_size, n, k):
    """Each config forced (the dispatcher only picks some), with fewer chunks than warps
    (K = 256), a ragged last tile (N = 1000) and long rows (K = 8192); a config of one row of x
    refuses more."""
    if config != DENSE:
        _skip_unless_built_here(config, bits, group_size, "float16")
    packed, w64 = _weight(n, k, bits, group_size, "float16")
    for m in (1, 9, 17, 40):
        x64 = _random_x(m, k, "float16", seed=zlib.crc32(repr((m, n, str(config))).encode()))
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        if config != DENSE and not config.takes(m):
            with pytest.raises(ValueError, match=f"{config} takes at most 1 rows of x, got M = {m}"):
                cuflute.qgemm(_to_torch(x64, "float16"), packed, out=out, config=config)
            continue
        _assert_forced_call_matches(packed, w64, x64, "float16", config,
                                    f"{config} {bits=} group={group_size} {m=} {n=} {k=}")


MANY_TILE_CASES = [(c, bits, g) for c in TILE_CONFIGS + WARPGROUP_CONFIGS
                   if isinstance(c, WarpgroupConfig) or c.mt * c.nt >= 8
                   for bits, g in [(4, 128), (3, 64), (2, None)] if instantiated(bits, g or 0, c)]


@pytest.mark.parametrize("config, bits, group_size", MANY_TILE_CASES, ids=str)
def test_many_tile_configs_in_bfloat16(config, bits, group_size):
    """The configs of eight tiles a warp or more, at the register limit, and the warpgroup
    configs, in bfloat16: those that scale the looked-up weight in the activations' dtype
    (bfloat16's products differ most from float32's) and those that widen a group's bfloat16
    scales to scale its sums, over part of an m block, one, and two."""
    _skip_unless_built_here(config, bits, group_size, "bfloat16")
    n, k = 1000, 2304
    packed, w64 = _weight(n, k, bits, group_size, "bfloat16")
    for m in (config.block_m // 2 + 1, config.block_m, config.block_m + 3):
        x64 = _random_x(m, k, "bfloat16", seed=zlib.crc32(repr((m, str(config))).encode()))
        _assert_forced_call_matches(packed, w64, x64, "bfloat16", config, f"{config} {bits=} group={group_size} {m=}")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_one_hot_rows_read_back_weight_columns_exactly(bits, dtype):
    """x = rows of the identity: y[i] must be dequantized column k_i rounded once, bit for bit
    (the fp32 product of two half values is exact, so only the output's rounding remains)."""
    n, k = 200, 768
    packed, w64 = _weight(n, k, bits, 64, dtype)
    cols = np.random.default_rng(bits).permutation(k)[:37]
    x64 = np.zeros((len(cols), k))
    x64[np.arange(len(cols)), cols] = 1.0
    y = cuflute.qgemm(_to_torch(x64, dtype), packed).double().cpu().numpy()
    np.testing.assert_array_equal(y, dtypes.round_to(w64[:, cols].T, dtype), err_msg=f"{bits=} {dtype}")


@pytest.mark.parametrize("config", [None, DENSE])
def test_cupy_in_cupy_out(config):
    import cupy

    packed, w64 = _weight(1000, 1280, 4, 128, "float16")
    x64 = _random_x(5, 1280, "float16", seed=1)
    y = cuflute.qgemm(cupy.asarray(x64.astype(np.float16)), packed, config=config)
    assert isinstance(y, cupy.ndarray) and y.dtype == np.float16 and y.shape == (5, 1000)
    assert _rel_error(cupy.asnumpy(y).astype(np.float64), x64 @ w64.T) < REL_ERROR_BOUND["float16"]


@pytest.mark.parametrize("kind", ["torch", "cupy"])
def test_dense_path_in_slabs(kind, monkeypatch):
    """The dense path with its temporary cut to 48 rows: 200 rows go in slabs of 48, 48, 48,
    48 and 8 (the last one ragged), each written into its columns of out."""
    import cupy

    from cuflute import gemm

    monkeypatch.setattr(gemm, "DENSE_SLAB_BYTES", 2 * 768 * 48 + 100)
    packed, w64 = _weight(200, 768, 3, 128, "float16")
    x64 = _random_x(40, 768, "float16", seed=77)
    if kind == "torch":
        x, out = _to_torch(x64, "float16"), torch.full((40, 200), float("nan"), dtype=torch.float16, device="cuda")
    else:
        x, out = cupy.asarray(x64.astype(np.float16)), cupy.full((40, 200), np.nan, dtype=np.float16)
    y = cuflute.qgemm(x, packed, out=out, config=DENSE)
    y64 = y.double().cpu().numpy() if kind == "torch" else cupy.asnumpy(y).astype(np.float64)
    assert np.all(np.isfinite(y64))
    assert _rel_error(y64, x64 @ w64.T) < REL_ERROR_BOUND["float16"]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dequantize_is_the_reference_rounded(bits, group_size, dtype):
    """W' written out (the dense path's first half) is the exact T[q] * S rounded once, at
    every element, padding rows and columns cropped (N = 200, K = 768 are not whole tiles)."""
    import cupy

    packed, w64 = _weight(200, 768, bits, group_size, dtype)
    w = cuflute.dequantize(packed)
    assert isinstance(w, cupy.ndarray) and w.shape == (200, 768)
    got = dtypes.from_bits(cupy.asnumpy(w.view(cupy.uint16)), dtype)
    np.testing.assert_array_equal(got, dtypes.round_to(w64, dtype), err_msg=f"{bits=} {group_size=} {dtype}")


def test_batch_dims_views_and_empty():
    packed, w64 = _weight(200, 768, 3, 128, "float16")
    x64 = _random_x(2 * 3 * 5, 768, "float16", seed=2)
    x = _to_torch(x64, "float16")
    y = cuflute.qgemm(x.view(2, 3, 5, 768), packed)
    assert y.shape == (2, 3, 5, 200)
    ref = x64 @ w64.T
    assert _rel_error(y.reshape(30, 200).double().cpu().numpy(), ref) < 1e-3
    # an aligned column slice is read in place, a misaligned one and a transposed view are copied
    wide = _to_torch(_random_x(30, 1024, "float16", seed=3), "float16")
    for start in (96, 100):
        wide[:, start:start + 768] = x
        y2 = cuflute.qgemm(wide[:, start:start + 768], packed).double().cpu().numpy()
        assert _rel_error(y2, ref) < 1e-3, start
    y3 = cuflute.qgemm(x.t().contiguous().t(), packed).double().cpu().numpy()
    assert _rel_error(y3, ref) < 1e-3
    empty = cuflute.qgemm(x[:0], packed)
    assert empty.shape == (0, 200)


def test_runs_on_the_callers_stream_and_in_a_cuda_graph():
    packed, w64 = _weight(1000, 1280, 4, 128, "float16")
    x = _to_torch(_random_x(4, 1280, "float16", seed=4), "float16")
    out = torch.empty(4, 1000, dtype=torch.float16, device="cuda")
    _, replay = _eager_and_graphed(lambda: cuflute.qgemm(x, packed, out=out))
    for seed in (5, 6):
        x64 = _random_x(4, 1280, "float16", seed=seed)
        x.copy_(_to_torch(x64, "float16"))
        out.fill_(float("nan"))
        replay()
        torch.cuda.synchronize()
        assert _rel_error(out.double().cpu().numpy(), x64 @ w64.T) < 1e-3


# A config whose CTAs split K in thread-block clusters (sm_90), for the launch tests.
CLUSTER_CONFIG = next((c for c in TILE_CONFIGS if c.needs_clusters and c.takes(16)), None)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("kind", ["tuned", "cluster", "warpgroup", "stream-k"])
def test_back_to_back_launches_wait_for_the_one_before(m, kind):
    """On sm_90 lut_gemm goes out as a programmatic dependent launch: it starts while the kernel
    before it runs and must neither read x nor write y before that one is done. Two calls back
    to back, the second reading what the first writes and writing what it read, eager and
    replayed from a CUDA graph, on a weight of 512 CTAs at M = 1; with the tuned config, with a
    cluster config (whose CTAs also read each other's shared memory), with a warpgroup config
    (two launches a call: x's image, then lut_wgmma) and with a Stream-K one (whose arrival
    counts the next call's x image zeroes, and whose 256 units of work span strips and CTAs)."""
    major = gemm.device_properties(0)["major"]
    if kind == "cluster" and (not _has_clusters() or CLUSTER_CONFIG is None):
        pytest.skip("thread-block clusters need compute capability 9.0 and a cluster config")
    if kind in ("warpgroup", "stream-k") and device_arch(gemm.device_properties(0)) != WARPGROUP_ARCH:
        pytest.skip("the warpgroup kernel runs on compute capability 9.0 alone")
    config = {"tuned": None, "cluster": CLUSTER_CONFIG, "warpgroup": WarpgroupConfig(bm=64),
              "stream-k": WarpgroupConfig(bm=64, stream_k=True)}[kind]
    packed, w64 = _weight(4096, 4096, 4, 128, "float16")
    assert gemm.launch_plan(packed, m, config).programmatic == (
        major >= 9 and gemm.PROGRAMMATIC_LAUNCH)
    a = torch.empty(m, 4096, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)

    def both():
        cuflute.qgemm(a, packed, out=b, config=config)
        cuflute.qgemm(b, packed, out=a, config=config)

    for run in _eager_and_graphed(both):
        for seed in (11, 12, 13):
            x64 = _random_x(m, 4096, "float16", seed=seed)
            a.copy_(_to_torch(x64, "float16"))
            b.fill_(float("nan"))
            run()
            torch.cuda.synchronize()
            first, second = b.double().cpu().numpy(), a.double().cpu().numpy()
            assert _rel_error(first, x64 @ w64.T) < 1e-3, (run, seed)
            assert _rel_error(second, first @ w64.T) < 1e-3, (run, seed)


STREAM_K_CONFIGS = [c for c in WARPGROUP_CONFIGS if c.stream_k]


@pytest.mark.parametrize("config", STREAM_K_CONFIGS, ids=str)
@pytest.mark.parametrize("n, k", [(8192, 8192), (4000, 2816), (520, 12288)])
def test_stream_k_sums_strips_shared_by_ctas(config, n, k):
    """Stream-K splits each M block's (strip, chunk) units evenly over a wave of CTAs: 1024
    units (a CTA's range spans strips, each strip 4 or 5 CTAs), 176 units with a ragged last
    strip (a CTA of one or two units), 3 strips of 48 chunks with a ragged last tile (a strip
    summed from 14 to 45 CTAs); one M block and three. Two calls a shape with fresh x into
    poisoned outputs: the arrival counts start from zero in each."""
    _skip_unless_built_here(config, 4, 128, "float16")
    packed, w64 = _weight(n, k, 4, 128, "float16")
    for m in (config.block_m, 2 * config.block_m + 5):
        plan = gemm.launch_plan(packed, m, config)
        assert plan.grid[0] == -(-m // config.block_m) and plan.stream_k_scratch[1] == plan.grid[0] * -(-n // 256) * 16
        for seed in (1, 2):
            _assert_forced_call_matches(packed, w64, _random_x(m, k, "float16", seed=seed), "float16", config,
                                        f"{config} {m=} {n=} {k=} {seed=}")


def test_a_weight_rewritten_just_before_a_call_is_read_as_rewritten():
    """lut_gemm reads the weight (its first chunks, the pair LUT) before griddepcontrol.wait, so
    that on sm_90 it overlaps the kernel ahead of it. A weight that a kernel rewrites right before
    the call, on the same stream, must still be read as rewritten: four calls on one set of
    buffers, each after an elementwise kernel wrote another weight into them, eager and replayed
    from a CUDA graph."""
    n = k = 4096
    weights = []
    for seed in (1, 2):
        w = np.random.default_rng(seed).standard_normal((n, k))
        packed = cuflute.pack(cuflute.quantize(w, 4, 128), "float16")
        weights.append((packed.to_device(0), reference.dequantize(packed)))
    live = weights[0][0].to_host().to_device(0)  # buffers of its own
    fields = ("qweight", "scales", "pair_lut")
    signed = {4: torch.int32, 2: torch.int16}

    def as_signed(array):
        tensor = torch.from_dlpack(array)
        return tensor.view(signed[tensor.element_size()])

    buffers = [as_signed(getattr(live, f)) for f in fields]
    sources = [[as_signed(getattr(p, f)) for f in fields] for p, _ in weights]
    order = (1, 0, 1, 0)
    x = torch.empty(1, k, dtype=torch.float16, device="cuda")
    outs = [torch.empty(1, n, dtype=torch.float16, device="cuda") for _ in order]

    def calls():
        for out, j in zip(outs, order):
            for dst, src in zip(buffers, sources[j]):
                torch.add(src, 0, out=dst)  # a kernel, not a copy-engine memcpy
            cuflute.qgemm(x, live, out=out)

    for run in _eager_and_graphed(calls):
        for seed in (21, 22):
            x64 = _random_x(1, k, "float16", seed=seed)
            x.copy_(_to_torch(x64, "float16"))
            for out in outs:
                out.fill_(float("nan"))
            run()
            torch.cuda.synchronize()
            for out, j in zip(outs, order):
                err = _rel_error(out.double().cpu().numpy(), x64 @ weights[j][1].T)
                assert err < 1e-3, (run, seed, j)


def test_errors():
    packed, _ = _weight(64, 256, 4, 128, "float16")
    x = _to_torch(_random_x(2, 256, "float16", seed=7), "float16")
    with pytest.raises(TypeError, match="x has dtype bfloat16, the packed weight was packed for float16"):
        cuflute.qgemm(x.bfloat16(), packed)
    with pytest.raises(ValueError, match="x has K = 128"):
        cuflute.qgemm(x[:, :128], packed)
    with pytest.raises(ValueError, match="packed weight is on the host"):
        cuflute.qgemm(x, packed.to_host())
    with pytest.raises(ValueError, match="out must be a contiguous torch array of shape"):
        cuflute.qgemm(x, packed, out=torch.empty(2, 65, dtype=torch.float16, device="cuda"))


def test_misaligned_and_unflattenable_inputs_are_copied():
    """A contiguous x starting 8 bytes past an aligned address, and leading dims that do not
    flatten into one stride, are read through fresh copies, for torch and CuPy inputs alike."""
    import cupy

    packed, w64 = _weight(200, 768, 4, 64, "float16")
    x64 = _random_x(6, 768, "float16", seed=8)
    ref = x64 @ w64.T
    flat = _to_torch(np.concatenate([np.ones(4), x64.ravel()]), "float16")
    misaligned = flat[4:].view(6, 768)
    assert misaligned.data_ptr() % 16 == 8
    big = _to_torch(np.concatenate([x64.reshape(2, 3, 768), np.ones((2, 1, 768))], axis=1), "float16")
    unflattenable = big[:, :3]
    for name, x in (("misaligned", misaligned), ("unflattenable", unflattenable)):
        for kind in ("torch", "cupy"):
            out = torch.full((*x.shape[:-1], 200), float("nan"), dtype=torch.float16, device="cuda")
            if kind == "torch":
                cuflute.qgemm(x, packed, out=out)
            else:
                cuflute.qgemm(cupy.asarray(x), packed, out=cupy.asarray(out))
            y = out.reshape(6, 200).double().cpu().numpy()
            assert _rel_error(y, ref) < REL_ERROR_BOUND["float16"], f"{name} {kind}"


def test_cached_launches_follow_the_weight_object():
    """Launch plans are cached per packed weight: weights of one shape called in turn, and a
    weight freed and replaced by another (its id possibly reused), each give their own product."""
    x64 = _random_x(3, 256, "float16", seed=9)
    x = _to_torch(x64, "float16")

    def check(weight, where):
        packed, ref = weight
        out = torch.full((3, 64), float("nan"), dtype=torch.float16, device="cuda")
        cuflute.qgemm(x, packed, out=out)
        err = _rel_error(out.double().cpu().numpy(), ref)
        assert err < REL_ERROR_BOUND["float16"], f"{where}: rel error {err:.2e}"

    weights = []
    for trial in range(4):
        w = np.random.default_rng(100 + trial).standard_normal((64, 256))
        host = cuflute.pack(cuflute.quantize(w, 4, 128), "float16")
        weights.append((host.to_device(0), x64 @ reference.dequantize(host).T))
        check(weights[-1], f"weight {trial} new")
        if trial == 1:
            del weights[0]  # its plan stays cached, its id free for the next weight
    for i in (0, 1, 2, 1, 0):
        check(weights[i], f"weight {i} of {len(weights)} in turn")


def test_first_launch_from_a_new_thread():
    """A thread whose first CUDA work is the launch (outputs made by the main thread) gets the
    device's context made current for it, for torch and CuPy inputs."""
    import threading

    import cupy

    packed, w64 = _weight(64, 256, 4, 128, "float16")
    x64 = _random_x(3, 256, "float16", seed=10)
    x = _to_torch(x64, "float16")
    outs = {kind: torch.full((3, 64), float("nan"), dtype=torch.float16, device="cuda")
            for kind in ("torch", "cupy")}
    x_cupy, out_cupy = cupy.asarray(x), cupy.asarray(outs["cupy"])
    torch.cuda.synchronize()
    errors = []

    def work():
        try:
            cuflute.qgemm(x, packed, out=outs["torch"])
            cuflute.qgemm(x_cupy, packed, out=out_cupy)
        except Exception as error:  # re-raised by the test below
            errors.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
    torch.cuda.synchronize()
    for kind, out in outs.items():
        err = _rel_error(out.double().cpu().numpy(), x64 @ w64.T)
        assert err < REL_ERROR_BOUND["float16"], f"{kind}: {err:.2e}"


@pytest.fixture
def held_dense():
    """cuflute.dense_cache with room for 16 MiB; emptied and switched off afterwards."""
    from cuflute import dense_cache

    dense_cache.set_limit(16 << 20)
    yield dense_cache
    dense_cache.set_limit(0)
    dense_cache.clear()


def _held_case(m, seed):
    """A fresh weight of a shape no tuned table holds (the heuristic holds W' from
    DENSE_CACHED_MIN_M rows), x and a NaN-poisoned out."""
    packed, w64 = _weight.__wrapped__(1000, 1280, 4, 128, "float16")
    x64 = _random_x(m, 1280, "float16", seed=seed)
    out = torch.full((m, 1000), float("nan"), dtype=torch.float16, device="cuda")
    return packed, w64, x64, out


def test_held_dense_weight_serves_both_frameworks_and_goes_with_the_weight(held_dense):
    import gc

    import cupy

    from cuflute.dispatch import DENSE_CACHED_MIN_M

    packed, w64, x64, out = _held_case(DENSE_CACHED_MIN_M, seed=21)
    assert gemm.launch_plan(packed, DENSE_CACHED_MIN_M, None).held
    assert not gemm.launch_plan(packed, DENSE_CACHED_MIN_M - 1, None).held
    cuflute.qgemm(_to_torch(x64, "float16"), packed, out=out)  # writes W', then cuBLAS
    assert held_dense.held_bytes() == 2 * 1000 * 1280
    held = held_dense.get(packed, "torch")
    assert held is not None and held.shape == (1000, 1280)
    assert _rel_error(held.double().cpu().numpy(), w64) < REL_ERROR_BOUND["float16"]
    for seed in (22, 23):  # reads the held W' from torch and from CuPy
        x64 = _random_x(DENSE_CACHED_MIN_M, 1280, "float16", seed=seed)
        out.fill_(float("nan"))
        y = cuflute.qgemm(_to_torch(x64, "float16"), packed, out=out)
        y_cupy = cuflute.qgemm(cupy.asarray(x64.astype(np.float16)), packed)
        for y64 in (y.double().cpu().numpy(), cupy.asnumpy(y_cupy).astype(np.float64)):
            assert np.all(np.isfinite(y64))
            assert _rel_error(y64, x64 @ w64.T) < REL_ERROR_BOUND["float16"]
    assert held_dense.held_bytes() == 2 * 1000 * 1280
    del packed, held, y
    gc.collect()
    torch.cuda.synchronize()
    assert held_dense.held_bytes() == 0


def test_a_weight_past_the_limit_keeps_its_tile_config(held_dense):
    held_dense.set_limit(2 * 1000 * 1280 - 1)
    packed, w64, x64, out = _held_case(128, seed=24)
    cuflute.qgemm(_to_torch(x64, "float16"), packed, out=out)
    assert held_dense.held_bytes() == 0 and held_dense.get(packed, "torch") is None
    assert _rel_error(out.double().cpu().numpy(), x64 @ w64.T) < REL_ERROR_BOUND["float16"]


def test_nothing_is_held_while_a_graph_is_captured(held_dense):
    """A capture that finds no W' held records the tile config's launch, and the graph replays
    it with fresh inputs."""
    packed, w64, x64, out = _held_case(128, seed=25)
    x = _to_torch(x64, "float16")
    held_dense.set_limit(1)  # the plan and its kernels made outside the capture, nothing held
    cuflute.qgemm(x, packed, out=out)
    held_dense.set_limit(16 << 20)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        cuflute.qgemm(x, packed, out=out)
    torch.cuda.current_stream().wait_stream(side)
    assert held_dense.held_bytes() == 0
    x64 = _random_x(128, 1280, "float16", seed=26)
    x.copy_(_to_torch(x64, "float16"))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert _rel_error(out.double().cpu().numpy(), x64 @ w64.T) < REL_ERROR_BOUND["float16"]

"""``qgemm``: the launch path. No host synchronization, no copies and no allocation through
CuPy's or torch's pool beyond the output (pass ``out=`` to avoid even that) and, for a warpgroup
config, x's image, so it can be graph-captured."""
from __future__ import annotations

import ctypes
import os
import threading
import weakref
from dataclasses import dataclass, replace
from functools import lru_cache

from . import dense_cache, interop
from .dispatch import DENSE, DENSE_CACHED, parse_config, select_config
from .kernels import (CLUSTER_MIN_ARCH, WARPGROUP_ARCH, DequantSpec, KernelSpec, TileConfig,
                      WarpgroupConfig, XImageSpec, builds_for, device_arch, get_kernel)
from .packing import TILE_N, PackedWeight

_MAX_GRID_Y = 65535
# lut_gemm goes out as a programmatic dependent launch on sm_90 and later: its CTAs start while
# the kernel before it in the stream finishes, read the weight's first chunks, and wait for that
# one's writes before they read x (docs/PERF_NOTES.md, v17 and v20; the rule this sets is in
# cuda_src/lut_gemm.cuh's launch_dependent_grids). CUFLUTE_PDL=0, read at import, launches it
# plainly.
PROGRAMMATIC_LAUNCH = os.environ.get("CUFLUTE_PDL", "1") != "0"


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        return False


@lru_cache(maxsize=None)
def device_properties(device: int) -> dict:
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(device)


def device_name(device: int) -> str:
    name = device_properties(device)["name"]
    return name.decode() if isinstance(name, bytes) else name


def check_operands(mat: interop.DeviceMatrix, packed) -> None:
    """x against a packed weight (of either kernel family): on its device, its dtype and K."""
    if packed.device is None:
        raise ValueError("the packed weight is on the host; call packed.to_device() first")
    if mat.dtype != packed.dtype:
        raise TypeError(f"x has dtype {mat.dtype}, the packed weight was packed for {packed.dtype}")
    if mat.k != packed.k:
        raise ValueError(f"x has K = {mat.k} (last dim), the packed weight has K = {packed.k}")
    if mat.device != packed.device:
        raise ValueError(f"x is on cuda:{mat.device}, the packed weight on cuda:{packed.device}")


def qgemm(x, packed: PackedWeight, out=None, config: TileConfig | str | None = None, *,
          use_dense_cache: bool = True):
    """``x [..., K] @ W'^T -> [..., N]`` for a packed weight on x's device.

    x is a CUDA torch tensor (returns a torch tensor) or a CuPy array (returns a CuPy array) of
    the packed weight's dtype. The kernel runs on the caller's current stream. ``config``
    forces a tile config, or ``"dense"`` (the tuner's use); by default the tuned table or the
    heuristic picks. Dense, at large M: W' is dequantized into a temporary [N, K] array and
    multiplied by torch's or CuPy's matmul (cuBLAS), on the same stream. Where
    ``cuflute.dense_cache`` has a limit set, the default pick may instead hold W' for the
    weight's lifetime and multiply by it alone (``use_dense_cache=False``: not in this call).
    """
    mat = interop.as_device_matrix(x)
    check_operands(mat, packed)
    out, out_ptr = interop.output(mat, packed.n, out)
    if mat.m == 0 or packed.n == 0:
        return out
    plan = launch_plan(packed, mat.m, config, use_dense_cache)
    stream = interop.stream_ptr(mat)
    if plan.held:
        w = _held_dense(mat, packed, plan, stream)
        if w is not None:
            interop.matmul_transposed(mat, w, out)
            return out
        plan = plan.fallback
    if plan.dense:
        _dense_gemm(mat, packed, plan, out, stream)
        return out
    x_args, scratch_args = (mat.ptr, mat.row_stride), ()
    if plan.x_image is not None:
        # held until lut_wgmma, which reads it, is on the stream: freed before that, its memory
        # could go to another allocation on the stream whose writes land ahead of the read
        held, image, partials, arrivals = _write_x_image(mat, packed, plan, stream)
        x_args, scratch_args = (image,), (partials, arrivals)
    launch(plan.function, plan.grid, plan.threads, plan.shared_bytes, stream,
           mat.device, (*x_args, *plan.weights, out_ptr, *plan.sizes, *scratch_args), plan.programmatic)
    return out


def _write_x_image(mat: interop.DeviceMatrix, packed: PackedWeight, plan: "LaunchPlan", stream: int):
    """A warpgroup config's x, as the shared-memory images of its chunks, written on the stream,
    and a Stream-K launch's scratch (its arrival counts zeroed by the same kernel), all in one
    new array of x's framework (freed in stream order once the caller drops it):

        [image: 2-byte elements][partials: float4s][arrivals: u32s]

    Returns the array and the three addresses (partials and arrivals unused without Stream-K)."""
    function, spec = plan.x_image
    image_elements = spec.image_elements(mat.m, packed.k_chunks)
    partial_float4s, n_arrivals = plan.stream_k_scratch
    held = interop.empty(mat, (image_elements + 8 * partial_float4s + 2 * n_arrivals,))
    image = interop.address(mat, held)
    partials = image + 2 * image_elements  # a multiple of 16 bytes: whole chunks of x
    arrivals = partials + 16 * partial_float4s
    launch(function, spec.grid(mat.m, packed.k_chunks), spec.threads, 0, stream, mat.device,
           (mat.ptr, mat.row_stride, image, mat.m, packed.k, packed.k_chunks, arrivals, n_arrivals),
           plan.programmatic)
    return held, image, partials, arrivals


# The dense path dequantizes and multiplies W' in slabs of whole tiles of at most this many
# bytes, so that its temporary stays bounded (57344 x 8192 in fp16 would be 940 MB at once).
DENSE_SLAB_BYTES = 256 << 20


def _dense_gemm(mat: interop.DeviceMatrix, packed: PackedWeight, plan: "LaunchPlan", out,
                stream: int) -> None:
    """out = x @ W'^T, slab by slab of W' rows: lut_dequant into a temporary, then cuBLAS."""
    rows = min(packed.n, max(TILE_N, DENSE_SLAB_BYTES // (2 * packed.k) // TILE_N * TILE_N))
    w = interop.empty(mat, (rows, packed.k))
    for n0 in range(0, packed.n, rows):
        n = min(rows, packed.n - n0)
        _dequantize_rows(plan, packed, n0, n, interop.address(mat, w), stream)
        interop.matmul_transposed(mat, w[:n], out, n0)


def _held_dense(mat: interop.DeviceMatrix, packed: PackedWeight, plan: "LaunchPlan", stream: int):
    """packed's W' held by dense_cache, written there first if the limit has room for it and
    the stream is not being captured; None otherwise (the call takes plan.fallback)."""
    w = dense_cache.get(packed, mat.kind)
    if w is None and dense_cache.admits(packed) and not interop.capturing(mat):
        w = interop.empty(mat, (packed.n, packed.k))
        _dequantize_rows(plan, packed, 0, packed.n, interop.address(mat, w), stream)
        dense_cache.put(packed, mat.kind, w)
    return w


def _dequant_grid(n: int, k_chunks: int) -> tuple[int, int, int]:
    """lut_dequant's CTAs for n rows: one (16-row tile, chunk) unit per warp at a time."""
    units = -(-n // TILE_N) * k_chunks
    return (-(-units // (DequantSpec.WARPS * DequantSpec.UNITS_PER_WARP)), 1, 1)


def _dequantize_rows(plan: "LaunchPlan", packed: PackedWeight, n0: int, n: int, w_ptr: int,
                     stream: int) -> None:
    """W' rows [n0, n0 + n) (n0 a multiple of 16) into the row-major [n, K] array at w_ptr."""
    qweight, scales, pair_lut = plan.weights
    tile0 = n0 // TILE_N
    tile_bytes = (packed.qweight.nbytes // packed.n_tiles, packed.scales.nbytes // packed.n_tiles)
    launch(plan.function, _dequant_grid(n, packed.k_chunks), plan.threads, plan.shared_bytes,
           stream, packed.device, (qweight + tile0 * tile_bytes[0], scales + tile0 * tile_bytes[1],
                                   pair_lut, w_ptr, n, packed.k, packed.k_chunks, packed.n_groups))


def dequantize(packed: PackedWeight):
    """W' [N, K] = T[Q] * S as a new CuPy array on the packed weight's device: each element the
    exact product rounded once to the packed dtype (reference.dequantize, rounded). CuPy has no
    bfloat16: bfloat16 comes back as the uint16 bit patterns (in torch,
    ``torch.from_dlpack(w).view(torch.bfloat16)``)."""
    import cupy

    if packed.device is None:
        raise ValueError("the packed weight is on the host; call packed.to_device() first")
    with cupy.cuda.Device(packed.device):
        w = cupy.empty((packed.n, packed.k), dtype="float16" if packed.dtype == "float16" else "uint16")
        if w.size:
            _dequantize_rows(launch_plan(packed, 1, DENSE), packed, 0, packed.n, w.data.ptr,
                             cupy.cuda.get_current_stream().ptr)
    return w


@dataclass(frozen=True)
class LaunchPlan:
    """What a launch of one packed weight at one M needs beyond x, out and the stream."""

    function: object  # cupy.cuda.Function; held so that its module stays loaded
    grid: tuple[int, int, int]
    threads: int
    shared_bytes: int
    weights: tuple[int, int, int]  # addresses of qweight, scales, pair_lut
    sizes: tuple[int, ...]  # M, N, K, k_chunks, n_groups
    # function is lut_dequant's, not lut_gemm's, and grid covers all of W' (_dequantize_rows
    # makes the grid of each slab)
    dense: bool
    # launched as a programmatic dependent launch (lut_gemm on compute capability 9.0 and later)
    programmatic: bool = False
    # dispatch.DENSE_CACHED: cuBLAS over the W' that dense_cache holds (function writes it the
    # first time), else the plan of the pick without the cache, fallback
    held: bool = False
    fallback: "LaunchPlan | None" = None
    # a warpgroup config: the kernel that writes x's image, which function then reads, and its spec
    x_image: "tuple[object, XImageSpec] | None" = None
    # a Stream-K warpgroup config's scratch: float4s of partial sums (two slots a CTA), arrival
    # counts (one a 16-row tile of each M block)
    stream_k_scratch: tuple[int, int] = (0, 0)


# (id(packed), M, config, dense cache on) -> (weak reference to packed, LaunchPlan). A
# PackedWeight is frozen, so while the reference still points at the very object, everything the
# plan was made from (its arrays, shapes, dtype and device) is unchanged; a dead or reused id
# makes a new plan.
_PLANS: dict[tuple, tuple[weakref.ref, LaunchPlan]] = {}
_MAX_PLANS = 4096


def launch_plan(packed: PackedWeight, m: int, config: TileConfig | str | None,
                dense_cache_allowed: bool = True) -> LaunchPlan:
    """What qgemm launches for ``packed`` at M = m (cached per packed object, M, config and
    whether dense_cache is on and allowed)."""
    held = config is None and dense_cache_allowed and dense_cache.enabled()
    key = (id(packed), m, config, held)
    entry = _PLANS.get(key)
    if entry is not None and entry[0]() is packed:
        return entry[1]
    plan = _new_plan(packed, m, config, held)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = (weakref.ref(packed), plan)
    return plan


def _new_plan(packed: PackedWeight, m: int, config: TileConfig | str | None,
              dense_cache_on: bool) -> LaunchPlan:
    device = packed.device
    props = device_properties(device)
    if isinstance(config, str):
        config = parse_config(config)
    tile = config or select_config(
        m, packed.n, packed.k, packed.bits, packed.kernel_group, packed.dtype,
        device_name(device), props["sharedMemPerBlockOptin"], dense_cache_on)
    weights = (packed.qweight.data.ptr, packed.scales.data.ptr, packed.pair_lut.data.ptr)
    sizes = (m, packed.n, packed.k, packed.k_chunks, packed.n_groups)
    if tile in (DENSE, DENSE_CACHED):
        spec = DequantSpec(packed.bits, packed.kernel_group, packed.dtype)
        plan = LaunchPlan(get_kernel(spec, device), _dequant_grid(packed.n, packed.k_chunks),
                          spec.threads, spec.shared_bytes, weights, sizes, dense=True)
        if tile == DENSE_CACHED:
            plan = replace(plan, held=True, fallback=_new_plan(packed, m, None, False))
        return plan
    if not tile.takes(m):
        raise ValueError(f"tile config {tile} takes at most {tile.max_m} rows of x, got M = {m}")
    spec = KernelSpec(packed.bits, packed.kernel_group, packed.dtype, tile)
    if spec.shared_bytes > props["sharedMemPerBlockOptin"]:
        raise ValueError(f"tile config {tile} needs {spec.shared_bytes} bytes of shared memory, "
                         f"cuda:{device} allows {props['sharedMemPerBlockOptin']}")
    if not builds_for(spec, device_arch(props)):
        need = (f"runs wgmma, which needs compute capability {WARPGROUP_ARCH // 10}.{WARPGROUP_ARCH % 10} "
                f"exactly" if isinstance(tile, WarpgroupConfig) else
                f"splits K over clusters of {tile.ks} CTAs, which need compute capability "
                f"{CLUSTER_MIN_ARCH // 10}.{CLUSTER_MIN_ARCH % 10}")
        raise ValueError(f"tile config {tile} {need}; cuda:{device} has {props['major']}.{props['minor']}")
    # z: the CTAs of a cluster, each a range of K chunks (lut_gemm_split)
    grid = (-(-m // tile.block_m), -(-packed.n_tiles // tile.block_n_tiles), tile.ks)
    if grid[1] > _MAX_GRID_Y:
        raise ValueError(f"N = {packed.n} needs {grid[1]} CTA rows, more than CUDA's {_MAX_GRID_Y}")
    function = get_kernel(spec, device)
    stream_k_scratch = (0, 0)
    if isinstance(tile, WarpgroupConfig) and tile.stream_k:
        # y: one wave of CTAs shared by the M blocks, each CTA a range of its block's units
        units = grid[1] * packed.k_chunks
        wave = _ctas_that_fit(function, spec, device) * props["multiProcessorCount"]
        ctas = min(units, max(1, wave // grid[0]))
        stream_k_scratch = (grid[0] * ctas * 2 * tile.threads * tile.bm // 8, grid[0] * grid[1] * tile.warps)
        grid = (grid[0], ctas, 1)
    programmatic = PROGRAMMATIC_LAUNCH and props["major"] >= 9
    shared_bytes = spec.shared_bytes
    if programmatic and tile.ks == 1:  # (clusters are placed a GPC at a time: not measured)
        ctas_per_sm = -(-grid[0] * grid[1] * grid[2] // props["multiProcessorCount"])
        if _ctas_that_fit(function, spec, device) > ctas_per_sm:
            shared_bytes = max(shared_bytes, spread_shared_bytes(ctas_per_sm, props))
    x_image = None
    if isinstance(tile, WarpgroupConfig):
        image_spec = XImageSpec(tile.bm)
        x_image = (get_kernel(image_spec, device), image_spec)
    return LaunchPlan(function, grid, tile.threads, shared_bytes, weights, sizes, dense=False,
                      programmatic=programmatic, x_image=x_image, stream_k_scratch=stream_k_scratch)


def _ctas_that_fit(function, spec: KernelSpec, device: int) -> int:
    import cupy
    from cupy.cuda import driver

    with cupy.cuda.Device(device):
        # a driver call: the device's context must be current on this thread, which a thread whose
        # first CUDA work this is has not bound yet (as in launch)
        cupy.cuda.runtime.setDevice(device)
        return driver.occupancyMaxActiveBlocksPerMultiprocessor(function.ptr, spec.threads,
                                                                spec.shared_bytes)


# The granule in which an SM hands out shared memory to CTAs (compute capability 8.0 to 9.0).
SHARED_GRANULE = 128


def spread_shared_bytes(ctas_per_sm: int, props: dict) -> int:
    """Dynamic shared memory that lets an SM hold at most ``ctas_per_sm`` CTAs (their own
    reserve included). A programmatic launch's grid is let onto the SMs while the grid before
    it still runs, into whatever room that one leaves; where a grid of one wave leaves room on
    every SM, the next grid's early CTAs pile onto some SMs and it runs unevenly (3-bit, M = 1,
    8192 x 8192, nt1_mt1_wk4: 17.4 us with room for 7 CTAs an SM, 13.1 with 4: docs/PERF_NOTES.md
    v21). So a launch whose kernel would fit more CTAs an SM than its grid spreads to takes this
    much shared memory instead."""
    per_cta = props["sharedMemPerMultiprocessor"] // ctas_per_sm // SHARED_GRANULE * SHARED_GRANULE
    return min(per_cta - props["reservedSharedMemPerBlock"], props["sharedMemPerBlockOptin"])


_MAX_PARAMS = 16


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute (cuda.h): an id, padding to 8 bytes, a 64-byte value union."""

    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h), the first argument of cuLaunchKernelEx."""

    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


# CUlaunchAttributeID: the launched grid may start while the one before it in the stream runs,
# once that one's CTAs have all run griddepcontrol.launch_dependents; it waits for the data with
# griddepcontrol.wait (cuda_src/lut_gemm.cuh). Only for kernels that do wait.
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _ParamBlock:
    """A thread's launch block for cuLaunchKernelEx: the config, its one attribute, 8-byte
    parameter slots and the array of pointers to them that the driver reads. The driver copies
    the values during the launch, so one block serves every launch of its thread. A 4-byte int
    parameter reads the low half of its slot (x86-64 and aarch64 are little-endian), a pointer
    or 64-bit one all of it.

        pointers: [&slot0, &slot1, ...]      slots: [x, x_row_stride, qweight, ..., M, N, ...]
    """

    __slots__ = ("slots", "pointers", "address", "config", "config_address", "bound_devices")

    def __init__(self):
        self.slots = (ctypes.c_uint64 * _MAX_PARAMS)()
        base = ctypes.addressof(self.slots)
        self.pointers = (ctypes.c_void_p * _MAX_PARAMS)(*(base + 8 * i for i in range(_MAX_PARAMS)))
        self.address = ctypes.addressof(self.pointers)
        attribute = _LaunchAttribute(_PROGRAMMATIC_STREAM_SERIALIZATION)
        attribute.value[0] = 1
        self.config = _LaunchConfig()
        self.config.attrs = ctypes.pointer(attribute)  # which the config keeps alive
        self.config.block[1] = self.config.block[2] = 1
        self.config_address = ctypes.addressof(self.config)
        self.bound_devices: set[int] = set()  # devices whose context this thread made current


class _ThreadState(threading.local):
    def __init__(self):
        self.block = _ParamBlock()


_THREAD = _ThreadState()
_cuda = None  # cupy.cuda, imported at the first launch: nothing GPU-related at import time
_driver = None  # libcuda's cuLaunchKernelEx and cuGetErrorString, loaded at the first launch


def launch(function, grid: tuple[int, int, int], threads: int, shared_bytes: int, stream: int,
           device: int, args: tuple[int, ...], programmatic: bool = False) -> None:
    """Launch ``function`` (a cupy.cuda.Function of ``device``) on the stream with handle
    ``stream``, its parameters being the ints ``args`` (addresses, sizes) in the kernel's order;
    ``programmatic``: as a programmatic dependent launch (only for a kernel that waits for the
    grid before it with griddepcontrol.wait, and a device of compute capability 9.0 or later).

    cuLaunchKernelEx through ctypes from a reused launch block: CuPy's Function call boxes every
    argument into objects first (8.5 us a launch on the H100 machine's host, against 5.3 for
    its bare cuLaunchKernel), and CuPy has no call that takes launch attributes.
    """
    cuda = _cuda or _import_cuda()
    block = _THREAD.block
    block.slots[:len(args)] = args
    config = block.config
    config.grid[:] = grid
    config.block[0] = threads
    config.shared_bytes = shared_bytes
    config.stream = stream
    config.num_attrs = programmatic
    if cuda.runtime.getDevice() != device or device not in block.bound_devices:
        with cuda.Device(device):
            # cuLaunchKernelEx needs the device's context current on this thread; since CUDA 12
            # cudaSetDevice makes it so (the first launch of a thread may find none bound yet).
            cuda.runtime.setDevice(device)
            block.bound_devices.add(device)
            _launch_ex(block, function)
        return
    _launch_ex(block, function)


def _launch_ex(block: _ParamBlock, function) -> None:
    launch_ex, error_string = _driver
    status = launch_ex(block.config_address, function.ptr, block.address, None)
    if status:
        text = ctypes.c_char_p()
        error_string(status, ctypes.byref(text))
        raise RuntimeError(f"cuLaunchKernelEx failed: {(text.value or b'unknown error').decode()} "
                           f"(CUresult {status})")


def _import_cuda():
    global _cuda, _driver
    import cupy.cuda

    libcuda = ctypes.CDLL("libcuda.so.1")  # loaded already by CuPy: the same driver
    launch_ex = libcuda.cuLaunchKernelEx  # CUDA 12.0 and later
    launch_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    launch_ex.restype = ctypes.c_int
    error_string = libcuda.cuGetErrorString
    error_string.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    error_string.restype = ctypes.c_int
    _driver = (launch_ex, error_string)
    _cuda = cupy.cuda
    return _cuda

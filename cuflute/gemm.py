"""``qgemm``: the launch path. No host synchronization, no copies and no allocation through
CuPy's pool beyond the output (pass ``out=`` to avoid even that), so it can be graph-captured."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from . import interop
from .dispatch import select_config
from .kernels import KernelSpec, TileConfig, get_kernel
from .packing import PackedWeight

_MAX_GRID_Y = 65535


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


def _check(mat: interop.DeviceMatrix, packed: PackedWeight) -> None:
    if packed.device is None:
        raise ValueError("the packed weight is on the host; call packed.to_device() first")
    if mat.dtype != packed.dtype:
        raise TypeError(f"x has dtype {mat.dtype}, the packed weight was packed for {packed.dtype}")
    if mat.k != packed.k:
        raise ValueError(f"x has K = {mat.k} (last dim), the packed weight has K = {packed.k}")
    if mat.device != packed.device:
        raise ValueError(f"x is on cuda:{mat.device}, the packed weight on cuda:{packed.device}")


def qgemm(x, packed: PackedWeight, out=None, config: TileConfig | None = None):
    """``x [..., K] @ W'^T -> [..., N]`` for a packed weight on x's device.

    x is a CUDA torch tensor (returns a torch tensor) or a CuPy array (returns a CuPy array) of
    the packed weight's dtype. The kernel runs on the caller's current stream. ``config``
    forces a tile config (the tuner's use); by default the tuned table or the heuristic picks.
    """
    mat = interop.as_device_matrix(x)
    _check(mat, packed)
    if out is None:
        out = interop.empty_output(mat, packed.n)
        out_ptr = out.data_ptr() if mat.kind == "torch" else out.data.ptr
    else:
        out_ptr = interop.check_output(out, mat, packed.n)
    if mat.m == 0 or packed.n == 0:
        return out

    props = device_properties(mat.device)
    tile = config or select_config(
        mat.m, packed.n, packed.k, packed.bits, packed.kernel_group, packed.dtype,
        device_name(mat.device), props["sharedMemPerBlockOptin"])
    grid = (-(-mat.m // tile.block_m), -(-packed.n_tiles // tile.nt), 1)
    if grid[1] > _MAX_GRID_Y:
        raise ValueError(f"N = {packed.n} needs {grid[1]} CTA rows, more than CUDA's {_MAX_GRID_Y}")
    spec = KernelSpec(packed.bits, packed.kernel_group, packed.dtype, tile)
    if spec.shared_bytes > props["sharedMemPerBlockOptin"]:
        raise ValueError(f"tile config {tile} needs {spec.shared_bytes} bytes of shared memory, "
                         f"cuda:{mat.device} allows {props['sharedMemPerBlockOptin']}")
    kernel = get_kernel(spec, mat.device)
    args = (
        np.uint64(mat.ptr), np.int64(mat.row_stride),
        packed.qweight, packed.scales, packed.pair_lut, np.uint64(out_ptr),
        np.int32(mat.m), np.int32(packed.n), np.int32(packed.k),
        np.int32(packed.k_chunks), np.int32(packed.n_groups),
    )
    import cupy

    with cupy.cuda.Device(mat.device):
        kernel(grid, (tile.threads, 1, 1), args, shared_mem=spec.shared_bytes,
               stream=interop.launch_stream(mat))
    return out

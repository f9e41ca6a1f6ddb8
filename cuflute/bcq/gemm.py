"""``cuflute.bcq.gemm``: the BCQ launch path, with the interop rules of ``cuflute.qgemm``: torch
in, torch out; CuPy in, CuPy out; the caller's stream; no host synchronization, no copies, and no
allocation beyond the output (none with ``out=``), so it can be graph-captured."""
from __future__ import annotations

from .. import interop
from ..gemm import check_operands, device_properties, launch
from ..kernels import get_kernel
from .kernels import M_TILES, BCQSpec
from .packing import BCQPacked

# Every row of x costs its own tables and lookups: measured on an H100 (README), the kernel beats
# cuBLAS fp16 at M = 1 only and is several times slower from M = 4; 8 rows is the most one CTA's
# tables hold, and past that cuflute.qgemm's tensor cores are the tool.
MAX_M = 8


def select_spec(m: int, n: int, bits: int, dtype: str, sm_count: int,
                shared_limit: int) -> BCQSpec:
    """Fewest rows of x per CTA that hold all of M and fit the device's shared memory; 64
    weight rows per CTA (twice the table reuse) when that still gives every SM a CTA; two K
    parts per CTA where their shared memory fits."""
    rows = 64 if -(-n // 64) >= sm_count else 32
    fitting = [t for t in M_TILES if BCQSpec(bits, dtype, t, rows, 1).shared_bytes <= shared_limit]
    m_tile = next((t for t in fitting if t >= m), fitting[-1])
    split = BCQSpec(bits, dtype, m_tile, rows, 2)
    return split if split.shared_bytes <= shared_limit else BCQSpec(bits, dtype, m_tile, rows, 1)


def _check(mat: interop.DeviceMatrix, packed: BCQPacked) -> None:
    if not isinstance(packed, BCQPacked):
        raise TypeError(f"packed must be a cuflute.bcq.BCQPacked, got {type(packed).__name__}")
    check_operands(mat, packed)
    if mat.m > MAX_M:
        raise ValueError(f"x has M = {mat.m} rows (after flattening leading dims); the BCQ GEMV "
                         f"takes M <= {MAX_M}: use cuflute.qgemm or a dense matmul for more")


def gemm(x, packed: BCQPacked, out=None, spec: BCQSpec | None = None):
    """``x [..., K] @ W'^T -> [..., N]`` for a BCQ weight packed on x's device, M <= 8.

    x is a CUDA torch tensor (returns a torch tensor) or a CuPy array (returns a CuPy array) of
    the packed weight's dtype. The kernel runs on the caller's current stream. ``spec`` forces
    a kernel specialization (for timing them); by default select_spec picks.
    """
    mat = interop.as_device_matrix(x)
    _check(mat, packed)
    out, out_ptr = interop.output(mat, packed.n, out)
    if mat.m == 0 or packed.n == 0:
        return out

    props = device_properties(mat.device)
    spec = spec or select_spec(mat.m, packed.n, packed.bits, packed.dtype,
                               props["multiProcessorCount"], props["sharedMemPerBlockOptin"])
    if (spec.bits, spec.dtype) != (packed.bits, packed.dtype):
        raise ValueError(f"spec {spec} does not match the packed weight ({packed.bits} bits, "
                         f"{packed.dtype})")
    if spec.shared_bytes > props["sharedMemPerBlockOptin"]:
        raise ValueError(f"{spec} needs {spec.shared_bytes} bytes of shared memory, "
                         f"cuda:{mat.device} allows {props['sharedMemPerBlockOptin']}")
    grid = (-(-packed.n // spec.rows), -(-mat.m // spec.m_tile), 1)
    args = (mat.ptr, mat.row_stride, packed.qweight.data.ptr, packed.alphas.data.ptr, out_ptr,
            mat.m, packed.n, packed.k, packed.k_supers, packed.n_groups, packed.group_shift,
            int(packed.has_offset))
    launch(get_kernel(spec, mat.device), grid, spec.threads, spec.shared_bytes,
           interop.stream_ptr(mat), mat.device, args)
    return out

"""PyTorch and CuPy arrays in, the same kind out, without copies, on the caller's stream.

The kernel reads x 16 bytes at a time, so it needs a row-major [M, K] view whose rows start
16-byte aligned. Inputs that are already such a view (any contiguous tensor or array, K being a
multiple of 8, and slices of one at multiples of 8 elements) are used in place; anything else (a
transposed last dimension, leading dims that cannot be flattened, a misaligned start) is copied
once into a fresh contiguous array by its own framework.

This is the launch path of every call: it reads shapes, strides and pointers straight from x
instead of building [M, K] views, and caches what depends only on types (microseconds a call).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


# Not frozen: a frozen dataclass costs about 2 us to build (object.__setattr__ per field), a
# tenth of a whole call; nothing assigns to it after as_device_matrix.
@dataclass(slots=True)
class DeviceMatrix:
    kind: str  # "torch" or "cupy"
    array: object  # x, or the contiguous copy of it that the kernel reads
    lead_shape: tuple  # x.shape[:-1]
    m: int
    k: int
    row_stride: int  # elements between rows of the [M, K] view
    dtype: str
    device: int
    ptr: int  # address of row 0


@lru_cache(maxsize=64)
def _kind(cls: type) -> str | None:
    return {"torch": "torch", "cupy": "cupy", "numpy": "numpy"}.get(cls.__module__.split(".")[0])


@lru_cache(maxsize=64)
def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _row_stride(shape, strides) -> int | None:
    """Elements between consecutive rows of ``x [..., K]`` flattened to [M, K] in place (strides
    in elements), or None where the leading dims do not collapse into one stride or the last one
    is not contiguous. Size-1 dims have no stride that matters."""
    k = shape[-1]
    if None in strides or (k > 1 and strides[-1] != 1):
        return None
    row = expected = None
    for size, stride in zip(reversed(shape[:-1]), reversed(strides[:-1])):
        if size == 1:
            continue
        if row is None:
            row = stride
        elif stride != expected:
            return None
        expected = stride * size
    return k if row is None else row


@lru_cache(maxsize=1024)
def _rows(shape: tuple, strides: tuple) -> tuple[tuple, int, int, int | None]:
    """(leading shape, M, K, row stride or None) of x with this shape and element strides."""
    lead = tuple(shape[:-1])
    m = 1
    for size in lead:
        m *= size
    return lead, m, shape[-1], _row_stride(shape, strides)


def as_device_matrix(x) -> DeviceMatrix:
    """View ``x [..., K]`` as the kernel's [M, K] operand, validating kind and device."""
    kind = _kind(type(x))
    if kind == "torch":
        if not x.is_cuda:
            raise TypeError(f"x is a torch tensor on {x.device}; cuflute needs a CUDA tensor")
        lead, m, k, row_stride = _rows(x.shape, x.stride())
        ptr = x.data_ptr()
        if row_stride is None or ptr % 16 or row_stride % 8:
            # a fresh allocation: contiguous() would hand back a contiguous but misaligned x
            x = x.clone(memory_format=_torch().contiguous_format).view(-1, k)
            row_stride, ptr = k, x.data_ptr()
        return DeviceMatrix("torch", x, lead, m, k, row_stride, _dtype_name(x.dtype),
                            x.get_device(), ptr)
    if kind == "cupy":
        item = x.itemsize
        strides = tuple(s // item if s % item == 0 else None for s in x.strides)
        lead, m, k, row_stride = _rows(x.shape, strides)
        ptr = x.data.ptr
        if row_stride is None or ptr % 16 or row_stride % 8:
            x = x.copy(order="C").reshape(-1, k)
            row_stride, ptr = k, x.data.ptr
        return DeviceMatrix("cupy", x, lead, m, k, row_stride, _dtype_name(x.dtype),
                            x.data.device_id, ptr)
    if kind == "numpy":
        raise TypeError("x is a NumPy array on the host; pass a CuPy array or a CUDA torch tensor "
                        "(cupy.asarray(x) or torch.as_tensor(x, device='cuda'))")
    raise TypeError(f"x must be a CuPy array or a CUDA torch tensor, got {type(x).__name__}")


def _torch():
    import torch

    return torch


def output(mat: DeviceMatrix, n: int, out=None) -> tuple[object, int]:
    """(out, its address): the caller's ``out`` once validated, else a new uninitialised
    [..., N] one."""
    if out is not None:
        return out, check_output(out, mat, n)
    out = empty(mat, (*mat.lead_shape, n))
    return out, address(mat, out)


def empty(mat: DeviceMatrix, shape: tuple):
    """An uninitialised array of x's kind, dtype and device."""
    if mat.kind == "torch":
        return mat.array.new_empty(shape)
    import cupy

    if cupy.cuda.runtime.getDevice() == mat.device:
        return cupy.empty(shape, dtype=mat.array.dtype)
    with cupy.cuda.Device(mat.device):
        return cupy.empty(shape, dtype=mat.array.dtype)


def address(mat: DeviceMatrix, array) -> int:
    """The device address of an array of x's kind."""
    return array.data_ptr() if mat.kind == "torch" else array.data.ptr


def matmul_transposed(mat: DeviceMatrix, w, out, col0: int = 0) -> None:
    """out[..., col0 : col0 + len(w)] = x @ w.T for w [n, K] of x's kind, by x's framework
    (cuBLAS) on the stream that stream_ptr names."""
    x2d = mat.array.reshape(mat.m, mat.k)
    n = w.shape[0]
    if mat.kind == "torch":
        # a column slice of a row-major out is a matrix with a leading dimension: no copy
        _torch().mm(x2d, w.t(), out=out.view(mat.m, -1)[:, col0:col0 + n])
        return
    import cupy

    out2d = out.reshape(mat.m, -1)
    with cupy.cuda.Device(mat.device):
        if n == out2d.shape[1]:
            cupy.matmul(x2d, w.T, out=out2d)
        else:
            out2d[:, col0:col0 + n] = cupy.matmul(x2d, w.T)


def check_output(out, mat: DeviceMatrix, n: int):
    """Validate a caller-given ``out`` and return its pointer."""
    shape = (*mat.lead_shape, n)
    if mat.kind == "torch":
        ok = (_kind(type(out)) == "torch" and tuple(out.shape) == shape
              and out.dtype == mat.array.dtype and out.is_cuda and out.get_device() == mat.device
              and out.is_contiguous())
        ptr = out.data_ptr() if ok else None
    else:
        ok = (_kind(type(out)) == "cupy" and tuple(out.shape) == shape
              and out.dtype == mat.array.dtype and out.data.device_id == mat.device
              and out.flags.c_contiguous)
        ptr = out.data.ptr if ok else None
    if not ok:
        raise ValueError(f"out must be a contiguous {mat.kind} array of shape {shape}, dtype "
                         f"{mat.dtype}, on device {mat.device}; got {type(out).__name__} "
                         f"{getattr(out, 'shape', None)}")
    return ptr


def capturing(mat: DeviceMatrix) -> bool:
    """Whether the stream that stream_ptr names is capturing a CUDA graph."""
    if mat.kind == "torch":
        with _torch().cuda.device(mat.device):
            return _torch().cuda.is_current_stream_capturing()
    import cupy

    return cupy.cuda.get_current_stream(mat.device).is_capturing()


def stream_ptr(mat: DeviceMatrix) -> int:
    """The handle of the stream to launch on: torch's current stream on x's device for torch,
    CuPy's current one there for CuPy."""
    if mat.kind == "torch":
        # The raw handle, as torch's compiled code gets it: torch.cuda.current_stream() builds
        # a Stream object first, about 1 us a call.
        return _torch()._C._cuda_getCurrentRawStream(mat.device)
    import cupy

    return cupy.cuda.get_current_stream(mat.device).ptr

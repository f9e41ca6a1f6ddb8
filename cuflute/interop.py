"""PyTorch and CuPy arrays in, the same kind out, without copies, on the caller's stream.

The kernel reads x 16 bytes at a time, so it needs a row-major [M, K] view whose rows start
16-byte aligned. Inputs that are already such a view (any contiguous tensor or array, K being a
multiple of 8, and slices of one at multiples of 8 elements) are used in place; anything else (a transposed last dimension, leading dims that cannot be
flattened, a misaligned start) is copied once into a contiguous array by its own framework.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class DeviceMatrix:
    kind: str  # "torch" or "cupy"
    array: object  # the [M, K] view (or copy) the kernel reads
    lead_shape: tuple  # x.shape[:-1]
    m: int
    k: int
    row_stride: int  # elements
    dtype: str
    device: int

    @property
    def ptr(self) -> int:
        return self.array.data_ptr() if self.kind == "torch" else self.array.data.ptr


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def _usable(ptr: int, row_stride: int, col_stride: int) -> bool:
    return col_stride == 1 and ptr % 16 == 0 and row_stride % 8 == 0


def as_device_matrix(x) -> DeviceMatrix:
    """View ``x [..., K]`` as the kernel's [M, K] operand, validating kind and device."""
    if _is_torch(x):
        if x.device.type != "cuda":
            raise TypeError(f"x is a torch tensor on {x.device}; cuflute needs a CUDA tensor")
        lead, k = tuple(x.shape[:-1]), x.shape[-1]
        x2 = x.reshape(-1, k)
        if not _usable(x2.data_ptr(), x2.stride(0), x2.stride(1)):
            x2 = x2.contiguous()
        dtype = str(x.dtype).removeprefix("torch.")
        return DeviceMatrix("torch", x2, lead, x2.shape[0], k, x2.stride(0), dtype, x.device.index)
    if _is_cupy(x):
        lead, k = tuple(x.shape[:-1]), x.shape[-1]
        x2 = x.reshape(-1, k)
        item = x2.itemsize
        if not _usable(x2.data.ptr, x2.strides[0] // item, x2.strides[1] // item):
            import cupy

            x2 = cupy.ascontiguousarray(x2)
        return DeviceMatrix("cupy", x2, lead, x2.shape[0], k, x2.strides[0] // item,
                            x2.dtype.name, x2.device.id)
    if type(x).__module__.split(".")[0] == "numpy":
        raise TypeError("x is a NumPy array on the host; pass a CuPy array or a CUDA torch tensor "
                        "(cupy.asarray(x) or torch.as_tensor(x, device='cuda'))")
    raise TypeError(f"x must be a CuPy array or a CUDA torch tensor, got {type(x).__name__}")


def empty_output(mat: DeviceMatrix, n: int):
    """An uninitialised [..., N] output of x's kind, dtype and device."""
    shape = (*mat.lead_shape, n)
    if mat.kind == "torch":
        import torch

        return torch.empty(shape, dtype=mat.array.dtype, device=mat.array.device)
    import cupy

    with cupy.cuda.Device(mat.device):
        return cupy.empty(shape, dtype=mat.array.dtype)


def check_output(out, mat: DeviceMatrix, n: int):
    """Validate a caller-given ``out`` and return its pointer."""
    shape = (*mat.lead_shape, n)
    if mat.kind == "torch":
        ok = (_is_torch(out) and tuple(out.shape) == shape and out.dtype == mat.array.dtype
              and out.device == mat.array.device and out.is_contiguous())
        ptr = out.data_ptr() if ok else None
    else:
        ok = (_is_cupy(out) and tuple(out.shape) == shape and out.dtype == mat.array.dtype
              and out.device.id == mat.device and out.flags.c_contiguous)
        ptr = out.data.ptr if ok else None
    if not ok:
        raise ValueError(f"out must be a contiguous {mat.kind} array of shape {shape}, dtype "
                         f"{mat.dtype}, on device {mat.device}; got {type(out).__name__} "
                         f"{getattr(out, 'shape', None)}")
    return ptr


@lru_cache(maxsize=64)
def _external_stream(ptr: int, device: int):
    import cupy

    return cupy.cuda.ExternalStream(ptr, device)


def launch_stream(mat: DeviceMatrix):
    """The stream to launch on: torch's current stream for torch, CuPy's current one for CuPy."""
    if mat.kind == "torch":
        import torch

        return _external_stream(torch.cuda.current_stream(mat.device).cuda_stream, mat.device)
    import cupy

    return cupy.cuda.get_current_stream()

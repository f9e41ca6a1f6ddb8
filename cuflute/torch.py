"""PyTorch: the ``torch.ops.cuflute.qgemm`` custom op, ``QuantizedLinear`` and ``quantize_model``.

The op takes the packed arrays as tensors (int32 / int16 views of the packer's uint32 / uint16
words, so that ``module.to(dtype)`` leaves them alone), the static ints and the packed dtype's
name. For CUDA tensors a C++ kernel (``native_launcher``) launches what ``cuflute.qgemm`` would,
asking the Python one once per weight and M; the Python kernel runs the same launch path as
``cuflute.qgemm`` for the rest. Its fake implementation only states the output's shape and dtype,
so ``torch.compile(fullgraph=True)`` traces through it; the real ones allocate nothing through
CuPy and never synchronize, so CUDA graphs capture them.

Nothing here touches a GPU at import time.
"""
from __future__ import annotations

import fnmatch
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import gemm, interop
from .dtypes import check_dtype
from .formats import SUPPORTED_GROUP_SIZES, _check_bits, int_table, nf_table, quantize, resolve_table
from .packing import CHUNK_K, LANES, TILE_N, PackedWeight, pack, padded_groups, pair_lut

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
# The packer's unsigned words, seen by torch as signed ones of the same width.
_BUFFER_DTYPES = {"qweight": torch.int32, "scales": torch.int16, "pair_lut": torch.int32}
_CUPY_DTYPES = {"qweight": "uint32", "scales": "uint16", "pair_lut": "uint32"}

_LIB = torch.library.Library("cuflute", "DEF")
# Defined through torch.library.Library rather than torch.library.custom_op: the latter's
# Python wrapper costs about 12 us of host time per eager call, this about 3 us. The dtype goes
# as its name ("float16" or "bfloat16"): boxing a ScalarType into a Python torch.dtype cost 3 to
# 4 us a call on the development machine's CPU, more than the other eight arguments together.
_LIB.define("qgemm(Tensor x, Tensor qweight, Tensor scales, Tensor pair_lut, "
            "int n, int k, int bits, int group_size, str dtype) -> Tensor")


def packed_shapes(n: int, k: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the packed arrays of an [n, k] weight (``group_size == k``: one scale per row)."""
    n_tiles, k_chunks = -(-n // TILE_N), -(-k // CHUNK_K)
    return {
        "qweight": (n_tiles, k_chunks, bits, LANES, 4),
        "scales": (n_tiles, padded_groups(group_size, k), 8, 2),
        "pair_lut": (4**bits,),
    }


def _dtype_name(dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    return _DTYPE_NAMES[dtype]


# (data pointers, n, k, bits, group, dtype) -> PackedWeight of CuPy views. The views own
# nothing: they are used only inside a call whose caller holds the tensors at those addresses,
# and memory freed and reused at the same address with the same key has the same layout.
_VIEWS: dict[tuple, PackedWeight] = {}
_MAX_VIEWS = 4096


def _cupy_view(tensor: torch.Tensor, name: str, shape: tuple, device: int):
    import cupy

    if tensor.device.type != "cuda" or tensor.device.index != device:
        raise TypeError(f"{name} is on {tensor.device}, qweight on cuda:{device}: keep the packed "
                        "arrays (the QuantizedLinear module's buffers) on one device")
    if tensor.dtype != _BUFFER_DTYPES[name] or tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must be {_BUFFER_DTYPES[name]} of shape {shape}, "
                         f"got {tensor.dtype} of shape {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    memory = cupy.cuda.UnownedMemory(tensor.data_ptr(), tensor.nbytes, None, device)
    return cupy.ndarray(shape, _CUPY_DTYPES[name], cupy.cuda.MemoryPointer(memory, 0))


def _new_view(qweight, scales, pair_lut, n, k, bits, group_size, dtype) -> PackedWeight:
    if qweight.device.type != "cuda":
        raise TypeError(f"qweight is on {qweight.device}: move the packed weight (the "
                        "QuantizedLinear module) to x's CUDA device")
    device = qweight.device.index
    shapes = packed_shapes(n, k, _check_bits(bits), group_size)
    tensors = {"qweight": qweight, "scales": scales, "pair_lut": pair_lut}
    views = {name: _cupy_view(t, name, shapes[name], device) for name, t in tensors.items()}
    return PackedWeight(n=n, k=k, bits=bits, group_size=group_size, dtype=check_dtype(dtype),
                        table=None,  # the launch reads only the pair LUT
                        device=device, **views)


def _packed_view(x, qweight, scales, pair_lut, n, k, bits, group_size, dtype) -> PackedWeight:
    # Addresses are unique across devices (unified addressing), so they and the static
    # arguments name the view; gemm.qgemm checks x against it (kind, device, dtype, K).
    key = (qweight.data_ptr(), scales.data_ptr(), pair_lut.data_ptr(), n, k, bits, group_size, dtype)
    packed = _VIEWS.get(key)
    if packed is None:
        interop.as_device_matrix(x)  # x's own errors first: on the host, or not a tensor
        packed = _new_view(qweight, scales, pair_lut, n, k, bits, group_size, dtype)
        if len(_VIEWS) >= _MAX_VIEWS:
            _VIEWS.clear()
        _VIEWS[key] = packed
    return packed


def _qgemm(x, qweight, scales, pair_lut, n, k, bits, group_size, dtype):
    """The op's Python kernel: what the C++ one (native_launcher) does not take, and all of it
    until that one is loaded, which the first call with a CUDA tensor sets off."""
    if _native is None and getattr(x, "is_cuda", False):
        native_launcher()
    # not through the dense cache: the view's tensors are module buffers that may be rewritten
    return gemm.qgemm(x, _packed_view(x, qweight, scales, pair_lut, n, k, bits, group_size, dtype),
                      use_dense_cache=False)


def _native_plan(x, qweight, scales, pair_lut, n, k, bits, group_size, dtype):
    """For the C++ kernel, once per (weight, M): the lut_gemm launch that qgemm would make, or
    None where qgemm would not make one launch (the dense path, a warpgroup config's two)."""
    packed = _packed_view(x, qweight, scales, pair_lut, n, k, bits, group_size, dtype)
    mat = interop.as_device_matrix(x)
    gemm.check_operands(mat, packed)
    plan = gemm.launch_plan(packed, mat.m, None, dense_cache_allowed=False)
    if plan.dense or plan.x_image is not None:
        return None
    return (plan.function.ptr, *plan.grid, plan.threads, plan.shared_bytes, *plan.sizes[3:],
            plan.programmatic)


_native = None  # the C++ launcher's module once loaded, False where it cannot be
_native_lock = threading.Lock()


def native_launcher():
    """The C++ kernel of ``torch.ops.cuflute.qgemm`` for CUDA tensors (cuda_src/torch_op.cpp),
    built with torch's C++ extension tools the first time (about a minute, then cached by
    torch in ``TORCH_EXTENSIONS_DIR``) and loaded: the eager op's host time without the Python
    dispatch (docs/PERF_NOTES.md). ``None`` where it cannot be built (no C++ compiler or
    CUDA toolkit headers; a warning says why) or ``CUFLUTE_NATIVE_OP=0``: the Python kernel
    then serves every call, with the same results."""
    global _native
    with _native_lock:
        if _native is None:
            _native = False
            if os.environ.get("CUFLUTE_NATIVE_OP", "1") != "0":
                _native = _build_native() or False
    return _native or None


def _build_native():
    from torch.utils import cpp_extension

    from .kernels import CUDA_SRC

    print("cuflute: loading the C++ launcher of torch.ops.cuflute.qgemm (the first time on a "
          "machine it is built: about a minute)", file=sys.stderr)
    try:
        module = cpp_extension.load(name="cuflute_torch_op", sources=[str(CUDA_SRC / "torch_op.cpp")],
                                    extra_cflags=["-O2"], with_cuda=True)
    except Exception as error:  # no compiler, no toolkit headers, a failed build: all say the same
        warnings.warn(f"cuflute: the C++ launcher of torch.ops.cuflute.qgemm could not be built "
                      f"({type(error).__name__}: {error}); the Python one serves every call",
                      stacklevel=3)
        return None
    module.set_python_side(_native_plan, _qgemm)
    return module


def _qgemm_fake(x, qweight, scales, pair_lut, n, k, bits, group_size, dtype):
    if x.dtype != _TORCH_DTYPES[check_dtype(dtype)]:
        raise TypeError(f"x has dtype {x.dtype}, the packed weight was packed for {dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x has K = {x.shape[-1]} (last dim), the packed weight has K = {k}")
    return x.new_empty((*x.shape[:-1], n))


_LIB.impl("qgemm", _qgemm, "CompositeExplicitAutograd")
torch.library.register_fake("cuflute::qgemm", _qgemm_fake, lib=_LIB)
# The overload itself: torch.ops.cuflute.qgemm resolves it through two attribute lookups and
# the overload packet's dispatch on every call.
_QGEMM = torch.ops.cuflute.qgemm.default


def _table_label(table: np.ndarray, bits: int) -> str:
    for name, make in (("nf", nf_table), ("int", int_table)):
        if np.array_equal(table, make(bits)):
            return name
    return "[" + ", ".join(f"{v:.4g}" for v in table) + "]"


class QuantizedLinear(nn.Module):
    """``y = x @ W'^T + b`` with ``W'`` stored as ``bits``-bit codes into ``table`` and one scale
    per ``group_size`` inputs (``None``: one per row), for float16 or bfloat16 activations.

    Build one with ``from_linear`` (quantizes an ``nn.Linear`` with ``cuflute.quantize``) or
    ``from_packed``; the constructor makes an empty one of the right shapes (for loading).
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4,
                 group_size: int | None = 128, table="nf", dtype=torch.float16,
                 bias: bool = False, device=None):
        super().__init__()
        bits = _check_bits(bits)
        group_size = in_features if group_size is None else int(group_size)
        if group_size != in_features and group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES} or None "
                             f"(per-channel), got {group_size!r}")
        if in_features % 8 or in_features % group_size:
            raise ValueError(f"in_features = {in_features} must be a multiple of 8 and of "
                             f"group_size = {group_size}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group_size = bits, group_size
        self.table = resolve_table(table, bits)
        self.dtype = dtype
        name = _dtype_name(dtype)
        for buffer, shape in packed_shapes(out_features, in_features, bits, group_size).items():
            self.register_buffer(buffer, torch.zeros(shape, dtype=_BUFFER_DTYPES[buffer], device=device))
        self.pair_lut.copy_(torch.from_numpy(pair_lut(self.table, bits, name).view(np.int32)))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """A module over ``packed``'s arrays (zero copy: NumPy on the CPU, CuPy through DLPack)."""
        dtype = _TORCH_DTYPES[packed.dtype]
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = packed.k, packed.n
        module.bits, module.group_size = packed.bits, packed.group_size
        module.table, module.dtype = np.asarray(packed.table, dtype=np.float64), dtype
        for name in ("qweight", "scales", "pair_lut"):
            module.register_buffer(name, _as_torch(getattr(packed, name), _BUFFER_DTYPES[name]))
        if bias is not None:
            if tuple(bias.shape) != (packed.n,):
                raise ValueError(f"bias must have shape ({packed.n},), got {tuple(bias.shape)}")
            bias = bias.detach().to(dtype=dtype, device=module.qweight.device)
        module.register_buffer("bias", bias)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 128,
                    table="nf", dtype=None) -> "QuantizedLinear":
        """Quantize ``linear``'s weight (NumPy, on the CPU) into a module on its device; the bias
        is kept. ``dtype`` defaults to the weight's, which must then be float16 or bfloat16."""
        weight = linear.weight.detach()
        dtype = weight.dtype if dtype is None else dtype
        name = _dtype_name(dtype)
        qw = quantize(weight.float().cpu().numpy(), bits, group_size, table)
        module = cls.from_packed(pack(qw, name), linear.bias)
        return module.to(weight.device)

    def packed(self) -> PackedWeight:
        """The module's weight as a PackedWeight sharing its memory (NumPy or CuPy arrays)."""
        on_gpu = self.qweight.device.type == "cuda"
        arrays = {}
        for name, words in _CUPY_DTYPES.items():
            t = getattr(self, name)
            if on_gpu:
                import cupy

                arrays[name] = cupy.from_dlpack(t.detach()).view(words)
            else:
                arrays[name] = t.detach().numpy().view(words)
        return PackedWeight(n=self.out_features, k=self.in_features, bits=self.bits,
                            group_size=self.group_size, dtype=_dtype_name(self.dtype),
                            table=self.table, device=self.qweight.device.index if on_gpu else None,
                            **arrays)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The buffers from _buffers directly: nn.Module.__getattr__ costs about 0.5 us for each,
        # a tenth of the host time of the whole call.
        buffers = self._buffers
        y = _QGEMM(x, buffers["qweight"], buffers["scales"], buffers["pair_lut"],
                   self.out_features, self.in_features, self.bits, self.group_size,
                   _DTYPE_NAMES[self.dtype])
        bias = buffers["bias"]
        return y if bias is None else y.add_(bias)

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size == self.in_features and \
            self.group_size not in SUPPORTED_GROUP_SIZES else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={group}, "
                f"table={_table_label(self.table, self.bits)}, dtype={_dtype_name(self.dtype)}")

    def config(self) -> dict:
        """What it takes to rebuild this module empty: the checkpoint's per-layer record."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "table": self.table.tolist(),
                "dtype": _dtype_name(self.dtype), "bias": self.bias is not None}

    @classmethod
    def from_config(cls, config: dict, device=None) -> "QuantizedLinear":
        return cls(config["in_features"], config["out_features"], config["bits"],
                   config["group_size"], config["table"], _TORCH_DTYPES[config["dtype"]],
                   config["bias"], device=device)


def _as_torch(array, dtype: torch.dtype) -> torch.Tensor:
    """A NumPy or CuPy array of unsigned words as a torch tensor of the same-width signed type."""
    signed = {torch.int32: "int32", torch.int16: "int16"}[dtype]
    if isinstance(array, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array).view(signed))
    return torch.from_dlpack(array.view(signed))


@dataclass
class QuantizationReport:
    """What ``quantize_model`` replaced, and what it left alone with the reason."""

    bits: int
    group_size: int | None
    replaced: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        group = "per-channel" if self.group_size is None else f"g={self.group_size}"
        lines = [f"replaced {len(self.replaced)} linear layers with {self.bits}-bit {group} "
                 f"QuantizedLinear; skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _skip_reason(name: str, linear: nn.Linear, group_size: int | None, skip) -> str | None:
    for pattern in skip:
        if fnmatch.fnmatchcase(name, pattern):
            return f"matches skip pattern {pattern!r}"
    k = linear.in_features
    if k % 8 or (group_size is not None and k % group_size):
        return f"in_features = {k} is not a multiple of 8 and of the group size {group_size}"
    return None


def quantize_model(model: nn.Module, bits: int = 4, group_size: int | None = 128, table="nf",
                   skip=(), dtype=None, progress: bool = True) -> QuantizationReport:
    """Replace the ``nn.Linear`` layers of ``model`` in place by ``QuantizedLinear`` ones.

    ``skip``: module names or ``fnmatch`` patterns of them (e.g. ``"lm_head"``,
    ``"*.down_proj"``) to leave alone; layers whose in_features the kernel cannot take are
    skipped too, with the reason in the report. ``dtype`` defaults to each layer's weight dtype.
    Everything is checked before the first layer is replaced.
    """
    _check_bits(bits)
    resolve_table(table, bits)
    if group_size is not None and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES} or None "
                         f"(per-channel), got {group_size!r}")
    skip = [skip] if isinstance(skip, str) else list(skip)
    report = QuantizationReport(bits, group_size)
    todo = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        why = _skip_reason(name, module, group_size, skip)
        if why:
            report.skipped.append((name, why))
            continue
        layer_dtype = module.weight.dtype if dtype is None else dtype
        if layer_dtype not in _DTYPE_NAMES:
            raise TypeError(f"{name} has weights in {module.weight.dtype}; convert the model to "
                            "float16 or bfloat16 first or pass dtype=")
        todo.append((name, module, layer_dtype))
    for name, module, layer_dtype in tqdm(todo, desc=f"quantizing to {bits} bits", unit="layer",
                                          disable=not progress):
        model.set_submodule(name, QuantizedLinear.from_linear(module, bits, group_size, table,
                                                              layer_dtype))
        report.replaced.append(name)
    return report

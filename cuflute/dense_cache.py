"""W' held dense for the weights that the dispatcher sends to cuBLAS at large M: opt-in.

From M = 64 or so the LUT GEMM is no faster than cuBLAS fp16 on the H100, and at M = 128 it
takes 1.4 to 1.9x as long (BENCHMARKS.md; docs/PERF_NOTES.md, "The floor at large M"). The dense
path without a cache writes W' into a temporary on every call, slower still. With a byte limit
set, the first call that the dispatcher routes to ``dispatch.DENSE_CACHED`` (where the tuned table
measured cuBLAS over W' faster than the best tile config; without a table, from
``dispatch.DENSE_CACHED_MIN_M`` rows) writes W' into a buffer that lives as long as its
PackedWeight, and each later call is one cuBLAS GEMM over it. The price is memory: W' takes
2 N K bytes, four times a 4-bit weight's codes.

- Off by default: the limit is 0 bytes, or ``CUFLUTE_DENSE_CACHE_BYTES`` at import.
- A weight is taken whole while the bytes held stay within the limit; nothing is ever evicted,
  so a weight that does not fit keeps its tile config on every call instead of churning.
- A weight's W' goes with its PackedWeight (garbage collected), or with :func:`clear`.
- Nothing is filled while the stream is capturing a CUDA graph: a capture that finds no W' held
  records the tile config's launch.
- It serves ``cuflute.qgemm`` on PackedWeight objects, which are immutable. The torch op
  (``QuantizedLinear``) does not use it: its weight is module buffers that a caller may rewrite
  in place (``load_state_dict``), which a held W' would not see. A PackedWeight from
  ``QuantizedLinear.packed()`` shares those buffers: after rewriting them, :func:`clear`.
"""
from __future__ import annotations

import os
import threading
import weakref

# Reentrant: a weight's release can run inside put (a garbage collection while it allocates).
_LOCK = threading.RLock()
# id(packed) -> [weak reference to packed, {"torch" | "cupy": W' as that framework's array}, bytes]
_HELD: dict[int, list] = {}
_held_bytes = 0


def _env_limit() -> int:
    text = os.environ.get("CUFLUTE_DENSE_CACHE_BYTES", "0")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"CUFLUTE_DENSE_CACHE_BYTES must be a byte count (an integer), got {text!r}") from None
    if value < 0:
        raise ValueError(f"CUFLUTE_DENSE_CACHE_BYTES must be >= 0, got {value}")
    return value


_limit = _env_limit()


def set_limit(nbytes: int) -> None:
    """Hold at most ``nbytes`` of dense weights (0: none, the default). A limit below what is
    held now lets all of it go first."""
    global _limit
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"the dense cache's limit must be a byte count >= 0, got {nbytes!r}")
    if nbytes < _held_bytes:
        clear()
    _limit = nbytes


def limit() -> int:
    return _limit


def enabled() -> bool:
    return _limit > 0


def held_bytes() -> int:
    return _held_bytes


def clear() -> None:
    """Let every held W' go (freed once no call in flight still uses it)."""
    global _held_bytes
    with _LOCK:
        _HELD.clear()
        _held_bytes = 0


def dense_nbytes(packed) -> int:
    return 2 * packed.n * packed.k


def get(packed, kind: str):
    """``packed``'s W' as an array of framework ``kind`` ("torch" or "cupy"), or None if not held."""
    entry = _HELD.get(id(packed))
    if entry is None or entry[0]() is not packed:
        return None
    arrays = entry[1]
    array = arrays.get(kind)
    if array is None:  # held for the other framework: the same memory, through DLPack
        (other,) = arrays.values()
        if kind == "torch":
            import torch

            array = torch.from_dlpack(other)
        else:
            import cupy

            array = cupy.from_dlpack(other)
        arrays[kind] = array
    return array


def admits(packed) -> bool:
    """Whether ``packed``'s W' fits in what the limit leaves."""
    return _held_bytes + dense_nbytes(packed) <= _limit


def put(packed, kind: str, array) -> None:
    """Hold ``array``, packed's W' as framework ``kind``'s array, until packed goes."""
    global _held_bytes
    key = id(packed)
    with _LOCK:
        old = _HELD.get(key)
        if old is not None:
            if old[0]() is packed:
                return
            _held_bytes -= old[2]  # a dead weight's entry whose release has not run yet
        ref = weakref.ref(packed, lambda ref, key=key: _release(key, ref))
        _HELD[key] = [ref, {kind: array}, dense_nbytes(packed)]
        _held_bytes += dense_nbytes(packed)


def _release(key: int, ref: weakref.ref) -> None:
    global _held_bytes
    with _LOCK:
        entry = _HELD.get(key)
        if entry is not None and entry[0] is ref:
            del _HELD[key]
            _held_bytes -= entry[2]

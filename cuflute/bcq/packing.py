"""The BCQ packer: sign planes and alphas -> the layout of cuda_src/bcq_gemv.cuh (NumPy, offline).

Layout (the same picture stands at the top of cuda_src/bcq_gemv.cuh)::

    qweight  uint32 [n_blocks][k_supers][bits][128 threads][4 words]
             n_blocks = ceil(N / 32), k_supers = ceil(K / 512)

      A block is 32 rows; a super-chunk is 512 k = 4 chunks of 128 k = 64 runs of mu = 8 k.
      Thread t of a block (row 32b + t // 4, quarter q = t % 4) reads one 16-byte vector per
      plane and super-chunk; word w of it serves chunk w, and byte j of that word is run
      4q + j of the chunk:

        bit e of byte j of word w  =  B_i[32b + t // 4,  512s + 128w + 32q + 8j + e]  (1: +1)

      so one warp's 32 vectors (8 rows x 4 quarters) are 512 contiguous bytes.

    alphas   uint16 [32 n_blocks][n_groups][bits + 1]   alpha_0 .. alpha_{bits-1}, offset z
             as the dtype; n_groups = ceil(K / 512) * 512 / group_size, or 1 per row.

Rows past N and k past K are padding: signs 0, alphas and offsets 0 (the kernel reads x as 0
past K). ``cuflute.bcq.reference`` inverts this.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import dtypes
from .formats import SUPPORTED_GROUP_SIZES, BCQWeight

MU = 8  # k per run: each byte of a plane indexes a table of 2**MU partial sums
BLOCK_ROWS = 32
CHUNK_K = 128
SUPER_K = 4 * CHUNK_K
THREADS_PER_BLOCK = 4 * BLOCK_ROWS


def group_shift(group_size: int, k: int) -> int:
    """The kernel's group index is (k // 32) >> shift: log2(group_size / 32), or 31 (always
    group 0) for one group per row."""
    if group_size in SUPPORTED_GROUP_SIZES:
        return int(np.log2(group_size // 32))
    return 31


def padded_groups(group_size: int, k: int) -> int:
    """Alpha groups per row in the packed layout: K padded to whole super-chunks, or 1 per row."""
    if group_size in SUPPORTED_GROUP_SIZES:
        return -(-k // SUPER_K) * SUPER_K // group_size
    return 1


def packed_nbytes(n: int, k: int, bits: int, group_size: int | None) -> int:
    """Bytes of the BCQPacked that pack() makes for an [n, k] weight (group_size None or k:
    one group per row): sign planes and alphas with offsets."""
    n_blocks, k_supers = -(-n // BLOCK_ROWS), -(-k // SUPER_K)
    planes = n_blocks * k_supers * bits * THREADS_PER_BLOCK * 16
    alphas = BLOCK_ROWS * n_blocks * padded_groups(group_size or k, k) * (bits + 1) * 2
    return planes + alphas


@dataclass(frozen=True)
class BCQPacked:
    """A BCQ weight in the kernel's layout. Arrays are NumPy (host) or CuPy (on ``device``)."""

    n: int
    k: int
    bits: int
    group_size: int  # == k: one group per row
    dtype: str
    has_offset: bool
    qweight: object  # uint32 [n_blocks, k_supers, bits, 128, 4]
    alphas: object  # uint16 [32 n_blocks, n_groups, bits + 1]
    device: int | None = None

    @property
    def n_blocks(self) -> int:
        return -(-self.n // BLOCK_ROWS)

    @property
    def k_supers(self) -> int:
        return -(-self.k // SUPER_K)

    @property
    def n_groups(self) -> int:
        return self.alphas.shape[1]

    @property
    def group_shift(self) -> int:
        return group_shift(self.group_size, self.k)

    @property
    def nbytes(self) -> int:
        return int(self.qweight.nbytes + self.alphas.nbytes)

    def to_device(self, device: int | None = None) -> "BCQPacked":
        """A copy whose arrays live on CUDA device ``device`` (default: CuPy's current one)."""
        import cupy

        dev = cupy.cuda.Device(device)
        with dev:
            return replace(self, qweight=cupy.asarray(self.qweight),
                           alphas=cupy.asarray(self.alphas), device=dev.id)

    def to_host(self) -> "BCQPacked":
        if self.device is None:
            return self
        return replace(self, qweight=self.qweight.get(), alphas=self.alphas.get(), device=None)

    def __repr__(self) -> str:
        where = "host" if self.device is None else f"cuda:{self.device}"
        group = "per-channel" if self.group_size not in SUPPORTED_GROUP_SIZES else self.group_size
        return (f"BCQPacked(n={self.n}, k={self.k}, bits={self.bits}, group_size={group}, "
                f"offset={self.has_offset}, dtype={self.dtype}, {where})")


def planes_to_qweight(signs: np.ndarray) -> np.ndarray:
    """uint8 sign bits [bits, N, K] -> qweight uint32 [n_blocks, k_supers, bits, 128, 4]."""
    bits, n, k = signs.shape
    n_blocks, k_supers = -(-n // BLOCK_ROWS), -(-k // SUPER_K)
    padded = np.zeros((bits, n_blocks * BLOCK_ROWS, k_supers * SUPER_K), dtype=np.uint8)
    padded[:, :n, :k] = signs
    runs = np.packbits(padded, axis=-1, bitorder="little")  # byte r: k in [8r, 8r + 8)
    # [plane, block, row, super, word, quarter, byte] -> [block, super, plane, row, quarter, word, byte]
    runs = runs.reshape(bits, n_blocks, BLOCK_ROWS, k_supers, 4, 4, 4)
    ordered = runs.transpose(1, 3, 0, 2, 5, 4, 6)
    words = np.ascontiguousarray(ordered).view("<u4")  # byte j of a word at bits [8j, 8j + 8)
    return words.reshape(n_blocks, k_supers, bits, THREADS_PER_BLOCK, 4).astype(np.uint32)


def qweight_to_planes(qweight: np.ndarray, n: int, k: int) -> np.ndarray:
    """The inverse of planes_to_qweight: uint8 sign bits [bits, n, k]."""
    n_blocks, k_supers, bits = qweight.shape[:3]
    words = np.ascontiguousarray(qweight, dtype="<u4").reshape(
        n_blocks, k_supers, bits, BLOCK_ROWS, 4, 4)
    runs = words.view(np.uint8).reshape(n_blocks, k_supers, bits, BLOCK_ROWS, 4, 4, 4)
    runs = runs.transpose(2, 0, 3, 1, 5, 4, 6).reshape(bits, n_blocks * BLOCK_ROWS, -1)
    return np.unpackbits(runs, axis=-1, bitorder="little")[:, :n, :k]


def pack(bw: BCQWeight, dtype: str = "float16") -> BCQPacked:
    """Restructure a BCQWeight for the kernel, with alphas and offsets in ``dtype``."""
    dtype = dtypes.check_dtype(dtype)
    signs = np.asarray(bw.signs)
    bits, n, k = signs.shape
    if k % MU:
        raise ValueError(f"K must be a multiple of {MU} (x is read in runs of {MU}), got K = {k}")
    if signs.max(initial=0) > 1:
        raise ValueError(f"signs must be 0 or 1, got {signs.max()}")
    used = bw.alphas.shape[1]
    n_groups = padded_groups(bw.group_size, k)
    a = np.zeros((-(-n // BLOCK_ROWS) * BLOCK_ROWS, n_groups, bits + 1))
    a[:n, :used, :bits] = bw.alphas
    if bw.offsets is not None:
        a[:n, :used, bits] = bw.offsets
    return BCQPacked(
        n=n, k=k, bits=bits, group_size=bw.group_size, dtype=dtype,
        has_offset=bw.offsets is not None,
        qweight=planes_to_qweight(signs),
        alphas=dtypes.to_bits(a, dtype),
    )


def random_packed(n: int, k: int, bits: int = 3, group_size: int = 128, dtype: str = "float16",
                  device: int | None = None, seed: int = 0, offset: bool = False) -> BCQPacked:
    """A valid packed weight with uniformly random signs and alphas of a 2**-i halving ladder
    times [0.01, 0.03] (offsets in +-0.01 when ``offset``), drawn directly in the packed layout
    (on ``device`` when given), for benchmarks on large shapes."""
    dtype = dtypes.check_dtype(dtype)
    rng = np.random.default_rng(seed)
    n_blocks, k_supers = -(-n // BLOCK_ROWS), -(-k // SUPER_K)
    n_groups = padded_groups(group_size, k)
    used = n_groups if group_size not in SUPPORTED_GROUP_SIZES else k // group_size
    a = np.zeros((n_blocks * BLOCK_ROWS, n_groups, bits + 1))
    a[:n, :used, :bits] = rng.uniform(0.01, 0.03, (n, used, 1)) * 0.5 ** np.arange(bits)
    if offset:
        a[:n, :used, bits] = rng.uniform(-0.01, 0.01, (n, used))
    shape = (n_blocks, k_supers, bits, THREADS_PER_BLOCK, 4)
    packed = BCQPacked(n=n, k=k, bits=bits,
                       group_size=group_size if group_size in SUPPORTED_GROUP_SIZES else k,
                       dtype=dtype, has_offset=offset, qweight=np.zeros(0, dtype=np.uint32),
                       alphas=dtypes.to_bits(a, dtype))
    if device is None:
        return replace(packed, qweight=rng.integers(0, 2**32, size=shape, dtype=np.uint32))
    import cupy

    packed = packed.to_device(device)
    with cupy.cuda.Device(device):
        halves = cupy.random.RandomState(seed).randint(0, 1 << 16, size=(*shape, 2),
                                                       dtype=cupy.int32)
        qweight = (halves[..., 0].astype(cupy.uint32) << 16) | halves[..., 1].astype(cupy.uint32)
    return replace(packed, qweight=qweight)

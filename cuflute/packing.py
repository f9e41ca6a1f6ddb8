"""The packer: codes and scales -> the layout the kernel's fragments want (NumPy, offline).

Layout (the same picture stands at the top of cuda_src/lut_gemm.cuh)::

    qweight  uint32 [n_tiles][k_chunks][bits][32 lanes][4]    n_tiles = ceil(N/16)
                                                              k_chunks = ceil(K/256)
      one (tile, chunk) is 16 rows x 256 k; a warp reads it with `bits` coalesced 16-byte loads
      per lane. Lane = 4*gid + tig owns, in each of the chunk's 16 mma steps s, four pairs p of
      the m16n8k16 A fragment. The k order inside a chunk is permuted (the mma sums over k, so
      only x has to follow): step s covers k in [32 (s/2), +32), and lane tig's 8 codes of
      steps 2j and 2j+1 are the 8 consecutive k that one 16-byte load of x brings it:

        p=0: row gid,   k 32j + 8tig + 4(s%2) + {0, 1}      (j = s/2)
        p=1: row gid+8, k 32j + 8tig + 4(s%2) + {0, 1}
        p=2: row gid,   k 32j + 8tig + 4(s%2) + {2, 3}
        p=3: row gid+8, k 32j + 8tig + 4(s%2) + {2, 3}

      Each pair (q0 at the even k, q1 at the odd k) becomes one field per plane, and field
      i = 4s + p of a plane sits in word i // (32 / width) of it, rotated left by r (the field's
      bit b at the word's bit (r + b) % 32), the lane's words running through its 16-byte vectors
      in order:

        bits 4: one plane, width 8: field = q0 | q1 << 4          words 0..15   r = 8p
        bits 2: one plane, width 4: field = q0 | q1 << 2          words 0..7    r = 16(s%2) + 4p
        bits 3: bit planes, hi(q) = q >> 1 then lo(q) = q & 1:
                hi plane, width 4: hi(q0) | hi(q1) << 2           words 0..7    r = 8p + 2 + 4(s%2)
                lo plane, width 2: lo(q0) | lo(q1) << 1           words 8..11   r = 8p + 2(s%4)
                LUT field = hi field << 2 | lo field

      (3 bits: step s's hi word rotated right by 4(s%2) and its lo word shifted right by 2(s%4)
      hold pair p's hi field at bits [8p + 2, +4) and its lo field at [8p, +2), so one bitwise
      select of the two gives all four LUT fields of the step, one a byte.)

    scales   uint16 [n_tiles][n_groups][8 gid][2]   {S[16t + gid], S[16t + gid + 8]} as the dtype
    pair_lut uint32 [4**bits]                        low half T[q0], high half T[q1] of field f

Rows past N and k past K are padding: codes 0, scales 0. ``cuflute.reference`` inverts this.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import numpy as np

from . import dtypes
from .formats import SUPPORTED_GROUP_SIZES, QuantizedWeight

TILE_N = 16
CHUNK_K = 256
STEPS_PER_CHUNK = CHUNK_K // 16
LANES = 32
PAIRS = 4


def _fragment_coordinates():
    """(row in tile, k in chunk) of element e of pair p of each lane in each mma step s:
    two int arrays [16 steps, 32 lanes, 4 pairs, 2 elements]."""
    s = np.arange(STEPS_PER_CHUNK)[:, None, None, None]
    lane = np.arange(LANES)[None, :, None, None]
    p = np.arange(PAIRS)[None, None, :, None]
    e = np.arange(2)[None, None, None, :]
    gid, tig = lane // 4, lane % 4
    row = gid + 8 * (p & 1) + 0 * (s + e)
    k = 32 * (s // 2) + 8 * tig + 4 * (s % 2) + 2 * (p >> 1) + e
    return row, k


FRAGMENT_ROW, FRAGMENT_K = _fragment_coordinates()

# Field widths of each plane, in the order the planes follow each other in a lane's words.
PLANE_WIDTHS = {4: (8,), 2: (4,), 3: (4, 2)}


def plane_fields(q0: np.ndarray, q1: np.ndarray, bits: int) -> list[np.ndarray]:
    """The field of each plane for code pairs (q0, q1), in the order of PLANE_WIDTHS[bits]."""
    if bits == 3:
        return [(q0 >> 1) | ((q1 >> 1) << 2), (q0 & 1) | ((q1 & 1) << 1)]
    return [q0 | (q1 << bits)]


def lut_field(fields: list[np.ndarray], bits: int) -> np.ndarray:
    """The pair-LUT index the kernel forms from the plane fields."""
    return (fields[0] << 2) | fields[1] if bits == 3 else fields[0]


def lut_field_codes(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(q0, q1) of every pair-LUT index 0 .. 4**bits - 1."""
    q = np.arange(2**bits, dtype=np.int64)
    q0, q1 = np.meshgrid(q, q, indexing="ij")
    f = lut_field(plane_fields(q0, q1, bits), bits)
    c0 = np.empty(4**bits, dtype=np.int64)
    c1 = np.empty(4**bits, dtype=np.int64)
    c0[f.ravel()] = q0.ravel()
    c1[f.ravel()] = q1.ravel()
    return c0, c1


def field_rotations(bits: int) -> list[np.ndarray]:
    """Each plane's left rotation r of field i = 4s + p in its word (the layout above): int64
    arrays [64], in the order of PLANE_WIDTHS[bits]."""
    s, p = np.divmod(np.arange(STEPS_PER_CHUNK * PAIRS), PAIRS)
    if bits == 4:
        return [8 * p]
    if bits == 2:
        return [16 * (s % 2) + 4 * p]
    return [8 * p + 2 + 4 * (s % 2), 8 * p + 2 * (s % 4)]


def _rotate_left(v: np.ndarray, r: np.ndarray) -> np.ndarray:
    v = v.astype(np.uint64)
    r = np.asarray(r, dtype=np.uint64) % 32
    return ((v << r) | (v >> (32 - r))) & 0xFFFFFFFF


def pack_fields(fields: np.ndarray, width: int, rotations: np.ndarray) -> np.ndarray:
    """fields [..., 64] (each < 2**width) -> uint32 words [..., 64 * width / 32], field i rotated
    left by rotations[i] into word i // (32 / width)."""
    f = _rotate_left(fields, rotations).reshape(*fields.shape[:-1], -1, 32 // width)
    return np.bitwise_or.reduce(f, axis=-1).astype(np.uint32)


def unpack_fields(words: np.ndarray, width: int, rotations: np.ndarray) -> np.ndarray:
    """The inverse of pack_fields: uint32 words [..., W] -> fields [..., W * 32 / width]."""
    word_of_field = np.repeat(words, 32 // width, axis=-1)
    return (_rotate_left(word_of_field, 32 - rotations) & ((1 << width) - 1)).astype(np.int64)


def kernel_group(group_size: int, k: int) -> int:
    """The kernel's GROUP template argument: the group size, or 0 for one group per row."""
    return group_size if group_size in SUPPORTED_GROUP_SIZES else 0


def padded_groups(group_size: int, k: int) -> int:
    """Scale groups per row in the packed layout: K padded to whole chunks, or 1 per row."""
    group = kernel_group(group_size, k)
    return 1 if group == 0 else -(-k // CHUNK_K) * CHUNK_K // group


def packed_nbytes(n: int, k: int, bits: int, group_size: int | None) -> int:
    """Bytes of the PackedWeight that pack() makes for an [n, k] weight (group_size None or k:
    one scale per row): qweight, scales and pair LUT."""
    n_tiles, k_chunks = -(-n // TILE_N), -(-k // CHUNK_K)
    qweight = n_tiles * k_chunks * bits * LANES * 4 * 4
    scales = n_tiles * padded_groups(group_size, k) * 8 * 2 * 2
    return qweight + scales + 4**bits * 4


@dataclass(frozen=True)
class PackedWeight:
    """A weight in the kernel's layout. Arrays are NumPy (host) or CuPy (on ``device``)."""

    n: int
    k: int
    bits: int
    group_size: int  # == k: one scale per row
    dtype: str
    table: np.ndarray  # float64 [2**bits], as given to the quantizer
    qweight: object  # uint32 [n_tiles, k_chunks, bits, 32, 4]
    scales: object  # uint16 [n_tiles, n_groups, 8, 2]
    pair_lut: object  # uint32 [4**bits]
    device: int | None = None

    @property
    def n_tiles(self) -> int:
        return -(-self.n // TILE_N)

    @property
    def k_chunks(self) -> int:
        return -(-self.k // CHUNK_K)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def kernel_group(self) -> int:
        return kernel_group(self.group_size, self.k)

    @property
    def nbytes(self) -> int:
        return int(self.qweight.nbytes + self.scales.nbytes + self.pair_lut.nbytes)

    def to_device(self, device: int | None = None) -> "PackedWeight":
        """A copy whose arrays live on CUDA device ``device`` (default: CuPy's current one)."""
        import cupy

        dev = cupy.cuda.Device(device)
        with dev:
            return replace(
                self,
                qweight=cupy.asarray(self.qweight),
                scales=cupy.asarray(self.scales),
                pair_lut=cupy.asarray(self.pair_lut),
                device=dev.id,
            )

    def take_tiles(self, tiles) -> "PackedWeight":
        """The rows of whole 16-row tiles ``tiles`` (each below n // 16), as a host PackedWeight:
        a small piece of a large weight for checking a kernel against cuflute.reference."""
        tiles = np.asarray(tiles, dtype=np.int64)
        if tiles.size and (tiles.min() < 0 or tiles.max() >= self.n // TILE_N):
            raise ValueError(f"tiles must be whole tiles below {self.n // TILE_N}, got {tiles}")
        if self.device is not None:
            import cupy

            tiles = cupy.asarray(tiles)
        return replace(self, n=TILE_N * len(tiles), qweight=self.qweight[tiles],
                       scales=self.scales[tiles]).to_host()

    def to_host(self) -> "PackedWeight":
        if self.device is None:
            return self
        return replace(
            self,
            qweight=self.qweight.get(),
            scales=self.scales.get(),
            pair_lut=self.pair_lut.get(),
            device=None,
        )

    def __repr__(self) -> str:
        where = "host" if self.device is None else f"cuda:{self.device}"
        group = "per-channel" if self.kernel_group == 0 else self.group_size
        return (f"PackedWeight(n={self.n}, k={self.k}, bits={self.bits}, group_size={group}, "
                f"dtype={self.dtype}, {where})")


def pair_lut(table: np.ndarray, bits: int, dtype: str) -> np.ndarray:
    """uint32 [4**bits]: entry f holds {T[q0], T[q1]} as two ``dtype`` halves (q0 in the low one)."""
    t = dtypes.to_bits(table, dtype).astype(np.uint32)
    c0, c1 = lut_field_codes(bits)
    return t[c0] | (t[c1] << 16)


def pack(qw: QuantizedWeight, dtype: str = "float16") -> PackedWeight:
    """Restructure a QuantizedWeight for the kernel, with scales and table in ``dtype``."""
    dtype = dtypes.check_dtype(dtype)
    bits, codes = qw.bits, np.asarray(qw.codes)
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"K must be a multiple of 8 (x is read 16 bytes at a time), got K = {k}")
    if codes.max(initial=0) >= 2**bits:
        raise ValueError(f"codes must be < 2**bits = {2**bits}, got {codes.max()}")
    n_tiles, k_chunks = -(-n // TILE_N), -(-k // CHUNK_K)
    padded = np.zeros((n_tiles * TILE_N, k_chunks * CHUNK_K), dtype=np.uint32)
    padded[:n, :k] = codes

    # [tile, row, chunk, k] -> [tile, chunk, step, lane, pair, element]
    blocks = padded.reshape(n_tiles, TILE_N, k_chunks, CHUNK_K).transpose(0, 2, 1, 3)
    frag = blocks[:, :, FRAGMENT_ROW, FRAGMENT_K]
    fields = plane_fields(frag[..., 0], frag[..., 1], bits)
    words = []
    for f, width, rotations in zip(fields, PLANE_WIDTHS[bits], field_rotations(bits)):
        per_lane = f.transpose(0, 1, 3, 2, 4).reshape(n_tiles, k_chunks, LANES, -1)  # i = 4s + p
        words.append(pack_fields(per_lane, width, rotations))
    lane_words = np.concatenate(words, axis=-1)  # [tile, chunk, lane, 4 * bits]
    qweight = lane_words.reshape(n_tiles, k_chunks, LANES, bits, 4).transpose(0, 1, 3, 2, 4)

    n_groups = padded_groups(qw.group_size, k)
    s = np.zeros((n_tiles * TILE_N, n_groups), dtype=np.float64)
    s[:n, : qw.scales.shape[1]] = qw.scales
    s_bits = dtypes.to_bits(s, dtype).reshape(n_tiles, 2, 8, n_groups).transpose(0, 3, 2, 1)

    return PackedWeight(
        n=n,
        k=k,
        bits=bits,
        group_size=qw.group_size,
        dtype=dtype,
        table=qw.table,
        qweight=np.ascontiguousarray(qweight, dtype=np.uint32),
        scales=np.ascontiguousarray(s_bits, dtype=np.uint16),
        pair_lut=pair_lut(qw.table, bits, dtype),
    )



def random_packed(n: int, k: int, bits: int = 4, group_size: int = 128, dtype: str = "float16",
                  device: int | None = None, seed: int = 0, table="nf") -> PackedWeight:
    """A valid packed weight with uniformly random codes and scales in [0.01, 0.03].

    Every bit pattern of qweight is a valid set of codes, so large benchmark weights are drawn
    directly in the packed layout (on ``device`` when given) instead of quantized in NumPy.
    """
    from .formats import resolve_table

    dtype = dtypes.check_dtype(dtype)
    values = resolve_table(table, bits)
    n_tiles, k_chunks = -(-n // TILE_N), -(-k // CHUNK_K)
    group = kernel_group(group_size, k)
    n_groups = padded_groups(group_size, k)
    used_groups = 1 if group == 0 else k // group
    s = np.zeros((n_tiles * TILE_N, n_groups))
    s[:n, :used_groups] = np.random.default_rng(seed).uniform(0.01, 0.03, (n, used_groups))
    scales = dtypes.to_bits(s, dtype).reshape(n_tiles, 2, 8, n_groups).transpose(0, 3, 2, 1)
    packed = PackedWeight(
        n=n, k=k, bits=bits, group_size=group_size if group else k, dtype=dtype, table=values,
        qweight=np.zeros(0, dtype=np.uint32),
        scales=np.ascontiguousarray(scales),
        pair_lut=pair_lut(values, bits, dtype),
    )
    if device is None:
        xp, place = np, contextlib.nullcontext()
    else:
        import cupy as xp

        packed, place = packed.to_device(device), xp.cuda.Device(device)
    with place:
        shape = (n_tiles, k_chunks, bits, LANES, 4)
        halves = xp.random.RandomState(seed).randint(0, 1 << 16, size=(*shape, 2), dtype=xp.int32)
        qweight = (halves[..., 0].astype(xp.uint32) << 16) | halves[..., 1].astype(xp.uint32)
    return replace(packed, qweight=qweight)

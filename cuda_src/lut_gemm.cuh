// cuflute LUT GEMM:  y[M, N] = x[M, K] @ W'[N, K]^T,   W'[n, k] = T[Q[n, k]] * S[n, k / g]
//
// x, y: row-major, float16 or bfloat16; accumulation in float32 on the tensor cores.
// Q: b-bit codes (b = BITS), T: the 2^b-entry lookup table, S: one scale per group of g = GROUP
// consecutive k in a row (GROUP == 0: one scale per row).
//
// The weight is the mma A operand (16 rows of n by 16 of k), x^T the B operand (16 k by 8 m):
// at decode sizes M is small, so the 8-wide side of m16n8k16 goes to M. The A operand is the
// table value T[q] alone; each group's partial sums are scaled in float32 when the group ends.
// A warp of 16 or more 16 x 8 tiles (WarpTile::kScaleA) has no registers for those partial sums:
// it multiplies the A operand by the scale instead, in T, and reads its code words from the stage
// as the steps reach them rather than a whole chunk's at once.
//
// One CTA per (m block, strip of WN x NT tiles): WN x WK warps, WN side by side along n, each
// with NT tiles, and WK along K splitting the K chunks. Each warp streams its chunks through a
// private cp.async pipeline, looks code pairs up in the shared pair LUT and runs mma against x;
// the WK warps of a column add their sums in shared memory at the end. The WN warps of a row read
// the same x: at M >= 16 re-reading x from L2 for every 16 or 32 weight rows, not the weight, is
// what fills L2 (docs/PERF_NOTES.md), so with XS = kXShared they copy it into shared memory once
// between them.
// (A persistent Stream-K variant measured slower at every shape: docs/PERF_NOTES.md.) On sm_90
// cuflute.gemm launches it as a programmatic dependent launch: launch_dependent_grids below.
// lut_gemm_split (sm_90) is the same CTA in a thread-block cluster of KS CTAs along K: CTA z of
// the cluster takes the z-th of KS contiguous ranges of chunks, and the cluster adds its CTAs'
// sums through their shared memory (DSMEM), each CTA storing 1/KS of the outputs. That buys the
// CTAs that sharing x across many rows (large WN) would otherwise leave too few of.
//
// Template parameters
//   BITS    code width in bits: 2, 3 or 4
//   GROUP   scale group size in k elements: 32, 64, 128, 256, or 0 for one group per row
//   T       __half or __nv_bfloat16
//   NT      16-row n tiles per warp: a strip is NT tiles, 16 * NT output rows
//   MT      8-column m tiles (1, 2, 4 or 8): blockIdx.x steps M by 8 * MT, blockIdx.y N by
//           16 * NT * WN
//   WN      warps side by side along n
//   WK      warps along K
//   STAGES  depth of each warp's cp.async pipeline: STAGES - 1 chunks in flight while one is
//           computed (every lane copies, then reads back, only its own bytes: no barrier needed,
//           except for kXShared's x)
//   XS      where the B fragments (x) come from:
//           kXGlobal  global memory, loaded one batch ahead;
//           kXWarp    the warp's pipeline stage: a lane copies the 16-byte pieces of x its B
//                     fragments take along with the codes (at M >= 16 most x loads miss L1, and
//                     one batch ahead is too short for L2's latency);
//           kXShared  one copy a stage for the WN warps of a K slice, each copying 1/WN of the
//                     pieces (whole m tiles where WN divides MT, else every WN-th step pair of
//                     each), in the same per-lane order; a named barrier per chunk (WN > 1)
//           kXRow     M = 1 only (MT = 1): the warp's pipeline stage holds the chunk's 256 values
//                     of the one row, 512 bytes in k order, instead of kXWarp's 8 rows of
//                     fragments (4 KiB, 7/8 of it zeros at M = 1): more CTAs an SM
//   COPIES  copies of the pair LUT in shared memory: 32 or 16 (CodeLayout)
//   WIDE    1: the LUT's entries 256 bytes apart, not 4 * COPIES (32 copies; 4-bit lookups one
//           prmt each: CodeLayout)
//   KS      CTAs of a cluster splitting K (lut_gemm_split; 1: lut_gemm, no cluster)
//
// Dynamic shared memory (cuflute.kernels.KernelSpec.shared_bytes computes the same):
//   [pair LUT x COPIES (x 2: WIDE)][STAGES][WN * WK warps][NT * BITS code vectors][32 lanes] uint4
//                                                         [NT * groups per chunk][8 row pairs] u32
//                                                kXWarp:  [MT][8 step pairs][32 lanes]       uint4 (x)
//                                                kXRow:   [256 k of row m0]                  T     (x)
//   kXShared: [STAGES][WK K slices][MT][8 step pairs][32 lanes]               uint4 (x)
//   and, once the K loop is over, the warps' partial sums from the start (WK > 1 or KS > 1).
//
// Packed layout (produced by cuflute.packing.pack, inverted by cuflute.reference.unpack_codes)
//
//   qweight: uint4 [n_tiles][k_chunks][BITS][32 lanes]     n_tiles = ceil(N/16), k_chunks = ceil(K/256)
//
//   One warp streams one (n tile, chunk) = 16 rows x 256 k with BITS coalesced 16-byte loads per
//   lane. The lane's 4*BITS words hold, for each of the chunk's 16 mma steps s, the codes of
//   exactly the 8 A-fragment elements that lane owns, as 4 pairs p (one register each). The k
//   order inside a chunk is permuted so that the x values a lane needs for steps 2j and 2j+1 are
//   8 consecutive elements, one 16-byte load (the mma sums over k; only x has to follow):
//
//     lane = 4*gid + tig      p=0: row gid,   k 32j + 8tig + 4(s%2) + {0, 1}     (j = s/2)
//                             p=1: row gid+8, k 32j + 8tig + 4(s%2) + {0, 1}
//                             p=2: row gid,   k 32j + 8tig + 4(s%2) + {2, 3}
//                             p=3: row gid+8, k 32j + 8tig + 4(s%2) + {2, 3}
//
//   so step s lies inside k [32j, 32j + 32): inside one scale group. Each pair is one field that
//   indexes the pair LUT directly (a shift and a mask):
//     BITS 4: word s,         bits [8p, 8p+8)            field = q0 | q1 << 4
//     BITS 2: word s/2,       bits [16(s%2)+4p, +4)      field = q0 | q1 << 2
//     BITS 3: two bit planes, hi(q) = q >> 1 and lo(q) = q & 1:
//             word s/2,       bits [8p+2+4(s%2), +4)     hi field = hi(q0) | hi(q1) << 2
//                             (mod 32: odd steps' p = 3 field is bits 30, 31, 0, 1)
//             word 8 + s/4,   bits [8p+2(s%4), +2)       lo field = lo(q0) | lo(q1) << 1
//             field = hi field << 2 | lo field
//             The hi word rotated right by 4(s%2) and the lo word shifted right by 2(s%4) hold
//             pair p's hi field at bits [8p+2, +4) and lo field at [8p, +2): one select of the
//             two makes the step's four fields, one a byte, and each pair then costs a shift
//             and a mask as with 4 bits.
//   (q0 is the code at the lower k, q1 at the next k of the pair.)
//
//   scales:   pair_t [n_tiles][n_groups][8 gid]   word = {S[16 tile + gid], S[16 tile + gid + 8]}
//   pair_lut: pair_t [4^BITS]                     entry f = {T[q0], T[q1]} for the field f above
//
// Rows past N and k past K are padding: their codes are 0, their scales 0, and x is never read there.


#pragma once
#include "dtype_traits.cuh"

namespace cuflute {

constexpr int kChunkK = 256;              // k per (tile, chunk): 16 mma steps of k16
constexpr int kStepsPerChunk = kChunkK / 16;

// Where the B fragments come from: the template parameter XS (cuflute.kernels.X_GLOBAL, ...).
constexpr int kXGlobal = 0, kXWarp = 1, kXShared = 2, kXRow = 3;

// v moved so that its bit `from` lands on bit `to` (both compile-time after unrolling).
__device__ __forceinline__ u32 move_bits(u32 v, int from, int to) {
  return from >= to ? v >> (from - to) : v << (to - from);
}

// The bits of a where mask is set, of b elsewhere. One lop3 that the compiler cannot split: left
// to itself it pushes the masks of a select into each of its four uses (the 3-bit fields below),
// three instructions a pair instead of one a step (sm_90 SASS: 811 -> 628 a chunk, nt2_mt1_wk8).
template <u32 MASK> __device__ __forceinline__ u32 select_bits(u32 a, u32 b) {
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xE4;" : "=r"(d) : "r"(a), "r"(b), "n"(MASK));  // (a & c) | (b & ~c)
  return d;
}

template <int BITS, int COPIES = 32, int WIDE = 0> struct CodeLayout {
  static_assert(BITS >= 2 && BITS <= 4, "BITS must be 2, 3 or 4");
  static constexpr int kWords = 4 * BITS;                 // per lane per (tile, chunk)
  static constexpr int kLutEntries = 1 << (2 * BITS);
  // The pair LUT sits in shared memory COPIES times, interleaved: entry f of copy c at byte
  // 4 (kLutCopies f + c). Lane l reads copy l % kLutCopies; with 32 copies every lane has a bank
  // of its own whatever the fields (32 KiB for 4 bits, 8 KiB for 3, 2 KiB for 2); with 16, lanes
  // l and l + 16 share one and collide when their entries differ by an even number (half the
  // size, so more CTAs an SM where shared memory is what limits them).
  static constexpr int kLutCopies = COPIES;
  // WIDE: the entries 256 bytes apart instead of 128 (32 copies), the upper half of each unused,
  // so that a 4-bit pair's field, a byte of its code word, becomes the entry's byte offset by
  // moving it to bits 8 to 15 with one byte permute that also brings in the lane's bank: one
  // prmt a lookup instead of a shift and a lop3 (docs/PERF_NOTES.md v29).
  static_assert(WIDE == 0 || COPIES == 32, "a wide LUT has 32 copies");
  static constexpr int kEntryShift = (COPIES == 32 ? 7 : COPIES == 16 ? 6 : 5) + WIDE;
  static_assert(4 * kLutCopies << WIDE == 1 << kEntryShift, "COPIES must be 8, 16 or 32");
  static constexpr int kLutBytes = kLutEntries << kEntryShift;
  // Byte offset of the 16 bytes (four copies) of dense vector i, i / (COPIES / 4) the entry.
  static __device__ constexpr u32 vector_offset(u32 i) {
    return (i / (kLutCopies / 4)) << kEntryShift | 16 * (i % (kLutCopies / 4));
  }

  // The first of a chunk's mma steps that reads a lane's code vector v (words 4v to 4v + 3):
  // step s reads word s (4 bits), s / 2 (2 bits), or s / 2 and 8 + s / 4 (3 bits).
  static __device__ constexpr int first_step(int v) {
    return BITS == 4 ? 4 * v : BITS == 2 ? 8 * v : v == 1 ? 8 : 0;
  }

  // Byte offset of pair p of step s in that LUT, for the lane whose copy starts at lane_bytes:
  // the field is moved straight to bit kEntryShift, masked, and or-ed with the lane's bank.
  static __device__ __forceinline__ u32 lut_offset(const u32 (&w)[kWords], int s, int p,
                                                   u32 lane_bytes) {
    constexpr int e = kEntryShift;
    if constexpr (BITS == 4 && WIDE) {
      return __byte_perm(w[s], lane_bytes, 0x5504 | p << 4);  // {0, 0, byte p, lane_bytes}
    } else if constexpr (BITS == 4) {
      return (move_bits(w[s], 8 * p, e) & (0xFFu << e)) | lane_bytes;
    } else if constexpr (BITS == 2) {
      return (move_bits(w[s >> 1], 16 * (s & 1) + 4 * p, e) & (0xFu << e)) | lane_bytes;
    } else {  // the same select for the four pairs of a step: the compiler keeps one
      const u32 hi = s & 1 ? __funnelshift_r(w[s >> 1], w[s >> 1], 4) : w[s >> 1];
      const u32 fields = select_bits<0x3C3C3C3Cu>(hi, w[8 + (s >> 2)] >> (2 * (s & 3)));
      return (move_bits(fields, 8 * p, e) & (0x3Fu << e)) | lane_bytes;
    }
  }
};

// What one warp holds for one strip of NT tiles and MT m tiles.
template <int BITS, int GROUP, int NT, int MT, int XS = kXGlobal> struct WarpTile {
  static_assert(MT == 1 || MT == 2 || MT == 4 || MT == 8, "MT must be 1, 2, 4 or 8");
  // The A operand scaled instead of the sums (the header's first paragraph): the accumulators of
  // 16 tiles take 64 registers, and a second set 64 more.
  static constexpr bool kScaleA = NT * MT >= 16;
  static constexpr int kGroupK = GROUP == 0 ? kChunkK : GROUP;  // k per scale group in a chunk
  static_assert(kGroupK >= 32 && kChunkK % kGroupK == 0, "GROUP must be 0 or divide 256");
  static constexpr int kGroupsPerChunk = kChunkK / kGroupK;
  static constexpr int kStepsPerGroup = kGroupK / 16;
  static constexpr int kWords = CodeLayout<BITS>::kWords;
  static constexpr int kCodeVectors = NT * BITS;                  // uint4 per lane per stage
  // A stage holds the scales once, not a copy a lane: tile nt's group j is 8 words (one a row
  // pair) at word 8 (nt * kGroupsPerChunk + j), as in global memory, copied 16 bytes a lane.
  static constexpr int kScaleVectors = 2 * NT * kGroupsPerChunk;  // uint4 per stage
  static_assert(XS != kXRow || MT == 1, "kXRow holds one row of x: MT must be 1");
  static constexpr int kXVectors = MT * kStepsPerChunk / 2;       // uint4 per lane of a chunk's x
  static constexpr int kXBytes = XS == kXRow ? 2 * kChunkK : 32 * 16 * kXVectors;
  static constexpr int kXOffset = 32 * 16 * kCodeVectors + 16 * kScaleVectors;
  static constexpr int kStageBytes = kXOffset + (XS == kXWarp || XS == kXRow ? kXBytes : 0);
  // x goes in batches of kPairsPerBatch step pairs for MT m tiles: 16 registers a batch (32 at
  // MT = 8), two batches live at once (the one in use and the one in flight).
  static constexpr int kPairsPerBatch = MT <= 4 ? 4 / MT : 1;
  static constexpr int kBatches = kStepsPerChunk / 2 / kPairsPerBatch;
  using Codes = u32[NT][kWords];
  using Scales = u32[NT][kGroupsPerChunk];
  // A lane's code vector v of tile nt, and its scale word of group j of tile nt, in a stage (the
  // stage's bytes: the code vectors, then the scale words, then from kXOffset on x).
  static __device__ __forceinline__ uint4 stage_code_vector(const unsigned char* stage, int lane,
                                                            int nt, int v) {
    return reinterpret_cast<const uint4*>(stage)[32 * (nt * BITS + v) + lane];
  }
  static __device__ __forceinline__ u32 stage_scale(const unsigned char* stage, int lane, int nt,
                                                    int j) {
    return reinterpret_cast<const u32*>(stage + 32 * 16 * kCodeVectors)[8 * (nt * kGroupsPerChunk + j) + (lane >> 2)];
  }
  using XBatch = uint4[kPairsPerBatch][MT];
  using Acc = float[NT][MT][4];
};

template <int BITS, int GROUP, int NT, int MT, int WARPS, int WK, int STAGES, int XS, int COPIES,
          int WIDE, int KS>
struct SharedLayout {
  using Tile = WarpTile<BITS, GROUP, NT, MT, XS>;
  static constexpr int kLutBytes = CodeLayout<BITS, COPIES, WIDE>::kLutBytes;
  static constexpr int kWarpStagesBytes = STAGES * WARPS * Tile::kStageBytes;
  static constexpr int kSharedXBytes = XS == kXShared ? STAGES * WK * Tile::kXBytes : 0;
  static constexpr int kPipelineBytes = kLutBytes + kWarpStagesBytes + kSharedXBytes;
  static constexpr int kPartialBytes = WK > 1 || KS > 1 ? WARPS * NT * MT * 4 * 32 * 4 : 0;  // the warps' sums
  static constexpr int kBytes = kPipelineBytes > kPartialBytes ? kPipelineBytes : kPartialBytes;
  // Stage s of warp w, lane 0's bytes: codes, then scales, then (kXWarp) x.
  static __device__ __forceinline__ unsigned char* stage(unsigned char* smem, int warp, int i) {
    return smem + kLutBytes + ((i % STAGES) * WARPS + warp) * Tile::kStageBytes;
  }
  // kXShared: the x of the i-th chunk of K slice wk, lane 0's first piece.
  static __device__ __forceinline__ unsigned char* shared_x(unsigned char* smem, int wk, int i) {
    return smem + kLutBytes + kWarpStagesBytes + ((i % STAGES) * WK + wk) * Tile::kXBytes;
  }
};

__device__ __forceinline__ u32 shared_address(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1 (weights are read once); zero-filled when !valid.
__device__ __forceinline__ void copy_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(shared_address(dst)), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n"); }

// Barrier `id` (1 to 15; 0 is __syncthreads') over the first `threads` threads that reach it.
__device__ __forceinline__ void sync_named(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}

// Programmatic dependent launch (sm_90; no-ops before it, and when the grid was launched
// without the attribute). The trigger lets the next grid in the stream, if launched with the
// attribute, start once every CTA of this one has run it; the wait returns once the grid
// before this one has finished and its writes are visible. x and y are not touched before the
// wait. The weight (codes, scales, pair LUT) is read before it: a grid runs ahead of the wait
// only behind a grid that triggers early, which in cuflute is lut_gemm, and that writes only
// its y. So the one rule is that the y of a call is not the weight of the call after it.
__device__ __forceinline__ void launch_dependent_grids() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_prior_grid() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Thread-block clusters (sm_90; lut_gemm_split only). The barrier orders every CTA's shared
// memory writes before it against every CTA's reads after it.
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n"
               "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// The float at shared address `address` (of this CTA's window) in cluster CTA `rank`'s memory.
__device__ __forceinline__ float load_cluster_shared(u32 address, u32 rank) {
  float v = 0.f;
#if __CUDA_ARCH__ >= 900
  u32 remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(address), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
#endif
  return v;
}

template <int N> __device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

__device__ __forceinline__ void check_dynamic_shared(u32 needed) {
  u32 dynamic_bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_bytes));
  if (dynamic_bytes < needed) __trap();  // launched with less than KernelSpec.shared_bytes
}

// The pair LUT, COPIES interleaved copies, written four copies (16 bytes) a store by the CTA's
// THREADS threads. Each thread issues all its loads before its first store, so that it waits
// out one L2 latency, not one a store (the LUT is built while the first chunks are in flight,
// and every CTA builds it).
template <int BITS, int COPIES, int WIDE, int THREADS>
__device__ __forceinline__ void fill_lut(unsigned char* smem, const u32* __restrict__ pair_lut,
                                         u32 thread) {
  using Layout = CodeLayout<BITS, COPIES, WIDE>;
  constexpr u32 kCopies = Layout::kLutCopies;
  constexpr u32 kVectors = Layout::kLutEntries * kCopies / 4;
  constexpr u32 kPerThread = (kVectors + THREADS - 1) / THREADS;
  u32 v[kPerThread];
#pragma unroll
  for (u32 j = 0; j < kPerThread; ++j) {
    const u32 i = thread + j * THREADS;
    if (kVectors % THREADS == 0 || i < kVectors) v[j] = __ldg(pair_lut + i / (kCopies / 4));
  }
#pragma unroll
  for (u32 j = 0; j < kPerThread; ++j) {
    const u32 i = thread + j * THREADS;
    if (kVectors % THREADS == 0 || i < kVectors)
      *reinterpret_cast<uint4*>(smem + Layout::vector_offset(i)) = make_uint4(v[j], v[j], v[j], v[j]);
  }
}

// Start copying the codes and scales of tiles [tile0, tile0 + NT) x chunk c into a stage.
// Tiles past the last are zero-filled (their codes index LUT entry 0, their scales are 0).
template <int BITS, int GROUP, int NT>
__device__ __forceinline__ void copy_chunk_async(unsigned char* stage, const uint4* __restrict__ qweight,
                                                 const u32* __restrict__ scales, int tile0, int c,
                                                 int n_tiles, int k_chunks, int n_groups, int lane) {
  using Tile = WarpTile<BITS, GROUP, NT, 1>;
  uint4* codes_dst = reinterpret_cast<uint4*>(stage) + lane;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int tile = min(tile0 + nt, n_tiles - 1);
    const uint4* src = qweight + ((long long)tile * k_chunks + c) * BITS * 32 + lane;
#pragma unroll
    for (int v = 0; v < BITS; ++v) copy_async_16(codes_dst + 32 * (nt * BITS + v), src + 32 * v, tile0 + nt < n_tiles);
  }
  // A tile's scales of chunk c, kGroupsPerChunk groups of 8 words, are contiguous in global memory.
  constexpr int kPiecesPerTile = Tile::kScaleVectors / NT;
  uint4* scales_dst = reinterpret_cast<uint4*>(stage + 32 * 16 * Tile::kCodeVectors);
  const int group = GROUP == 0 ? 0 : c * Tile::kGroupsPerChunk;
#pragma unroll
  for (int i = 0; i < (Tile::kScaleVectors + 31) / 32; ++i) {
    const int p = lane + 32 * i;
    if (Tile::kScaleVectors % 32 == 0 || p < Tile::kScaleVectors) {
      const int nt = p / kPiecesPerTile;
      const int tile = min(tile0 + nt, n_tiles - 1);
      copy_async_16(scales_dst + p, scales + ((long long)tile * n_groups + group) * 8 + 4 * (p % kPiecesPerTile),
                    tile0 + nt < n_tiles);
    }
  }
}

// kXWarp, kXShared: start copying the x pieces of chunk c that this lane's B fragments of m tiles
// [first_tile, first_tile + MT) take (x_lane, as load_x reads them) into the chunk's copy, whose
// first piece of this lane is dst; rows past M and k past K are zero-filled, not read. Piece
// (first_tile + mt) * 8 + j goes when j is `part` modulo PARTS: PARTS warps fill one copy between
// them. A warp's j are part, part + PARTS, ...: a run-time offset, not a test of every piece
// (which cost each warp the address and predicate of all the pieces it skipped: docs/PERF_NOTES.md
// v24). PARTS == 1 keeps the loop order it had, whose registers ptxas fits in 255 for five n tiles
// of two m tiles (the other spills).
template <int MT, int PARTS>
__device__ __forceinline__ void copy_x_async(uint4* dst, const uint4* const (&x_lane)[MT],
                                             const bool (&row_valid)[MT], int c, int K, int part,
                                             int first_tile, int lane) {
  constexpr int kPairs = kStepsPerChunk / 2;
  static_assert(kPairs % PARTS == 0, "PARTS warps must split a chunk's 8 step pairs evenly");
  if constexpr (PARTS == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        const int k = c * kChunkK + 32 * j + 8 * (lane & 3);
        copy_async_16(dst + 32 * ((first_tile + mt) * kPairs + j), x_lane[mt] + (c * kChunkK + 32 * j) / 8,
                      row_valid[mt] && k < K);
      }
  } else {
    const bool full_chunk = (c + 1) * kChunkK <= K;
#pragma unroll
    for (int i = 0; i < kPairs / PARTS; ++i) {
      const int j = part + i * PARTS;
      const int k = c * kChunkK + 32 * j;
      const bool k_valid = full_chunk || k + 8 * (lane & 3) < K;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        copy_async_16(dst + 32 * ((first_tile + mt) * kPairs + j), x_lane[mt] + k / 8,
                      row_valid[mt] && k_valid);
    }
  }
}

// kXRow: start copying the 256 x values of chunk c of the row at x_row into dst, 16 bytes a
// lane in k order; k past K is zero-filled, not read.
__device__ __forceinline__ void copy_x_row_async(uint4* dst, const uint4* x_row, int c, int K,
                                                 int lane) {
  copy_async_16(dst + lane, x_row + c * kChunkK / 8 + lane, c * kChunkK + 8 * lane < K);
}

// Words 4v to 4v + 3 of a lane's code words: its code vector v.
template <int BITS>
__device__ __forceinline__ void set_code_vector(u32 (&w)[4 * BITS], int v, const uint4& q) {
  w[4 * v + 0] = q.x;
  w[4 * v + 1] = q.y;
  w[4 * v + 2] = q.z;
  w[4 * v + 3] = q.w;
}

// A lane's 4 * BITS code words of one (tile, chunk) from its BITS 16-byte vectors, 32 vectors
// apart from src, its first (the packed layout in global memory).
template <int BITS>
__device__ __forceinline__ void unpack_code_words(u32 (&w)[4 * BITS], const uint4* src) {
#pragma unroll
  for (int v = 0; v < BITS; ++v) set_code_vector<BITS>(w, v, __ldg(src + 32 * v));
}

template <int BITS, int GROUP, int NT, int MT>
__device__ __forceinline__ void read_stage(const unsigned char* stage, int lane,
                                           typename WarpTile<BITS, GROUP, NT, MT>::Codes& w,
                                           typename WarpTile<BITS, GROUP, NT, MT>::Scales& sw) {
  using Tile = WarpTile<BITS, GROUP, NT, MT>;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int v = 0; v < BITS; ++v) set_code_vector<BITS>(w[nt], v, Tile::stage_code_vector(stage, lane, nt, v));
#pragma unroll
    for (int j = 0; j < Tile::kGroupsPerChunk; ++j) sw[nt][j] = Tile::stage_scale(stage, lane, nt, j);
  }
}

// B fragments come from x[m0 + 8 mt + gid][32 j + 8 tig, +8); row_valid[mt]: that row is one of
// x's M. Rows past M read row M-1 instead (copies zero-fill them): their output columns are never
// stored.
template <typename T, int MT>
__device__ __forceinline__ void x_rows(const uint4* (&x_lane)[MT], bool (&row_valid)[MT], const T* x,
                                       long long x_row_stride, int m0, int M, int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = m0 + 8 * mt + (lane >> 2);
    row_valid[mt] = row < M;
    x_lane[mt] = reinterpret_cast<const uint4*>(x + (long long)min(row, M - 1) * x_row_stride + 8 * (lane & 3));
  }
}

// x of batch `batch` of chunk c (16-byte loads; k past K reads as zeros).
template <int BITS, int GROUP, int NT, int MT>
__device__ __forceinline__ void load_x(typename WarpTile<BITS, GROUP, NT, MT>::XBatch& xv,
                                       const uint4* const (&x_lane)[MT], int c, int batch, int K, int tig) {
  using Tile = WarpTile<BITS, GROUP, NT, MT>;
  const bool full_chunk = (c + 1) * kChunkK <= K;
#pragma unroll
  for (int b = 0; b < Tile::kPairsPerBatch; ++b) {
    const int k = c * kChunkK + 32 * (batch * Tile::kPairsPerBatch + b);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      xv[b][mt] = full_chunk || k + 8 * tig < K ? __ldg(x_lane[mt] + k / 8) : make_uint4(0, 0, 0, 0);
  }
}

// kXWarp, kXShared: x of batch `batch` from the stage's copy (x_stage: this lane's first piece).
// kXRow: x_stage points at the row's 16 bytes from k = 8 tig, and step pair j takes the 16 bytes
// from k = 32 j + 8 tig: the 8 lanes of a tig read the same ones (a broadcast), as their B
// fragments are all of row m0.
template <int BITS, int GROUP, int NT, int MT, int XS>
__device__ __forceinline__ void load_x_staged(typename WarpTile<BITS, GROUP, NT, MT>::XBatch& xv,
                                              const uint4* x_stage, int batch) {
  using Tile = WarpTile<BITS, GROUP, NT, MT>;
  constexpr int kPieceStride = XS == kXRow ? 4 : 32;
#pragma unroll
  for (int b = 0; b < Tile::kPairsPerBatch; ++b)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      xv[b][mt] = x_stage[kPieceStride * (mt * kStepsPerChunk / 2 + batch * Tile::kPairsPerBatch + b)];
}

// acc += the products of one chunk c. The codes and scales are w and sw (read_stage), or with
// kScaleA the stage's, read into w as the steps reach them. xv holds batch 0 of chunk c on entry;
// the next batch of x is in flight while one computes. With x from global memory, xv holds batch
// 0 of chunk c_next (if c_next >= 0) on exit; with XS != kXGlobal, x comes from x_stage, the
// stage's copy, and the caller loads batch 0.
template <int BITS, int GROUP, typename T, int NT, int MT, int XS, int COPIES, int WIDE>
__device__ __forceinline__ void mma_chunk(typename WarpTile<BITS, GROUP, NT, MT>::Acc& acc,
                                          typename WarpTile<BITS, GROUP, NT, MT>::Codes& w,
                                          const typename WarpTile<BITS, GROUP, NT, MT>::Scales& sw,
                                          const unsigned char* stage, int lane,
                                          typename WarpTile<BITS, GROUP, NT, MT>::XBatch& xv,
                                          const uint4* const (&x_lane)[MT], const uint4* x_stage,
                                          int c, int c_next, int K,
                                          const char* lut, u32 lane_bytes, int tig) {
  using Tile = WarpTile<BITS, GROUP, NT, MT>;
  using Traits = DTypeTraits<T>;
  using Layout = CodeLayout<BITS, COPIES, WIDE>;
  constexpr int kStepsPerGroup = Tile::kStepsPerGroup;
  constexpr bool kScaledSums = GROUP != 0 && !Tile::kScaleA;
  // Unscaled sums of the current group; GROUP == 0 and kScaleA sum straight into acc.
  float part[NT][MT][4];
  // kScaleA: the current group's scales of rows gid and gid + 8, each in both halves of a word.
  u32 scale_lo[NT], scale_hi[NT];
#pragma unroll
  for (int batch = 0; batch < Tile::kBatches; ++batch) {
    const int j0 = batch * Tile::kPairsPerBatch;
    typename Tile::XBatch xv_next;
    if constexpr (XS != kXGlobal) {
      if (batch + 1 < Tile::kBatches) load_x_staged<BITS, GROUP, NT, MT, XS>(xv_next, x_stage, batch + 1);
    } else {
      if (batch + 1 < Tile::kBatches) load_x<BITS, GROUP, NT, MT>(xv_next, x_lane, c, batch + 1, K, tig);
      else if (c_next >= 0) load_x<BITS, GROUP, NT, MT>(xv_next, x_lane, c_next, 0, K, tig);
    }
#pragma unroll
    for (int b = 0; b < 2 * Tile::kPairsPerBatch; ++b) {
      const int s = 2 * j0 + b;
      if constexpr (Tile::kScaleA) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int v = 0; v < BITS; ++v)
            if (Layout::first_step(v) == s) set_code_vector<BITS>(w[nt], v, Tile::stage_code_vector(stage, lane, nt, v));
          if (GROUP != 0 && s % kStepsPerGroup == 0) {
            const u32 scale = Tile::stage_scale(stage, lane, nt, s / kStepsPerGroup);
            scale_lo[nt] = __byte_perm(scale, 0, 0x1010);
            scale_hi[nt] = __byte_perm(scale, 0, 0x3232);
          }
        }
      }
      if (kScaledSums && s % kStepsPerGroup == 0) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 4; ++r) part[nt][mt][r] = 0.f;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        u32 a[4];
#pragma unroll
        for (int p = 0; p < 4; ++p)
          a[p] = *reinterpret_cast<const u32*>(lut + Layout::lut_offset(w[nt], s, p, lane_bytes));
        if constexpr (Tile::kScaleA && GROUP != 0) {
#pragma unroll
          for (int p = 0; p < 4; ++p) a[p] = Traits::mul_pairs(a[p], p & 1 ? scale_hi[nt] : scale_lo[nt]);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint4& v = xv[b / 2][mt];
          Traits::mma(kScaledSums ? part[nt][mt] : acc[nt][mt], a,
                      b % 2 ? v.z : v.x, b % 2 ? v.w : v.y);
        }
      }
      if (kScaledSums && s % kStepsPerGroup == kStepsPerGroup - 1) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float2 scale = Traits::pair_to_float2(sw[nt][s / kStepsPerGroup]);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 4; ++r)
              acc[nt][mt][r] = fmaf(r < 2 ? scale.x : scale.y, part[nt][mt][r], acc[nt][mt][r]);
        }
      }
    }
#pragma unroll
    for (int b = 0; b < Tile::kPairsPerBatch; ++b)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) xv[b][mt] = xv_next[b][mt];
  }
}

// GROUP == 0: the one scale per row multiplies the finished sums of tiles [tile0, tile0 + NT).
template <int GROUP, typename T, int NT, int MT>
__device__ __forceinline__ void scale_rows(float (&acc)[NT][MT][4], const u32* __restrict__ scales,
                                           int tile0, int n_tiles, int n_groups, int gid) {
  if constexpr (GROUP == 0) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int tile = tile0 + nt;
      const float2 scale = DTypeTraits<T>::pair_to_float2(
          tile < n_tiles ? __ldg(scales + (long long)tile * n_groups * 8 + gid) : 0u);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nt][mt][r] *= r < 2 ? scale.x : scale.y;
    }
  }
}

// C fragment register r of lane l = (gid, tig) in tile nt, m tile mt: row n = gid + 8 (r / 2),
// column m = 2 tig + r % 2 of the tile.
__device__ __forceinline__ int2 output_coord(int tile0, int m0, int nt, int mt, int r, int l) {
  return make_int2((tile0 + nt) * 16 + (l >> 2) + 8 * (r >> 1), m0 + 8 * mt + 2 * (l & 3) + (r & 1));
}

// f(n, m, value) for each of this lane's outputs inside [0, N) x [0, M).
template <int NT, int MT, typename F>
__device__ __forceinline__ void for_each_output(const float (&acc)[NT][MT][4], int tile0, int m0,
                                                int N, int M, int lane, F f) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int2 nm = output_coord(tile0, m0, nt, mt, r, lane);
        if (nm.x < N && nm.y < M) f(nm.x, nm.y, acc[nt][mt][r]);
      }
}

// An SM's shared memory: sm_80 and sm_87 164 KiB, sm_86 and sm_89 100, sm_90 228.
__host__ __device__ constexpr int shared_bytes_per_sm() {
#if __CUDA_ARCH__ == 800 || __CUDA_ARCH__ == 870
  return 164 * 1024;
#elif __CUDA_ARCH__ >= 900
  return 228 * 1024;
#else
  return 100 * 1024;
#endif
}

// The CTAs an SM whose registers ptxas is asked to fit. One tile of each kind: 16 warps (128
// registers), which it fits without spilling. Up to four tiles with scale groups of 128 k or
// more: as many CTAs as shared memory holds (1 KiB each besides its own), up to 12 warps (170
// registers), so that registers do not hold back what shared memory admits (3-bit
// nt2_mt2_wn2_wk2_ks2 took 180 registers unbounded, two CTAs of 4 warps an SM where shared memory
// fits three; 147 bounded: docs/PERF_NOTES.md v25). More tiles, or groups of 32 or 64 k (3-bit
// codes' spill at 168 on sm_90): all the registers they need, down to one CTA an SM.
__host__ __device__ constexpr int min_ctas_per_sm(int nt, int mt, int warps, int group,
                                                  int shared_bytes) {
  if (nt * mt == 1) return 16 / warps;
  if (nt * mt > 4 || (group != 0 && group < 128)) return 1;
  const int by_shared = shared_bytes_per_sm() / (shared_bytes + 1024);
  const int by_warps = 12 / warps;
  return by_shared < by_warps ? (by_shared > 0 ? by_shared : 1) : by_warps;
}

template <int BITS, int GROUP, int NT, int MT, int WN, int WK, int STAGES, int XS, int COPIES,
          int WIDE, int KS>
constexpr int kMinCtas = min_ctas_per_sm(
    NT, MT, WN * WK, GROUP,
    SharedLayout<BITS, GROUP, NT, MT, WN * WK, WK, STAGES, XS, COPIES, WIDE, KS>::kBytes);

// lut_gemm_split's cluster shape, on the targets that have clusters (the others never launch it:
// it traps there).
#if __CUDA_ARCH__ >= 900
#define CUFLUTE_CLUSTER_ALONG_Z(n) __cluster_dims__(1, 1, n)
#else
#define CUFLUTE_CLUSTER_ALONG_Z(n)
#endif

template <int BITS, int GROUP, typename T, int NT, int MT, int WN, int WK, int STAGES, int XS,
          int COPIES, int WIDE, int KS>
__device__ __forceinline__ void lut_gemm_cta(const T* __restrict__ x, long long x_row_stride,
                                             const uint4* __restrict__ qweight,
                                             const u32* __restrict__ scales,
                                             const u32* __restrict__ pair_lut, T* __restrict__ y,
                                             int M, int N, int K, int k_chunks, int n_groups) {
  using Tile = WarpTile<BITS, GROUP, NT, MT, XS>;
  constexpr int kWarps = WN * WK;
  using Smem = SharedLayout<BITS, GROUP, NT, MT, kWarps, WK, STAGES, XS, COPIES, WIDE, KS>;
  static_assert(XS != kXShared || WN > 1, "kXShared is for WN > 1 warps along n (else kXWarp)");
  static_assert(XS != kXShared || WK < 16, "one named barrier per K slice: ids 1 to 15");
  static_assert(KS >= 1 && KS <= 8, "KS must be 1 to 8 (a portable cluster)");
  constexpr bool kStagedX = XS != kXGlobal;
  constexpr int kAccPerWarp = NT * MT * 4 * 32;            // (nt, mt, c register, lane)
  extern __shared__ __align__(16) unsigned char smem[];
  check_dynamic_shared(Smem::kBytes);
  if (XS == kXRow && M > 1) __trap();  // launched past its one row (cuflute.gemm checks first)
#if __CUDA_ARCH__ < 900
  if (KS > 1) __trap();  // no clusters before sm_90 (cuflute.gemm refuses first)
#endif

  // warp = WN * wk + wn: the warps of one K slice side by side along n.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int gid = lane >> 2, tig = lane & 3;
  // With fewer than 32 copies, through a shuffle, which the compiler cannot see through: knowing
  // lane_bytes as 4 (lane % 16), it masks it again at every lookup, three instructions a lookup
  // instead of a shift and one lop3.
  const u32 lane_bytes =
      COPIES == 32 ? 4u * lane : __shfl_sync(0xFFFFFFFFu, 4u * (lane % COPIES), lane);
  const int n_tiles = (N + 15) / 16;
  // m blocks vary fastest, so the CTAs that read the same weight rows run together and the
  // second and later ones find the weight in L2.
  const int m0 = blockIdx.x * 8 * MT;
  const int tile0 = (blockIdx.y * WN + wn) * NT;
  // KS > 1: this CTA's chunks are [chunk0, chunk0 + cta_chunks); blockIdx.z is its cluster rank.
  const int split_chunks = (k_chunks + KS - 1) / KS;
  const int chunk0 = KS > 1 ? blockIdx.z * split_chunks : 0;
  const int cta_chunks = KS > 1 ? max(0, min(split_chunks, k_chunks - chunk0)) : k_chunks;

  const uint4* x_lane[MT];
  bool row_valid[MT];
  x_rows<T, MT>(x_lane, row_valid, x, x_row_stride, m0, M, lane);
  // kXShared where WN divides MT: warp wn copies m tiles [wn MT / WN, (wn + 1) MT / WN) of each
  // chunk's x whole, from MT / WN row addresses a lane; ptxas rebuilds a lane's row addresses
  // every chunk, and copying step pairs of every m tile needed all MT of them
  // (docs/PERF_NOTES.md v27: 1092 -> 1058 instructions a chunk for nt2_mt8_wn4_wk1).
  constexpr bool kXByTiles = XS == kXShared && MT % WN == 0;
  constexpr int kPartTiles = kXByTiles ? MT / WN : 1;
  const uint4* x_part[kPartTiles];
  bool part_valid[kPartTiles];
  if constexpr (kXByTiles) {
    x_rows<T, kPartTiles>(x_part, part_valid, x, x_row_stride, m0 + 8 * kPartTiles * wn, M, lane);
    // An empty asm that reads and writes each address: ptxas then keeps them in registers
    // instead of rebuilding them from x, m0 and wn every chunk (docs/PERF_NOTES.md v28). Not at
    // 32 tiles a warp, whose registers are all taken (3-bit nt4_mt8 spills with them on sm_80).
    if constexpr (NT * MT <= 16) {
#pragma unroll
      for (int mt = 0; mt < kPartTiles; ++mt) asm volatile("" : "+l"(x_part[mt]));
    }
  }

  typename Tile::Acc acc;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[nt][mt][r] = 0.f;

  // This warp's chunks are chunk0 + wk, chunk0 + wk + WK, ...; its i-th goes through stage
  // i % STAGES.
  const int my_chunks = wk < cta_chunks ? (cta_chunks - wk + WK - 1) / WK : 0;
  auto chunk = [&](int i) { return chunk0 + wk + i * WK; };

  // The copy of chunk i's x (its first piece), and this lane's first piece in it.
  auto x_copy = [&](int i) {
    return reinterpret_cast<uint4*>(XS == kXShared ? Smem::shared_x(smem, wk, i)
                                                   : Smem::stage(smem, warp, i) + Tile::kXOffset);
  };
  auto x_stage = [&](int i) { return x_copy(i) + (XS == kXRow ? tig : lane); };
  auto issue_weight = [&](int i) {
    if (i < my_chunks)
      copy_chunk_async<BITS, GROUP, NT>(Smem::stage(smem, warp, i), qweight, scales, tile0,
                                        chunk(i), n_tiles, k_chunks, n_groups, lane);
  };
  // Chunk i's x, then the group of everything issued since the last commit (empty groups too,
  // so that wait_group counts chunks).
  auto issue_x_and_commit = [&](int i) {
    if (i < my_chunks) {
      if constexpr (XS == kXWarp) copy_x_async<MT, 1>(x_stage(i), x_lane, row_valid, chunk(i), K, 0, 0, lane);
      if constexpr (kXByTiles)
        copy_x_async<kPartTiles, 1>(x_stage(i), x_part, part_valid, chunk(i), K, 0, kPartTiles * wn, lane);
      else if constexpr (XS == kXShared)
        copy_x_async<MT, WN>(x_stage(i), x_lane, row_valid, chunk(i), K, wn, 0, lane);
      if constexpr (XS == kXRow)  // M = 1: the row is x's first
        copy_x_row_async(x_copy(i), reinterpret_cast<const uint4*>(x), chunk(i), K, lane);
    }
    copy_async_commit();
  };
  auto issue = [&](int i) {
    issue_weight(i);
    issue_x_and_commit(i);
  };

  // The next grid may start once every CTA of this one is resident, and this one may have
  // started before the grid ahead of it is done: the first chunks of the weight and the LUT
  // build go out before the wait, overlapping that grid's last CTAs; x waits
  // (launch_dependent_grids above; docs/PERF_NOTES.md v20).
  launch_dependent_grids();
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) issue_weight(i);
  fill_lut<BITS, COPIES, WIDE, 32 * kWarps>(smem, pair_lut, threadIdx.x);
  wait_for_prior_grid();
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) issue_x_and_commit(i);
  typename Tile::XBatch xv;
  if (!kStagedX && my_chunks > 0) load_x<BITS, GROUP, NT, MT>(xv, x_lane, chunk(0), 0, K, tig);
  __syncthreads();

  for (int i = 0; i < my_chunks; ++i) {
    // Stage (i - 1) % STAGES was read into registers and used by the last iteration's mma.
    if constexpr (XS == kXShared) {
      copy_async_wait<STAGES - 2>();
      // Every warp of this K slice has its pieces of chunk i in and is done with chunk i - 1,
      // whose x the next issue overwrites.
      sync_named(1 + wk, 32 * WN);
      issue(i + STAGES - 1);
    } else {
      issue(i + STAGES - 1);
      copy_async_wait<STAGES - 1>();
    }
    typename Tile::Codes w;
    typename Tile::Scales sw;
    if constexpr (!Tile::kScaleA) read_stage<BITS, GROUP, NT, MT>(Smem::stage(smem, warp, i), lane, w, sw);
    if constexpr (kStagedX) load_x_staged<BITS, GROUP, NT, MT, XS>(xv, x_stage(i), 0);
    mma_chunk<BITS, GROUP, T, NT, MT, XS, COPIES, WIDE>(acc, w, sw, Smem::stage(smem, warp, i), lane, xv,
                                                        x_lane, x_stage(i), chunk(i),
                                                        i + 1 < my_chunks ? chunk(i + 1) : -1, K,
                                                        reinterpret_cast<const char*>(smem), lane_bytes, tig);
  }
  copy_async_wait<0>();  // only empty groups are left, but none may land on reused memory
  scale_rows<GROUP, T, NT, MT>(acc, scales, tile0, n_tiles, n_groups, gid);

  auto store = [&](int n, int m, float v) { y[(long long)m * N + n] = DTypeTraits<T>::from_float(v); };
  if constexpr (WK == 1 && KS == 1) {
    for_each_output<NT, MT>(acc, tile0, m0, N, M, lane, store);
  } else {
    float* partial_sh = reinterpret_cast<float*>(smem);
    __syncthreads();  // every warp is past its last LUT read before the buffer is reused
    float* mine = partial_sh + warp * kAccPerWarp;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 4; ++r) mine[((nt * MT + mt) * 4 + r) * 32 + lane] = acc[nt][mt][r];
    if constexpr (KS > 1) cluster_sync(); else __syncthreads();
    // Warp column c's sums are those of warps c, c + WN, ..., c + (WK - 1) WN, in each of the
    // cluster's KS CTAs; CTA z adds and stores every KS-th of them, from the z-th.
    constexpr int kSums = WN * kAccPerWarp, kStride = KS * 32 * kWarps;
    auto store_sum = [&](int i, float sum) {  // i = column kAccPerWarp + j
      const int column = i / kAccPerWarp, j = i % kAccPerWarp;
      const int r = (j >> 5) & 3, mt = (j >> 7) % MT, nt = (j >> 7) / MT;
      const int2 nm = output_coord((blockIdx.y * WN + column) * NT, m0, nt, mt, r, j & 31);
      if (nm.x < N && nm.y < M) store(nm.x, nm.y, sum);
    };
    if constexpr (KS == 1) {
      for (int i = threadIdx.x; i < kSums; i += kStride) {
        float sum = 0.f;
#pragma unroll
        for (int wi = 0; wi < WK; ++wi) sum += partial_sh[wi * WN * kAccPerWarp + i];
        store_sum(i, sum);
      }
    } else {
      // A thread's share is compile-time, so all its DSMEM loads go before the first add waits
      // on one: a runtime loop waited out a round trip each pass.
      constexpr int kShare = (kSums + kStride - 1) / kStride;
      const int first = threadIdx.x + blockIdx.z * 32 * kWarps;
      float sum[kShare];
#pragma unroll
      for (int s = 0; s < kShare; ++s) {
        const int i = first + s * kStride;
        sum[s] = 0.f;
        if (kSums % kStride != 0 && i >= kSums) continue;
#pragma unroll
        for (int wi = 0; wi < WK; ++wi)
#pragma unroll
          for (int z = 0; z < KS; ++z)
            sum[s] += load_cluster_shared(shared_address(partial_sh + wi * WN * kAccPerWarp + i), z);
      }
#pragma unroll
      for (int s = 0; s < kShare; ++s)
        if (kSums % kStride == 0 || first + s * kStride < kSums) store_sum(first + s * kStride, sum[s]);
    }
    if constexpr (KS > 1) cluster_sync();  // no CTA leaves while the others read its sums
  }
}

template <int BITS, int GROUP, typename T, int NT, int MT, int WN, int WK, int STAGES, int XS,
          int COPIES, int WIDE>
__global__ void __launch_bounds__(32 * WN * WK, kMinCtas<BITS, GROUP, NT, MT, WN, WK, STAGES, XS, COPIES, WIDE, 1>)
lut_gemm(const T* __restrict__ x, long long x_row_stride,
         const uint4* __restrict__ qweight, const u32* __restrict__ scales,
         const u32* __restrict__ pair_lut, T* __restrict__ y,
         int M, int N, int K, int k_chunks, int n_groups) {
  lut_gemm_cta<BITS, GROUP, T, NT, MT, WN, WK, STAGES, XS, COPIES, WIDE, 1>(
      x, x_row_stride, qweight, scales, pair_lut, y, M, N, K, k_chunks, n_groups);
}

template <int BITS, int GROUP, typename T, int NT, int MT, int WN, int WK, int STAGES, int XS,
          int COPIES, int WIDE, int KS>
__global__ void CUFLUTE_CLUSTER_ALONG_Z(KS)
    __launch_bounds__(32 * WN * WK, kMinCtas<BITS, GROUP, NT, MT, WN, WK, STAGES, XS, COPIES, WIDE, KS>)
lut_gemm_split(const T* __restrict__ x, long long x_row_stride,
               const uint4* __restrict__ qweight, const u32* __restrict__ scales,
               const u32* __restrict__ pair_lut, T* __restrict__ y,
               int M, int N, int K, int k_chunks, int n_groups) {
  lut_gemm_cta<BITS, GROUP, T, NT, MT, WN, WK, STAGES, XS, COPIES, WIDE, KS>(
      x, x_row_stride, qweight, scales, pair_lut, y, M, N, K, k_chunks, n_groups);
}

}  // namespace cuflute

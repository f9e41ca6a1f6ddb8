// cuflute BCQ GEMV (LUT-GEMM, Park et al., arXiv 2206.09557): y[M, N] = x[M, K] @ W'[N, K]^T
//
//   W'[n, k] = sum_{i < BITS} alpha[n, j, i] * B_i[n, k] + z[n, j],   B_i in {-1, +1},
//   j = k / group (or 0: one group per row).
//
// No dequantization. For each run of kMu = 8 consecutive k and each row of x, the CTA builds
// in shared memory the table of all 256 signed partial sums  P[p] = sum_e (bit e of p ? +1 : -1)
// * x[8r + e]; one byte of a sign plane then selects its run's partial sum with one shared
// load instead of 8 multiply-adds, and each (row, group, plane) multiplies its sum once by
// alpha. The offset adds z * sum(x) = z * P[255]. Tables and sums are float32; x and y are
// float16 or bfloat16. Takes M <= 8, but every row of x costs 16 KiB of tables per 128 k and a
// shared load per byte: measured on an H100 it beats cuBLAS fp16 at M = 1 only (README).
//
// Template parameters
//   BITS    sign planes: 1, 2, 3 or 4
//   T       __half or __nv_bfloat16 (x, y, alphas, offsets)
//   M_TILE  rows of x per CTA: 1, 4 or 8 (blockIdx.y steps M by M_TILE)
//   ROWS    rows of W per CTA: 32 or 64; 4 threads per row and K part. More rows share each
//           table (less building per lookup), fewer rows make more CTAs.
//   KSPLIT  K parts per CTA: 1 or 2, each 4 * ROWS threads with its own tables and named
//           barrier, taking every KSPLIT-th super-chunk; summed in shared memory at the end.
//           Two parts keep an SM busy while the other part waits at a barrier.
//
// The CTA walks K in chunks of kChunkK = 128 (16 runs). Per chunk its threads build the
// M_TILE x 16 tables (16 KiB per row of x), synchronize, and each thread looks up the 4 runs
// (32 k) of its quarter of the chunk for its row in every plane. With M_TILE = 1 the tables
// are double-buffered (one barrier per chunk), else single (two barriers per chunk).
// x comes in through shared memory, one super-chunk (512 k) at a time, loaded into registers
// one super-chunk ahead like the weights, so no build waits on global memory.
// Dynamic shared memory (cuflute.bcq.kernels.BCQSpec.shared_bytes computes the same), per
// K part:
//   float [kStages][M_TILE][16 runs][256]   the tables
//   uint4 [2][M_TILE][64 runs]              x, 8 values of T per run
//
// Packed layout (produced by cuflute.bcq.packing.pack, inverted by cuflute.bcq.reference)
//
//   qweight: uint4 [n_blocks][k_supers][BITS][128 threads]    n_blocks = ceil(N/32),
//                                                             k_supers = ceil(K/512)
//     block b = rows [32b, 32b + 32); super-chunk s = k [512s, 512s + 512) = 4 chunks.
//     Thread t of a block: row 32b + t/4, quarter q = t%4. Its 16-byte vector per plane i:
//
//       word w (chunk 4s + w):  | byte 0 | byte 1 | byte 2 | byte 3 |
//                                 run 4q   4q+1     4q+2     4q+3     (runs of the chunk)
//       bit e of byte j  =  B_i[32b + t/4][512s + 128w + 32q + 8j + e]   (1: +1, 0: -1)
//
//     so a warp's 32 vectors (8 rows x 4 quarters) are 512 contiguous bytes, one coalesced
//     16-byte load per lane and plane brings 4 chunks, and the next super-chunk is in flight
//     in registers while this one is computed.
//
//   alphas:  T [32 n_blocks][n_groups][BITS + 1]    alpha_0 .. alpha_{BITS-1}, then z
//     n_groups = ceil(K/512) * 512 / group, or 1 per row; the group of a thread's 32 k in
//     chunk c is (4c + q) >> group_shift, group_shift = log2(group / 32) (31: always 0).
//
// Rows past N and k past K are padding: signs 0, alphas 0; x is read as 0 past K and M.

#pragma once
#include "dtype_traits.cuh"

namespace cuflute {
namespace bcq {

constexpr int kMu = 8;                              // k per run: one byte of a plane
constexpr int kTableSize = 1 << kMu;                // partial sums per run
constexpr int kChunkK = 128;                        // k per table build
constexpr int kRunsPerChunk = kChunkK / kMu;        // 16 tables per row of x
constexpr int kBlockRows = 32;                      // rows per packed block
constexpr int kBlockThreads = 4 * kBlockRows;       // 16-byte vectors per block and plane
constexpr int kChunksPerSuper = 4;                  // words of a vector
constexpr int kRunsPerSuper = kChunksPerSuper * kRunsPerChunk;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ u32 vector_word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

template <int M_TILE> __host__ __device__ constexpr int table_stages() { return M_TILE == 1 ? 2 : 1; }

// A barrier for the THREADS threads of K part `part` only (named barrier 1 + part), so the
// parts of a CTA run their chunk loops independently; one part: __syncthreads.
template <int THREADS, int KSPLIT>
__device__ __forceinline__ void part_barrier(int part) {
  if (KSPLIT == 1) {
    __syncthreads();
  } else {
    asm volatile("bar.sync %0, %1;" ::"r"(1 + part), "n"(THREADS) : "memory");
  }
}

// The x runs of one super-chunk that this thread stages: run v = tid + j * THREADS of
// [M_TILE rows][64 runs], zeros past M and K.
template <typename T, int M_TILE, int THREADS>
struct XStage {
  static constexpr int kVectors = (M_TILE * kRunsPerSuper + THREADS - 1) / THREADS;
  uint4 v[kVectors];

  __device__ __forceinline__ void load(const T* __restrict__ x_tile, long long x_stride,
                                      int m_rows, int k, int super, int tid) {
#pragma unroll
    for (int j = 0; j < kVectors; ++j) {
      const int idx = tid + j * THREADS, mm = idx / kRunsPerSuper;
      const int kk = super * kRunsPerSuper * kMu + (idx % kRunsPerSuper) * kMu;
      v[j] = idx < M_TILE * kRunsPerSuper && mm < m_rows && kk < k
                 ? __ldg(reinterpret_cast<const uint4*>(x_tile + mm * x_stride + kk))
                 : make_uint4(0, 0, 0, 0);
    }
  }
  __device__ __forceinline__ void store(uint4* x_super, int tid) const {
#pragma unroll
    for (int j = 0; j < kVectors; ++j) {
      const int idx = tid + j * THREADS;
      if (idx < M_TILE * kRunsPerSuper) x_super[idx] = v[j];
    }
  }
};

// The M_TILE x 16 tables of one chunk. A warp builds one table (one row of x, one run): lane
// l writes entries 4l + {0..3} and 128 + 4l + {0..3}, whose bits 2..6 are l: so the signs of
// x[2..6] are the lane's own, x[0..1] vary inside the float4 and x[7] between the two halves.
template <typename T, int M_TILE, int THREADS>
__device__ __forceinline__ void build_tables(float* tables, const uint4* x_super, int w, int tid,
                                             const float (&lane_signs)[5]) {
  constexpr int kUnits = M_TILE * kRunsPerChunk * 32 / THREADS;
  static_assert(kUnits * THREADS == M_TILE * kRunsPerChunk * 32, "whole tables per pass");
  const int lane = tid & 31;
#pragma unroll 2
  for (int u_i = 0; u_i < kUnits; ++u_i) {
    const int unit = tid + u_i * THREADS;
    const int run = (unit >> 5) % kRunsPerChunk, mm = unit / (32 * kRunsPerChunk);
    const uint4 raw = x_super[mm * kRunsPerSuper + w * kRunsPerChunk + run];  // a broadcast
    const T* h = reinterpret_cast<const T*>(&raw);
    float v[kMu];
#pragma unroll
    for (int e = 0; e < kMu; ++e) v[e] = to_float(h[e]);
    float base = 0.f;
#pragma unroll
    for (int e = 0; e < 5; ++e) base = fmaf(lane_signs[e], v[e + 2], base);
    const float lo0 = -v[0] - v[1], lo1 = v[0] - v[1], lo2 = v[1] - v[0], lo3 = v[0] + v[1];
    const float neg = base - v[7], pos = base + v[7];
    float4* dst = reinterpret_cast<float4*>(tables + (mm * kRunsPerChunk + run) * kTableSize) + lane;
    dst[0] = make_float4(neg + lo0, neg + lo1, neg + lo2, neg + lo3);
    dst[32] = make_float4(pos + lo0, pos + lo1, pos + lo2, pos + lo3);
  }
}

// Sum of the partial sums that the 4 bytes of `word` select from 4 consecutive tables.
__device__ __forceinline__ float lookup4(const float* tb, u32 word) {
  return (tb[word & 0xFF] + tb[kTableSize + ((word >> 8) & 0xFF)]) +
         (tb[2 * kTableSize + ((word >> 16) & 0xFF)] + tb[3 * kTableSize + (word >> 24)]);
}

template <int BITS, typename T, int M_TILE, int ROWS, int KSPLIT>
__global__ void __launch_bounds__(4 * ROWS * KSPLIT, 1)
bcq_gemv(const T* __restrict__ x, long long x_stride, const uint4* __restrict__ qweight,
         const T* __restrict__ alphas, T* __restrict__ y, int m, int n, int k, int k_supers,
         int n_groups, int group_shift, int has_offset) {
  static_assert(BITS >= 1 && BITS <= 4, "1 to 4 sign planes");
  static_assert(ROWS % kBlockRows == 0, "whole packed blocks per CTA");
  static_assert(KSPLIT == 1 || KSPLIT == 2, "one or two K parts");
  constexpr int kThreads = 4 * ROWS;  // per K part
  constexpr int kStages = table_stages<M_TILE>();
  constexpr int kStageFloats = M_TILE * kRunsPerChunk * kTableSize;
  constexpr int kPartFloats = kStages * kStageFloats + 2 * M_TILE * kRunsPerSuper * 4;
  extern __shared__ float4 bcq_table_smem[];
  const int part = threadIdx.x / kThreads, tid = threadIdx.x % kThreads, q = tid & 3;
  float* tables = reinterpret_cast<float*>(bcq_table_smem) + part * kPartFloats;
  uint4* x_smem = reinterpret_cast<uint4*>(tables + kStages * kStageFloats);  // [2][M_TILE][64]

  const int row = blockIdx.x * ROWS + tid / 4;
  const int m0 = blockIdx.y * M_TILE;
  const int m_rows = min(M_TILE, m - m0);
  const bool row_stored = row < (n + kBlockRows - 1) / kBlockRows * kBlockRows;
  const uint4* w_vec = qweight + (size_t)(row / kBlockRows) * k_supers * BITS * kBlockThreads +
                       tid % kBlockThreads;  // + (s * BITS + i) * kBlockThreads
  const T* w_alpha = alphas + (size_t)row * n_groups * (BITS + 1);
  const T* x_tile = x + m0 * x_stride;  // rows m0 .. m0 + m_rows - 1 are read

  float lane_signs[5];
#pragma unroll
  for (int e = 0; e < 5; ++e) lane_signs[e] = ((tid & 31) >> e) & 1 ? 1.f : -1.f;

  float acc[M_TILE];
#pragma unroll
  for (int mm = 0; mm < M_TILE; ++mm) acc[mm] = 0.f;

  // K part p takes super-chunks p, p + KSPLIT, ... with its own tables, x buffers and barrier.
  // Weights and x of its next super-chunk are loaded into registers while this one is
  // computed; x then goes to shared memory (double-buffered), where the table builds read it.
  uint4 cur[BITS], nxt[BITS];
  XStage<T, M_TILE, kThreads> x_next;
#pragma unroll
  for (int i = 0; i < BITS; ++i) {
    cur[i] = row_stored && part < k_supers ? __ldg(w_vec + (part * BITS + i) * kBlockThreads)
                                           : make_uint4(0, 0, 0, 0);
    nxt[i] = make_uint4(0, 0, 0, 0);
  }
  x_next.load(x_tile, x_stride, m_rows, k, part, tid);
  x_next.store(x_smem, tid);
  part_barrier<kThreads, KSPLIT>(part);

  for (int s = part, parity = 0; s < k_supers; s += KSPLIT, parity ^= 1) {
    const bool more = s + KSPLIT < k_supers;
    if (row_stored && more) {
#pragma unroll
      for (int i = 0; i < BITS; ++i)
        nxt[i] = __ldg(w_vec + ((s + KSPLIT) * BITS + i) * kBlockThreads);
    }
    if (more) x_next.load(x_tile, x_stride, m_rows, k, s + KSPLIT, tid);
    const uint4* x_super = x_smem + parity * M_TILE * kRunsPerSuper;
#pragma unroll
    for (int w = 0; w < kChunksPerSuper; ++w) {
      const int chunk = kChunksPerSuper * s + w;
      float* stage = tables + (kStages == 2 ? (w & 1) : 0) * kStageFloats;
      // Alphas first: their load overlaps the build and the barrier.
      const int group = (chunk * 4 + q) >> group_shift;
      float a[BITS + 1];
#pragma unroll
      for (int i = 0; i <= BITS; ++i)
        a[i] = row_stored ? to_float(w_alpha[group * (BITS + 1) + i]) : 0.f;
      // One stage: nobody may still be reading the previous chunk's tables. Two stages: the
      // barrier after the previous build already ordered the reads of this stage's last use.
      if (kStages == 1) part_barrier<kThreads, KSPLIT>(part);
      build_tables<T, M_TILE, kThreads>(stage, x_super, w, tid, lane_signs);
      part_barrier<kThreads, KSPLIT>(part);
#pragma unroll
      for (int mm = 0; mm < M_TILE; ++mm) {
        const float* tb = stage + (mm * kRunsPerChunk + 4 * q) * kTableSize;
#pragma unroll
        for (int i = 0; i < BITS; ++i) acc[mm] = fmaf(a[i], lookup4(tb, vector_word(cur[i], w)), acc[mm]);
        if (has_offset) acc[mm] = fmaf(a[BITS], lookup4(tb, 0xFFFFFFFFu), acc[mm]);
      }
    }
#pragma unroll
    for (int i = 0; i < BITS; ++i) cur[i] = nxt[i];
    // The other x buffer was last read by the builds of super-chunk s - 1, which every thread
    // finished before this super-chunk's first barrier.
    if (more) {
      x_next.store(x_smem + (parity ^ 1) * M_TILE * kRunsPerSuper, tid);
      part_barrier<kThreads, KSPLIT>(part);
    }
  }

  // The 4 quarters of a row are lanes 4r .. 4r+3 of one warp.
#pragma unroll
  for (int mm = 0; mm < M_TILE; ++mm) {
    acc[mm] += __shfl_xor_sync(0xFFFFFFFFu, acc[mm], 1);
    acc[mm] += __shfl_xor_sync(0xFFFFFFFFu, acc[mm], 2);
  }
  if (KSPLIT == 2) {  // part 1 hands its sums to part 0 through the (now free) shared memory
    float* partial = reinterpret_cast<float*>(bcq_table_smem);  // [M_TILE][kThreads]
    __syncthreads();
    if (part == 1) {
#pragma unroll
      for (int mm = 0; mm < M_TILE; ++mm) partial[mm * kThreads + tid] = acc[mm];
    }
    __syncthreads();
    if (part == 1) return;
#pragma unroll
    for (int mm = 0; mm < M_TILE; ++mm) acc[mm] += partial[mm * kThreads + tid];
  }
  if (row < n) {
#pragma unroll
    for (int mm = 0; mm < M_TILE; ++mm)  // the 4 lanes of a row take turns storing
      if ((mm & 3) == q && mm < m_rows)
        y[(size_t)(m0 + mm) * n + row] = DTypeTraits<T>::from_float(acc[mm]);
  }
}

}  // namespace bcq
}  // namespace cuflute

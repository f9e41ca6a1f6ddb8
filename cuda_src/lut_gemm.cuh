// cuflute LUT GEMM:  y[M, N] = x[M, K] @ W'[N, K]^T,   W'[n, k] = T[Q[n, k]] * S[n, k / g]
//
// x, y: row-major, float16 or bfloat16; accumulation in float32 on the tensor cores.
// Q: b-bit codes (b = BITS), T: the 2^b-entry lookup table, S: one scale per group of g = GROUP
// consecutive k in a row (GROUP == 0: one scale per row).
//
// The weight is the mma A operand (16 rows of n by 16 of k), x^T the B operand (16 k by 8 m):
// at decode sizes M is small, so the 8-wide side of m16n8k16 goes to M.
//
// Template parameters
//   BITS   code width in bits: 2, 3 or 4
//   GROUP  scale group size in k elements: 32, 64, 128, 256, or 0 for one group per row
//   T      __half or __nv_bfloat16
//   NT     16-row n tiles per warp (each warp owns NT * 16 output rows of its CTA)
//   MT     8-column m tiles per CTA (blockIdx.x steps M by 8 * MT, blockIdx.y N by 16 * NT)
//   WK     warps per CTA; they split the K chunks of the CTA's rows and are summed in shared memory
//
// Packed layout (produced by cuflute.packing.pack, inverted by cuflute.reference.unpack_codes)
//
//   qweight: uint4 [n_tiles][k_chunks][BITS][32 lanes]     n_tiles = ceil(N/16), k_chunks = ceil(K/256)
//
//   One warp streams one (n tile, chunk) = 16 rows x 256 k with BITS coalesced 16-byte loads per
//   lane. The lane's 4*BITS words hold, for each of the chunk's 16 mma steps s (k16 each), the
//   codes of exactly the 8 A-fragment elements that lane owns, as 4 pairs p (one register each):
//
//     lane = 4*gid + tig     p=0: row gid,   k 2tig, 2tig+1     p=2: row gid,   k 2tig+8, +9
//                            p=1: row gid+8, k 2tig, 2tig+1     p=3: row gid+8, k 2tig+8, +9
//
//   Each pair is one field that indexes the pair LUT directly (a shift and a mask):
//     BITS 4: word s,         bits [8p, 8p+8)            field = q0 | q1 << 4
//     BITS 2: word s/2,       bits [16(s%2)+4p, +4)      field = q0 | q1 << 2
//     BITS 3: two bit planes, hi(q) = q >> 1 and lo(q) = q & 1:
//             word s/2,       bits [16(s%2)+4p, +4)      hi field = hi(q0) | hi(q1) << 2
//             word 8 + s/4,   bits [8(s%4)+2p, +2)       lo field = lo(q0) | lo(q1) << 1
//             field = hi field << 2 | lo field
//   (q0 is the code at the even k, q1 at the odd k of the pair.)
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

template <int BITS> struct CodeLayout {
  static_assert(BITS >= 2 && BITS <= 4, "BITS must be 2, 3 or 4");
  static constexpr int kWords = 4 * BITS;                 // per lane per (tile, chunk)
  static constexpr int kLutEntries = 1 << (2 * BITS);
  // Shared-memory copies of the pair LUT, interleaved (entry e of copy c at word 32 e + c) so
  // that lane l reads copy l: every lane has a bank of its own, whatever the fields.
  // 32 KiB for 4 bits, 8 KiB for 3, 2 KiB for 2.
  static constexpr int kLutCopies = 32;

  static __device__ __forceinline__ int field(const u32 (&w)[kWords], int s, int p) {
    if constexpr (BITS == 4) {
      return (w[s] >> (8 * p)) & 0xFF;
    } else if constexpr (BITS == 2) {
      return (w[s >> 1] >> (16 * (s & 1) + 4 * p)) & 0xF;
    } else {
      const int hi = (w[s >> 1] >> (16 * (s & 1) + 4 * p)) & 0xF;
      const int lo = (w[8 + (s >> 2)] >> (8 * (s & 3) + 2 * p)) & 0x3;
      return (hi << 2) | lo;
    }
  }
};

// Weights are read once: keep them out of L1, which holds the x rows that CTAs share.
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

template <int BITS, int GROUP, typename T, int NT, int MT, int WK>
__global__ void __launch_bounds__(32 * WK)
lut_gemm(const T* __restrict__ x, long long x_row_stride,
         const uint4* __restrict__ qweight, const u32* __restrict__ scales,
         const u32* __restrict__ pair_lut, T* __restrict__ y,
         int M, int N, int K, int k_chunks, int n_groups) {
  static_assert(GROUP == 0 || (GROUP >= 16 && kChunkK % GROUP == 0), "GROUP must divide 256");
  static_assert(kStepsPerChunk % MT == 0, "MT must divide the 16 steps of a chunk");
  using Traits = DTypeTraits<T>;
  using Layout = CodeLayout<BITS>;
  using pair_t = typename Traits::pair_t;
  constexpr int kCopies = Layout::kLutCopies;
  constexpr int kGroupsPerChunk = GROUP == 0 ? 1 : kChunkK / GROUP;
  constexpr int kAccPerWarp = NT * MT * 4 * 32;            // (nt, mt, c register, lane)
  constexpr int kLutWords = Layout::kLutEntries * kCopies;
  constexpr int kPartialWords = WK > 1 ? WK * kAccPerWarp : 0;

  // The LUT while the K loop runs, then the warps' partial sums: one buffer serves both.
  __shared__ __align__(16) u32 smem[kLutWords > kPartialWords ? kLutWords : kPartialWords];
  u32* lut_sh = smem;
  float* partial_sh = reinterpret_cast<float*>(smem);

  for (int i = threadIdx.x; i < kLutWords; i += 32 * WK) lut_sh[i] = pair_lut[i / kCopies];
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const u32* lut = lut_sh + lane % kCopies;
  const int n_tiles = (N + 15) / 16;
  // m blocks vary fastest, so the CTAs that read the same weight rows run together and the
  // second and later ones find the weight in L2.
  const int m0 = blockIdx.x * 8 * MT;
  const int tile0 = blockIdx.y * NT;

  // B fragment rows: x[m0 + 8 mt + gid][k + 2 tig (+8)], zero for m >= M.
  const T* x_lane[MT];
  bool m_valid[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = m0 + 8 * mt + gid;
    m_valid[mt] = m < M;
    x_lane[mt] = x + (m_valid[mt] ? (long long)m * x_row_stride : 0) + 2 * tig;
  }

  float acc[NT][MT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[nt][mt][r] = 0.f;

  // One chunk's codes and scale words for this lane, zero for tiles past N.
  u32 w[NT][Layout::kWords], sw[NT][kGroupsPerChunk];
  auto load_chunk = [&](int c, u32 (&w_)[NT][Layout::kWords], u32 (&sw_)[NT][kGroupsPerChunk]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int tile = tile0 + nt;
      const bool tile_valid = tile < n_tiles;
      const uint4* src = qweight + ((long long)tile * k_chunks + c) * BITS * 32 + lane;
#pragma unroll
      for (int v = 0; v < BITS; ++v) {
        const uint4 q = tile_valid ? load_streaming(src + 32 * v) : make_uint4(0, 0, 0, 0);
        w_[nt][4 * v + 0] = q.x;
        w_[nt][4 * v + 1] = q.y;
        w_[nt][4 * v + 2] = q.z;
        w_[nt][4 * v + 3] = q.w;
      }
#pragma unroll
      for (int j = 0; j < kGroupsPerChunk; ++j) {
        const int group = GROUP == 0 ? 0 : c * kGroupsPerChunk + j;
        sw_[nt][j] = tile_valid ? __ldg(scales + ((long long)tile * n_groups + group) * 8 + gid) : 0u;
      }
    }
  };

  // Register double buffering: the next chunk's weights are in flight while this one computes.
  if (warp < k_chunks) load_chunk(warp, w, sw);
  for (int c = warp; c < k_chunks; c += WK) {
    u32 w_next[NT][Layout::kWords], sw_next[NT][kGroupsPerChunk];
    if (c + WK < k_chunks) load_chunk(c + WK, w_next, sw_next);

    // x fragments are loaded a batch of steps ahead of their mma: 32 registers whatever MT.
    constexpr int kStepsPerBatch = kStepsPerChunk / MT;
    const bool full_chunk = (c + 1) * kChunkK <= K;
#pragma unroll
    for (int s0 = 0; s0 < kStepsPerChunk; s0 += kStepsPerBatch) {
      u32 b[kStepsPerBatch][MT][2];
#pragma unroll
      for (int i = 0; i < kStepsPerBatch; ++i) {
        const int k = c * kChunkK + 16 * (s0 + i);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const u32* xp = reinterpret_cast<const u32*>(x_lane[mt] + k);
          b[i][mt][0] = m_valid[mt] && (full_chunk || k + 2 * tig < K) ? __ldg(xp) : 0u;
          b[i][mt][1] = m_valid[mt] && (full_chunk || k + 2 * tig + 8 < K) ? __ldg(xp + 4) : 0u;
        }
      }
#pragma unroll
      for (int i = 0; i < kStepsPerBatch; ++i) {
        const int s = s0 + i;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const u32 scale_word = sw[nt][GROUP == 0 ? 0 : 16 * s / GROUP];
          const pair_t scale_lo = Traits::broadcast_low(scale_word);    // row gid
          const pair_t scale_hi = Traits::broadcast_high(scale_word);   // row gid + 8
          u32 a[4];
#pragma unroll
          for (int p = 0; p < 4; ++p)
            a[p] = Traits::scale_pair(lut[Layout::field(w[nt], s, p) * kCopies],
                                      p & 1 ? scale_hi : scale_lo);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) Traits::mma(acc[nt][mt], a, b[i][mt][0], b[i][mt][1]);
        }
      }
    }

#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < Layout::kWords; ++i) w[nt][i] = w_next[nt][i];
#pragma unroll
      for (int j = 0; j < kGroupsPerChunk; ++j) sw[nt][j] = sw_next[nt][j];
    }
  }

  // C fragment register r of lane (gid, tig): row n = gid + 8 (r / 2), column m = 2 tig + r % 2.
  auto store = [&](float v, int nt, int mt, int r, int l) {
    const int n = (tile0 + nt) * 16 + (l >> 2) + 8 * (r >> 1);
    const int m = m0 + 8 * mt + 2 * (l & 3) + (r & 1);
    if (n < N && m < M) y[(long long)m * N + n] = Traits::from_float(v);
  };

  if constexpr (WK == 1) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 4; ++r) store(acc[nt][mt][r], nt, mt, r, lane);
  } else {
    __syncthreads();  // every warp is past its last LUT read before the buffer is reused
    float* mine = partial_sh + warp * kAccPerWarp;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 4; ++r) mine[((nt * MT + mt) * 4 + r) * 32 + lane] = acc[nt][mt][r];
    __syncthreads();
    for (int i = threadIdx.x; i < kAccPerWarp; i += 32 * WK) {
      float sum = 0.f;
#pragma unroll
      for (int wi = 0; wi < WK; ++wi) sum += partial_sh[wi * kAccPerWarp + i];
      const int r = (i >> 5) & 3, mt = (i >> 7) % MT, nt = (i >> 7) / MT;
      store(sum, nt, mt, r, i & 31);
    }
  }
}

}  // namespace cuflute

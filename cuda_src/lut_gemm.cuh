// cuflute LUT GEMM:  y[M, N] = x[M, K] @ W'[N, K]^T,   W'[n, k] = T[Q[n, k]] * S[n, k / g]
//
// x, y: row-major, float16 or bfloat16; accumulation in float32 on the tensor cores.
// Q: b-bit codes (b = BITS), T: the 2^b-entry lookup table, S: one scale per group of g = GROUP
// consecutive k in a row (GROUP == 0: one scale per row).
//
// The weight is the mma A operand (16 rows of n by 16 of k), x^T the B operand (16 k by 8 m):
// at decode sizes M is small, so the 8-wide side of m16n8k16 goes to M. The A operand is the
// table value T[q] alone; each group's partial sums are scaled in float32 when the group ends.
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
//             word s/2,       bits [16(s%2)+4p, +4)      hi field = hi(q0) | hi(q1) << 2
//             word 8 + s/4,   bits [8(s%4)+2p, +2)       lo field = lo(q0) | lo(q1) << 1
//             field = hi field << 2 | lo field
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

// v moved so that its bit `from` lands on bit `to` (both compile-time after unrolling).
__device__ __forceinline__ u32 move_bits(u32 v, int from, int to) {
  return from >= to ? v >> (from - to) : v << (to - from);
}

template <int BITS> struct CodeLayout {
  static_assert(BITS >= 2 && BITS <= 4, "BITS must be 2, 3 or 4");
  static constexpr int kWords = 4 * BITS;                 // per lane per (tile, chunk)
  static constexpr int kLutEntries = 1 << (2 * BITS);
  // The pair LUT sits in shared memory 32 times, interleaved: entry f of copy c at byte
  // 128 f + 4 c. Lane l reads copy l, so every lane has a bank of its own whatever the fields.
  // 32 KiB for 4 bits, 8 KiB for 3, 2 KiB for 2.
  static constexpr int kLutCopies = 32;

  // Byte offset of pair p of step s in that LUT, for the lane whose copy starts at lane_bytes:
  // the field is moved straight to bit 7, masked, and or-ed with the lane's bank.
  static __device__ __forceinline__ u32 lut_offset(const u32 (&w)[kWords], int s, int p,
                                                   u32 lane_bytes) {
    if constexpr (BITS == 4) {
      return (move_bits(w[s], 8 * p, 7) & 0x7F80u) | lane_bytes;
    } else if constexpr (BITS == 2) {
      return (move_bits(w[s >> 1], 16 * (s & 1) + 4 * p, 7) & 0x780u) | lane_bytes;
    } else {
      const u32 hi = move_bits(w[s >> 1], 16 * (s & 1) + 4 * p, 9) & 0x1E00u;
      const u32 lo = move_bits(w[8 + (s >> 2)], 8 * (s & 3) + 2 * p, 7) & 0x180u;
      return hi | lo | lane_bytes;
    }
  }
};

// Weights are read once: keep them out of L1, which holds the x rows that CTAs share.
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

template <int BITS, int GROUP, typename T, int NT, int MT, int WK>
// One tile of each kind: 128 registers (16 warps an SM), which it fits without spilling.
// More tiles: all the registers they need, down to one CTA an SM.
__global__ void __launch_bounds__(32 * WK, NT * MT == 1 ? 16 / WK : 1)
lut_gemm(const T* __restrict__ x, long long x_row_stride,
         const uint4* __restrict__ qweight, const u32* __restrict__ scales,
         const u32* __restrict__ pair_lut, T* __restrict__ y,
         int M, int N, int K, int k_chunks, int n_groups) {
  constexpr int kGroupK = GROUP == 0 ? kChunkK : GROUP;  // k per scale group inside a chunk
  static_assert(kGroupK >= 32 && kChunkK % kGroupK == 0, "GROUP must be 0 or divide 256");
  static_assert(kStepsPerChunk % (2 * MT) == 0, "MT must divide the 8 step pairs of a chunk");
  using Traits = DTypeTraits<T>;
  using Layout = CodeLayout<BITS>;
  constexpr int kCopies = Layout::kLutCopies;
  constexpr int kGroupsPerChunk = kChunkK / kGroupK;
  constexpr int kStepsPerGroup = kGroupK / 16;
  constexpr int kAccPerWarp = NT * MT * 4 * 32;            // (nt, mt, c register, lane)
  constexpr int kLutWords = Layout::kLutEntries * kCopies;
  constexpr int kPartialWords = WK > 1 ? WK * kAccPerWarp : 0;

  // The LUT while the K loop runs, then the warps' partial sums: one buffer serves both.
  __shared__ __align__(16) u32 smem[kLutWords > kPartialWords ? kLutWords : kPartialWords];
  float* partial_sh = reinterpret_cast<float*>(smem);

  for (int i = threadIdx.x; i < kLutWords; i += 32 * WK) smem[i] = pair_lut[i / kCopies];
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const u32 lane_bytes = 4 * (lane % kCopies);
  const char* lut = reinterpret_cast<const char*>(smem);
  const int n_tiles = (N + 15) / 16;
  // m blocks vary fastest, so the CTAs that read the same weight rows run together and the
  // second and later ones find the weight in L2.
  const int m0 = blockIdx.x * 8 * MT;
  const int tile0 = blockIdx.y * NT;

  // B fragments come from x[m0 + 8 mt + gid][32 j + 8 tig, +8). Rows past M read row M-1
  // instead: their output columns are never stored.
  const uint4* x_lane[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = min(m0 + 8 * mt + gid, M - 1);
    x_lane[mt] = reinterpret_cast<const uint4*>(x + (long long)m * x_row_stride + 8 * tig);
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

    // Unscaled sums of the current group; GROUP == 0 sums straight into acc.
    float part[NT][MT][4];
    // x is loaded a batch of step pairs ahead of its mma: 32 registers whatever MT.
    constexpr int kPairsPerBatch = kStepsPerChunk / 2 / MT;
    const bool full_chunk = (c + 1) * kChunkK <= K;
#pragma unroll
    for (int j0 = 0; j0 < kStepsPerChunk / 2; j0 += kPairsPerBatch) {
      uint4 xv[kPairsPerBatch][MT];
#pragma unroll
      for (int i = 0; i < kPairsPerBatch; ++i) {
        const int k = c * kChunkK + 32 * (j0 + i);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          xv[i][mt] = full_chunk || k + 8 * tig < K ? __ldg(x_lane[mt] + k / 8)
                                                    : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int i = 0; i < 2 * kPairsPerBatch; ++i) {
        const int s = 2 * j0 + i;
        if (GROUP != 0 && s % kStepsPerGroup == 0) {
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
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint4& v = xv[i / 2][mt];
            Traits::mma(GROUP == 0 ? acc[nt][mt] : part[nt][mt], a,
                        i % 2 ? v.z : v.x, i % 2 ? v.w : v.y);
          }
        }
        if (GROUP != 0 && s % kStepsPerGroup == kStepsPerGroup - 1) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const float2 scale = Traits::scales_to_float2(sw[nt][s / kStepsPerGroup]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
              for (int r = 0; r < 4; ++r)
                acc[nt][mt][r] = fmaf(r < 2 ? scale.x : scale.y, part[nt][mt][r], acc[nt][mt][r]);
          }
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

  if constexpr (GROUP == 0) {  // one scale per row, applied once at the end
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int tile = tile0 + nt;
      const float2 scale = Traits::scales_to_float2(
          tile < n_tiles ? __ldg(scales + (long long)tile * n_groups * 8 + gid) : 0u);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nt][mt][r] *= r < 2 ? scale.x : scale.y;
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

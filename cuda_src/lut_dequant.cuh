// cuflute LUT dequantization: W'[N, K] = T[Q[n, k]] * S[n, k / g], written out dense (row-major,
// float16 or bfloat16), for the M at which a dense tensor-core GEMM over W' (cuBLAS) beats the
// LUT GEMM (cuflute.dispatch). It reads the packed layout through lut_gemm.cuh's own functions
// (CodeLayout, fill_lut, unpack_code_words): one warp per (n tile, chunk), each lane writing the A-fragment
// elements that it would feed the tensor cores there. Each value is scaled in float32, exactly
// (both factors have at most 11 significant bits), and rounded once: W' is what
// reference.dequantize computes, rounded. K is a multiple of 8 (the packer checks), so a
// 16-byte run of 8 k is either all inside [0, K) or all padding.
#pragma once
#include "lut_gemm.cuh"

namespace cuflute {

constexpr int kDequantWarps = 8;         // cuflute.kernels.DequantSpec.WARPS
constexpr int kDequantUnitsPerWarp = 4;  // DequantSpec.UNITS_PER_WARP: the LUT fill, shared

template <int BITS, int GROUP, typename T>
__global__ void __launch_bounds__(32 * kDequantWarps)
lut_dequant(const uint4* __restrict__ qweight, const u32* __restrict__ scales,
            const u32* __restrict__ pair_lut, T* __restrict__ w,
            int N, int K, int k_chunks, int n_groups) {
  using Layout = CodeLayout<BITS>;
  using Tile = WarpTile<BITS, GROUP, 1, 1>;
  using Traits = DTypeTraits<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  check_dynamic_shared(Layout::kLutBytes);
  fill_lut<BITS, Layout::kLutCopies, 0, 32 * kDequantWarps>(smem, pair_lut, threadIdx.x);
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const u32 lane_bytes = 4 * (lane % Layout::kLutCopies);
  const int n_tiles = (N + 15) / 16;
  // unit = tile * k_chunks + chunk: qweight's order, so that a CTA reads one contiguous run.
  const long long first = ((long long)blockIdx.x * kDequantWarps + (threadIdx.x >> 5)) * kDequantUnitsPerWarp;
  const long long units = (long long)n_tiles * k_chunks;
  for (long long unit = first; unit < first + kDequantUnitsPerWarp && unit < units; ++unit) {
    const int tile = static_cast<int>(unit / k_chunks), c = static_cast<int>(unit % k_chunks);

    u32 words[Layout::kWords];
    unpack_code_words<BITS>(words, qweight + unit * BITS * 32 + lane);
    // Steps 2j and 2j + 1 give a lane 8 consecutive k of each of its two rows (pairs p and p + 2
    // of each step, see lut_gemm.cuh): one 16-byte store per row, 64 contiguous bytes per row
    // across the 4 lanes of a group, whole sectors.
#pragma unroll
    for (int j = 0; j < kStepsPerChunk / 2; ++j) {
      const int group = GROUP == 0 ? 0 : c * Tile::kGroupsPerChunk + 2 * j / Tile::kStepsPerGroup;
      const float2 scale = Traits::pair_to_float2(__ldg(scales + ((long long)tile * n_groups + group) * 8 + gid));
      const int k = c * kChunkK + 32 * j + 8 * tig;
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // row gid, then row gid + 8
        const float factor = half ? scale.y : scale.x;
        u32 out[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // k + 2i, k + 2i + 1: step 2j + i / 2, pair half + 2 (i % 2)
          const float2 t = Traits::pair_to_float2(*reinterpret_cast<const u32*>(
              smem + Layout::lut_offset(words, 2 * j + i / 2, half + 2 * (i % 2), lane_bytes)));
          out[i] = Traits::pair_from_float2(make_float2(t.x * factor, t.y * factor));
        }
        const int row = tile * 16 + gid + 8 * half;
        if (row < N && k < K)
          *reinterpret_cast<uint4*>(w + (long long)row * K + k) = make_uint4(out[0], out[1], out[2], out[3]);
      }
    }
  }
}

}  // namespace cuflute

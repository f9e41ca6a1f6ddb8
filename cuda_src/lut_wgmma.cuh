// cuflute warpgroup LUT GEMM (sm_90a): y[M, N] = x[M, K] @ W'[N, K]^T as lut_gemm.cuh computes
// it, from the same packed weight, for M from 32 up.
//
// Why a second kernel: lut_gemm's warps each run mma.sync on their own 16 or 32 weight rows and
// read x from shared memory through registers, one or two warps a scheduler, and at M >= 32 they
// wait on latency with the tensor pipe half idle (docs/PERF_NOTES.md v31). Here a CTA of WG
// warpgroups takes 64 WG weight rows and BM columns of x: each warp decodes its 16-row tile's
// A fragments from the pair LUT into registers, exactly as lut_gemm does, and the warpgroup
// issues wgmma with B, the chunk's x, read by the tensor cores straight from shared memory. One
// copy of x a stage serves all 64 WG rows, and the decode of step s + 1 overlaps the wgmma of
// step s. K may be split over a cluster of KS CTAs, summed through shared memory (DSMEM). The
// tuned table says where it or lut_gemm is faster (docs/PERF_NOTES.md v32 to v35).
//
// The pipeline (v33, v34). Before each launch, wgmma_x_image writes x as the chunks' shared-memory
// images (below), so that a chunk's x comes in as one bulk copy, counted on the stage's mbarrier.
// Each warp copies its own tile's codes and scales by cp.async, STAGES chunks ahead, as lut_gemm's
// warps do. No barrier spans the CTA inside the K loop: a warpgroup waits only for its stage's
// copies and its own wgmmas, and the last warp to be done with a stage (a count in shared memory)
// issues the x copy of the chunk STAGES on, while the other warpgroups keep the tensor cores busy.
//
// Template parameters
//   BITS, GROUP, T   as lut_gemm
//   BM      columns of x (rows of M) a CTA: 32, 64 or 128; blockIdx.x steps M by BM
//   WG      warpgroups a CTA, each 64 weight rows (4 tiles of 16): blockIdx.y steps N by 64 WG
//   STAGES  chunks of codes, scales and x in shared memory, all in flight but the one in use
//   KS      CTAs of a cluster along z splitting K into contiguous ranges of chunks
//   BATCH   mma steps decoded before their wgmmas go as one group (1, 2, 4, 8)
//   SK      Stream-K (KS = 1): the grid's G CTAs along y split the units of work (strip, chunk) of
//           their M block evenly, a contiguous range each, whatever the count of strips, and a
//           strip shared by several is summed through global memory (finish_strip below)
//
// Dynamic shared memory (cuflute.kernels.KernelSpec.shared_bytes computes the same):
//   [pair LUT, 32 copies][STAGES][x of a chunk][STAGES][4 WG warps][a tile's codes and scales]
//   [STAGES][mbarrier, 8 bytes][STAGES][warps done with the stage, 4 bytes and 4 of padding]
//   and, once the K loop is over, the warps' sums from the start (KS > 1).
//
// A chunk's x in shared memory, laid out for the wgmma B descriptor (K-major, no swizzle): a
// core matrix is 8 rows of x (m) by 8 k, 16 bytes a row, 128 bytes in all. Step s of the chunk
// takes the packed layout's permuted k (lut_gemm.cuh): its logical k 2t + e and 8 + 2t + e
// (t = 0..3, e = 0, 1) are the chunk's k 32 j + 8 t + 4 h + e and 32 j + 8 t + 4 h + 2 + e,
// s = 2 j + h. So the 4-byte word t of a row of the core matrix of half u of step s is
// x[m][32 j + 8 t + 4 h + 2 u, +2), and with combo = 4 j + 2 h + u = 2 s + u the core matrices go
//
//   byte combo * BM * 16 + m * 16 + t * 4
//
// (leading byte offset, the next 8 k: BM * 16; stride byte offset, the next 8 rows: 128). With
// q = 2 h + u that word is x's word 16 j + 4 t + q of the chunk: each 64-byte run of a row of x
// (32 k) is a 4 x 4 transpose of words away from its four combos' 16-byte rows.

#pragma once
#include "lut_gemm.cuh"

namespace cuflute {

// d (N / 2 floats a thread) += a (the warp's 16 rows of A, 4 words a lane, as mma.sync's A
// fragment) x B (N columns, from the shared-memory descriptor b): wgmma with A from registers,
// scale-d 1, B not transposed.
template <typename T, int N> struct Wgmma;

// The operands of one shape: the asm's accumulator list and the a and b after it, then the
// accumulators' constraints, eight at a time.
#define CUFLUTE_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), \
                      "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define CUFLUTE_N32_OPERANDS "%0, %1, %2, %3, %4, %5, %6, %7, "                                   \
                             "%8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20"
#define CUFLUTE_N64_OPERANDS "%0, %1, %2, %3, %4, %5, %6, %7, "                                   \
                             "%8, %9, %10, %11, %12, %13, %14, %15, "                             \
                             "%16, %17, %18, %19, %20, %21, %22, %23, "                           \
                             "%24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36"
#define CUFLUTE_WGMMA(CXX, PTX, N, OPERANDS, ...)                                                 \
  template <> struct Wgmma<CXX, N> {                                                              \
    static __device__ __forceinline__ void mma(float (&d)[N / 2], const u32 (&a)[4],              \
                                               unsigned long long b) {                            \
      asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " {" OPERANDS    \
                   ", 1, 1, 1, 0;\n"                                                              \
                   : __VA_ARGS__                                                                  \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                         \
    }                                                                                             \
  };

CUFLUTE_WGMMA(__half, "f16", 32, CUFLUTE_N32_OPERANDS, CUFLUTE_D8(0), CUFLUTE_D8(8))
CUFLUTE_WGMMA(__nv_bfloat16, "bf16", 32, CUFLUTE_N32_OPERANDS, CUFLUTE_D8(0), CUFLUTE_D8(8))
CUFLUTE_WGMMA(__half, "f16", 64, CUFLUTE_N64_OPERANDS, CUFLUTE_D8(0), CUFLUTE_D8(8), CUFLUTE_D8(16), CUFLUTE_D8(24))
CUFLUTE_WGMMA(__nv_bfloat16, "bf16", 64, CUFLUTE_N64_OPERANDS, CUFLUTE_D8(0), CUFLUTE_D8(8), CUFLUTE_D8(16),
              CUFLUTE_D8(24))
#undef CUFLUTE_WGMMA
#undef CUFLUTE_N64_OPERANDS
#undef CUFLUTE_N32_OPERANDS
#undef CUFLUTE_D8

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// The accumulators are written by the tensor cores between a wgmma and its wait: the compiler
// must not move their reads (or the zeroing) across the wait.
template <int R> __device__ __forceinline__ void fence_registers(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}
// Shared memory written by the generic proxy (cp.async, stores) and read next by the tensor cores.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// A wgmma shared-memory descriptor, no swizzle: start address, leading and stride byte offsets.
__device__ __forceinline__ unsigned long long smem_descriptor(u32 address, u32 leading, u32 stride) {
  return (unsigned long long)((address & 0x3FFFF) >> 4) | (unsigned long long)(leading >> 4) << 16 |
         (unsigned long long)(stride >> 4) << 32;
}

// mbarrier (sm_90): a stage's copies complete on its barrier, which counts their bytes.
__device__ __forceinline__ void mbarrier_init(u32 barrier, u32 arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(barrier), "r"(arrivals) : "memory");
}
// Barrier inits visible to the copy engine (the async proxy) and the cluster.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_bytes(u32 barrier, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(barrier), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(u32 barrier, u32 parity) {
  u32 done;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(barrier), "r"(parity) : "memory");
  } while (!done);
}
// `bytes` (a multiple of 16) global -> shared by the copy engine, counted on `barrier`.
__device__ __forceinline__ void copy_bulk(u32 dst, const void* src, u32 bytes, u32 barrier) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(barrier) : "memory");
}
__device__ __forceinline__ u32 global_add_acq_rel(u32* address, u32 value) {
  u32 old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;\n" : "=r"(old) : "l"(address), "r"(value) : "memory");
  return old;
}
__device__ __forceinline__ u32 shared_add_acq_rel(u32 address, u32 value) {
  u32 old;
  asm volatile("atom.acq_rel.cta.shared::cta.add.u32 %0, [%1], %2;\n" : "=r"(old) : "r"(address), "r"(value) : "memory");
  return old;
}

// x rewritten as the chunks' shared-memory images (the header's layout), so that a CTA copies a
// chunk's x as one bulk copy: uint4 [ceil(M / BM)][k_chunks][32 combos][BM rows], zero past M and
// K. Thread u takes one 64-byte run of x, 32 k of one row (row r = u % BM of its m block, run j of
// chunk c), and writes the run's rows of combos 4 j to 4 j + 3: word t of combo 4 j + q is word q
// of the run's t-th 16 bytes. x's rows are 16-byte aligned and K is a multiple of 8
// (cuflute.interop, the packer), so 16 bytes of x are all inside [0, K) or all past it.
constexpr int kXImageThreads = 256;  // cuflute.kernels.XImageSpec.THREADS

// It also zeroes the Stream-K launch's `n_arrivals` counts (below), after the grid before it, the
// last to count on them, is done.
template <int BM>
__global__ void __launch_bounds__(kXImageThreads)
wgmma_x_image(const u32* __restrict__ x, long long x_row_stride, uint4* __restrict__ image, int M, int K,
              int k_chunks, u32* __restrict__ arrivals, int n_arrivals) {
  launch_dependent_grids();  // lut_wgmma's LUT fill overlaps this grid; it waits for the image
  wait_for_prior_grid();
  for (int u = blockIdx.x * kXImageThreads + threadIdx.x; u < n_arrivals; u += gridDim.x * kXImageThreads)
    arrivals[u] = 0;
  const long long units = (long long)(M + BM - 1) / BM * BM * k_chunks * 8;
  for (long long u = (long long)blockIdx.x * kXImageThreads + threadIdx.x; u < units;
       u += (long long)gridDim.x * kXImageThreads) {
    const int r = u % BM, j = u / BM % 8;
    const long long block_chunk = u / BM / 8;  // m block * k_chunks + c
    const int c = block_chunk % k_chunks, m = block_chunk / k_chunks * BM + r;
    const int k0 = kChunkK * c + 32 * j;
    uint4 v[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const bool valid = m < M && k0 + 8 * t < K;
      v[t] = valid ? __ldg(reinterpret_cast<const uint4*>(x + m * (x_row_stride / 2) + k0 / 2) + t)
                   : make_uint4(0, 0, 0, 0);
    }
    uint4* dst = image + (block_chunk * 32 + 4 * j) * BM + r;
    dst[0] = make_uint4(v[0].x, v[1].x, v[2].x, v[3].x);
    dst[BM] = make_uint4(v[0].y, v[1].y, v[2].y, v[3].y);
    dst[2 * BM] = make_uint4(v[0].z, v[1].z, v[2].z, v[3].z);
    dst[3 * BM] = make_uint4(v[0].w, v[1].w, v[2].w, v[3].w);
  }
}

template <int BITS, int GROUP, int BM, int WG, int STAGES, int KS, bool RC> struct WgmmaLayout {
  static_assert(BM == 32 || BM == 64 || BM == 128, "BM must be 32, 64 or 128");
  static constexpr int kWarps = 4 * WG;
  using Tile = WarpTile<BITS, GROUP, 1, 1, kXGlobal>;  // a warp's stage: its tile's codes, scales
  static constexpr int kLutBytes = CodeLayout<BITS>::kLutBytes;
  static constexpr int kComboBytes = BM * 16;             // the x of one combo (above)
  static constexpr int kXBytes = 2 * kStepsPerChunk * kComboBytes;
  static constexpr int kWarpStageBytes = RC ? 0 : kWarps * Tile::kStageBytes;  // a stage's codes, scales
  static constexpr int kPipelineBytes = kLutBytes + STAGES * (kXBytes + kWarpStageBytes);
  // Then a stage's barrier (8 bytes) and its count of warps done with it (4, padded to 8).
  static constexpr int kBarrierBytes = 16 * STAGES;
  static constexpr int kPartialBytes = KS > 1 ? 32 * kWarps * BM / 2 * 4 : 0;
  static constexpr int kBytes = kPipelineBytes + kBarrierBytes > kPartialBytes ? kPipelineBytes + kBarrierBytes
                                                                               : kPartialBytes;
  static __device__ __forceinline__ unsigned char* x_stage(unsigned char* smem, int i) {
    return smem + kLutBytes + (i % STAGES) * kXBytes;
  }
  static __device__ __forceinline__ unsigned char* warp_stage(unsigned char* smem, int warp, int i) {
    return smem + kLutBytes + STAGES * kXBytes + (i % STAGES) * kWarpStageBytes + warp * Tile::kStageBytes;
  }
  static __device__ __forceinline__ u32 full_barrier(unsigned char* smem, int i) {
    return shared_address(smem + kPipelineBytes + 8 * (i % STAGES));
  }
  static __device__ __forceinline__ u32* done_count(unsigned char* smem, int i) {
    return reinterpret_cast<u32*>(smem + kPipelineBytes + 8 * STAGES + 8 * (i % STAGES));
  }
};

template <int BITS, int GROUP, typename T, int BM, int WG, int STAGES, int KS, int BATCH, bool SK, bool RC>
__device__ __forceinline__ void lut_wgmma_cta(const uint4* __restrict__ x_image,
                                              const uint4* __restrict__ qweight,
                                              const u32* __restrict__ scales,
                                              const u32* __restrict__ pair_lut, T* __restrict__ y,
                                              int M, int N, int K, int k_chunks, int n_groups,
                                              float4* __restrict__ partials, u32* __restrict__ arrivals) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Smem = WgmmaLayout<BITS, GROUP, BM, WG, STAGES, KS, RC>;
  using Tile = typename Smem::Tile;
  using Layout = CodeLayout<BITS>;
  using Traits = DTypeTraits<T>;
  constexpr int kWarps = Smem::kWarps;
  constexpr int kThreads = 32 * kWarps;
  constexpr int kN = BM < 64 ? BM : 64;  // n of one wgmma; BM = 128 takes two a step
  constexpr int kMmas = BM / kN;
  constexpr int kBatch = BATCH;          // steps a wgmma group
  static_assert(kStepsPerChunk % kBatch == 0, "BATCH must divide a chunk's 16 steps");
  static_assert(KS >= 1 && KS <= 8, "KS must be 1 to 8 (a portable cluster)");
  static_assert(!SK || KS == 1, "Stream-K splits K without a cluster");
  extern __shared__ __align__(128) unsigned char smem[];
  check_dynamic_shared(Smem::kBytes);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2;
  const u32 lane_bytes = 4u * lane;
  const int n_tiles = (N + 15) / 16;
  const int m0 = blockIdx.x * BM;
  // The CTA's units of work, a strip of 64 WG weight rows by one chunk each, strip-major: unit0 and
  // on, cta_chunks of them. Without Stream-K: its strip blockIdx.y, the chunks of its part of K.
  // With it: units [g U / G, (g + 1) U / G) of the U of its M block, g = blockIdx.y of G.
  const int n_strips = (n_tiles + kWarps - 1) / kWarps;
  const int units = n_strips * k_chunks;
  auto cta_start = [&](int g) { return (int)((long long)g * units / gridDim.y); };
  const int split_chunks = (k_chunks + KS - 1) / KS;
  const int chunk0 = KS > 1 ? blockIdx.z * split_chunks : 0;
  const int unit0 = SK ? cta_start(blockIdx.y) : 0;
  const int cta_chunks = SK ? cta_start(blockIdx.y + 1) - unit0
                            : KS > 1 ? max(0, min(split_chunks, k_chunks - chunk0)) : k_chunks;
  auto strip_of = [&](int i) { return SK ? (unit0 + i) / k_chunks : (int)blockIdx.y; };
  auto chunk_of = [&](int i) { return SK ? (unit0 + i) % k_chunks : chunk0 + i; };

  // Each warp copies its own tile's codes and scales, cp.async, STAGES chunks ahead (zero past the
  // last tile), as lut_gemm's warps do; its commit groups count chunks. RC: each lane loads its
  // own words of them into registers instead, one chunk ahead, so that they cross shared memory
  // neither as the copy's writes nor as the reads back.
  auto copy_codes = [&](int i) {
    if (i < cta_chunks)
      copy_chunk_async<BITS, GROUP, 1>(Smem::warp_stage(smem, warp, i), qweight, scales, strip_of(i) * kWarps + warp,
                                       chunk_of(i), n_tiles, k_chunks, n_groups, lane);
    copy_async_commit();
  };
  // A warp past the last tile loads the last tile's: its rows are past N, never stored, and a
  // select of zeros here would wait for the loads (a chunk early).
  u32 next_words[Layout::kWords], next_scales[Tile::kGroupsPerChunk];
  auto load_codes = [&](int i) {
    if (i >= cta_chunks) return;
    const long long tile = min(strip_of(i) * kWarps + warp, n_tiles - 1);
    unpack_code_words<BITS>(next_words, qweight + (tile * k_chunks + chunk_of(i)) * BITS * 32 + lane);
#pragma unroll
    for (int j = 0; j < Tile::kGroupsPerChunk; ++j)
      next_scales[j] =
          GROUP == 0 ? 0u : __ldg(scales + (tile * n_groups + chunk_of(i) * Tile::kGroupsPerChunk + j) * 8 + gid);
  };
  // A chunk's x, one bulk copy counted on the stage's barrier, goes once every warp is done with
  // the stage: the last of them to be done (its wgmmas on it complete) issues the next.
  auto copy_x = [&](int i) {
    const u32 full = Smem::full_barrier(smem, i);
    mbarrier_arrive_expect_bytes(full, Smem::kXBytes);
    copy_bulk(shared_address(Smem::x_stage(smem, i)),
              x_image + ((long long)blockIdx.x * k_chunks + chunk_of(i)) * 32 * BM, Smem::kXBytes, full);
  };
  auto release_x = [&](int i) {
    __syncwarp();
    if (lane == 0 && shared_add_acq_rel(shared_address(Smem::done_count(smem, i)), 1) % kWarps == kWarps - 1 &&
        i + STAGES < cta_chunks) {
      fence_proxy_async();  // the other warpgroups' reads of the stage before the copy engine's writes
      copy_x(i + STAGES);
    }
  };

  if (threadIdx.x < STAGES) {
    mbarrier_init(Smem::full_barrier(smem, threadIdx.x), 1);
    *Smem::done_count(smem, threadIdx.x) = 0;
    fence_mbarrier_init();
  }
  // The LUT and the first chunks' codes before the wait for the grid ahead (wgmma_x_image, whose
  // image the x copies read).
  launch_dependent_grids();
  if constexpr (RC) {
    load_codes(0);
  } else {
#pragma unroll
    for (int i = 0; i < STAGES; ++i) copy_codes(i);
  }
  fill_lut<BITS, 32, 0, kThreads>(smem, pair_lut, threadIdx.x);
  wait_for_prior_grid();
  __syncthreads();
  if (threadIdx.x == 0)
    for (int i = 0; i < STAGES && i < cta_chunks; ++i) copy_x(i);

  float acc[kMmas][kN / 2];
  auto zero_acc = [&] {
#pragma unroll
    for (int q = 0; q < kMmas; ++q)
#pragma unroll
      for (int r = 0; r < kN / 2; ++r) acc[q][r] = 0.f;
  };
  zero_acc();

  // Accumulator r of wgmma q: row 16 (warp % 4) + gid + 8 ((r / 2) % 2) of the warpgroup's 64,
  // column q kN + 8 (r / 4) + 2 tig + r % 2.
  auto coord = [&](int strip, int t, int q, int r) {
    const int l = t & 31, w_ = t >> 5;
    return make_int2((strip * kWarps + w_) * 16 + (l >> 2) + 8 * ((r >> 1) & 1),
                     m0 + q * kN + 8 * (r >> 2) + 2 * (l & 3) + (r & 1));
  };
  auto row_scale = [&](int strip) {  // the rows' scales where a row is one group, else 1
    if constexpr (GROUP == 0) {
      const int tile = strip * kWarps + warp;
      return Traits::pair_to_float2(tile < n_tiles ? __ldg(scales + (long long)tile * n_groups * 8 + gid) : 0u);
    }
    return make_float2(1.f, 1.f);
  };
  auto store_y = [&](int strip) {
    const float2 sc = row_scale(strip);
#pragma unroll
    for (int q = 0; q < kMmas; ++q)
#pragma unroll
      for (int r = 0; r < kN / 2; ++r) {
        const int2 nm = coord(strip, threadIdx.x, q, r);
        if (nm.x < N && nm.y < M) y[(long long)nm.y * N + nm.x] = Traits::from_float(acc[q][r] * (r & 2 ? sc.y : sc.x));
      }
  };
  // Stream-K, at the last of the CTA's units of a strip: a strip whose every chunk was the CTA's
  // goes to y. Otherwise each warp's sums go to the CTA's slot in `partials`, and of the warps
  // that hold the same 16 rows in the strip's CTAs, the last to count itself in (`arrivals`, one
  // count a tile of the M block) adds the others' and stores y: no barrier across the CTA, whose
  // other warps go on with the next strip. A CTA has two slots, its first strip's and its last's:
  // any strip in between is whole. A slot is [BM / 8][threads] float4, thread-minor, so each load
  // and store is coalesced.
  auto finish_strip = [&](int strip) {
    const int first = strip * k_chunks;
    if (unit0 <= first && unit0 + cta_chunks >= first + k_chunks) {
      store_y(strip);
      return;
    }
    auto slot = [&](int g) {
      const int side = strip == cta_start(g) / k_chunks ? 0 : 1;
      return partials + (((long long)blockIdx.x * gridDim.y + g) * 2 + side) * (kThreads * BM / 8);
    };
    float4* mine = slot(blockIdx.y);
#pragma unroll
    for (int q = 0; q < kMmas; ++q)
#pragma unroll
      for (int r = 0; r < kN / 2; r += 4)
        __stcg(mine + (q * kN / 8 + r / 4) * kThreads + threadIdx.x,
               make_float4(acc[q][r], acc[q][r + 1], acc[q][r + 2], acc[q][r + 3]));
    __syncwarp();  // the lanes' stores before lane 0's release
    auto cta_of = [&](int u) { return (int)((((long long)u + 1) * gridDim.y - 1) / units); };  // holds unit u
    const int g_first = cta_of(first), g_last = cta_of(first + k_chunks - 1);
    u32 arrived = 0;
    if (lane == 0)
      arrived = global_add_acq_rel(arrivals + ((long long)blockIdx.x * n_strips + strip) * kWarps + warp, 1);
    if (__shfl_sync(~0u, arrived, 0) != (u32)(g_last - g_first)) return;
    __syncwarp();  // lane 0's acquire before the lanes' loads
    for (int g = g_first; g <= g_last; ++g) {
      if (g == (int)blockIdx.y) continue;
      const float4* theirs = slot(g);
#pragma unroll
      for (int q = 0; q < kMmas; ++q)
#pragma unroll
        for (int r = 0; r < kN / 2; r += 4) {
          const float4 v = __ldcg(theirs + (q * kN / 8 + r / 4) * kThreads + threadIdx.x);
          acc[q][r] += v.x;
          acc[q][r + 1] += v.y;
          acc[q][r + 2] += v.z;
          acc[q][r + 3] += v.w;
        }
    }
    store_y(strip);
  };

  const char* lut = reinterpret_cast<const char*>(smem);
  for (int i = 0; i < cta_chunks; ++i) {
    u32 w[Layout::kWords], chunk_scales[Tile::kGroupsPerChunk];
    if constexpr (RC) {
#pragma unroll
      for (int j = 0; j < Layout::kWords; ++j) w[j] = next_words[j];
#pragma unroll
      for (int j = 0; j < Tile::kGroupsPerChunk; ++j) chunk_scales[j] = next_scales[j];
      load_codes(i + 1);
    } else {
      copy_async_wait<STAGES - 1>();
      __syncwarp();  // the lanes' copies of the stage's scales, read by every lane
    }
    mbarrier_wait(Smem::full_barrier(smem, i), (i / STAGES) & 1);
    const unsigned char* stage = Smem::warp_stage(smem, warp, i);
    const u32 x_base = shared_address(Smem::x_stage(smem, i));
    u32 scale_lo = 0, scale_hi = 0;
    // kBatch steps decoded, then their wgmmas issued back to back as one group: the tensor cores
    // chain them on the accumulators while the next batch decodes.
#pragma unroll
    for (int s0 = 0; s0 < kStepsPerChunk; s0 += kBatch) {
      u32 a[kBatch][4];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int s = s0 + b;
#pragma unroll
        for (int v = 0; v < BITS; ++v)
          if (!RC && Layout::first_step(v) == s) set_code_vector<BITS>(w, v, Tile::stage_code_vector(stage, lane, 0, v));
        if (GROUP != 0 && s % Tile::kStepsPerGroup == 0) {
          const int j = s / Tile::kStepsPerGroup;
          const u32 scale = RC ? chunk_scales[j] : Tile::stage_scale(stage, lane, 0, j);
          scale_lo = __byte_perm(scale, 0, 0x1010);
          scale_hi = __byte_perm(scale, 0, 0x3232);
        }
#pragma unroll
        for (int p = 0; p < 4; ++p) a[b][p] = *reinterpret_cast<const u32*>(lut + Layout::lut_offset(w, s, p, lane_bytes));
        if constexpr (GROUP != 0) {
#pragma unroll
          for (int p = 0; p < 4; ++p) a[b][p] = Traits::mul_pairs(a[b][p], p & 1 ? scale_hi : scale_lo);
        }
      }
      wgmma_fence();
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
#pragma unroll
        for (int q = 0; q < kMmas; ++q)
          Wgmma<T, kN>::mma(acc[q], a[b], smem_descriptor(x_base + 2 * (s0 + b) * Smem::kComboBytes + q * kN / 8 * 128,
                                                          Smem::kComboBytes, 128));
      wgmma_commit();
      wgmma_wait<1>();
    }
    // Each warpgroup drains its own wgmmas at the end of a chunk (ptxas serializes a pipeline
    // that runs on across the loop's back edge), while the others keep the tensor cores busy.
    wgmma_wait<0>();
#pragma unroll
    for (int q = 0; q < kMmas; ++q) fence_registers(acc[q]);
    if constexpr (!RC) copy_codes(i + STAGES);
    release_x(i);
    if constexpr (SK) {
      if (chunk_of(i) == k_chunks - 1 || i == cta_chunks - 1) {
        finish_strip(strip_of(i));
        zero_acc();
      }
    }
  }
  if constexpr (!RC) copy_async_wait<0>();  // only empty groups are left, but none may land on reused memory
  if constexpr (KS == 1 && !SK) {  // (Stream-K stored each strip at its end, in the loop)
    store_y(blockIdx.y);
  } else if constexpr (KS > 1) {
    const float2 sc = row_scale(blockIdx.y);
    float* partial = reinterpret_cast<float*>(smem);
    __syncthreads();  // every warp is past its last LUT and stage read
#pragma unroll
    for (int q = 0; q < kMmas; ++q)
#pragma unroll
      for (int r = 0; r < kN / 2; ++r)
        partial[(q * kN / 2 + r) * kThreads + threadIdx.x] = acc[q][r] * (r & 2 ? sc.y : sc.x);
    cluster_sync();
    // CTA z of the cluster adds and stores accumulators z, z + KS, ... of every thread, all its
    // loads from the cluster's CTAs issued before the first sum waits on one. With KS = 3 the
    // shares differ by one: a CTA's last may be past the thread's BM / 2.
    constexpr int kAcc = BM / 2, kShare = (kAcc + KS - 1) / KS;
    auto mine = [&](int jj) { return kAcc % KS == 0 || (int)blockIdx.z + jj * KS < kAcc; };
    float sum[kShare];
#pragma unroll
    for (int jj = 0; jj < kShare; ++jj) {
      const u32 address = shared_address(partial + (blockIdx.z + jj * KS) * kThreads + threadIdx.x);
      sum[jj] = 0.f;
      if (!mine(jj)) continue;
#pragma unroll
      for (int z = 0; z < KS; ++z) sum[jj] += load_cluster_shared(address, z);
    }
#pragma unroll
    for (int jj = 0; jj < kShare; ++jj) {
      const int j = blockIdx.z + jj * KS;
      const int2 nm = coord(blockIdx.y, threadIdx.x, j / (kN / 2), j % (kN / 2));
      if (mine(jj) && nm.x < N && nm.y < M) y[(long long)nm.y * N + nm.x] = Traits::from_float(sum[jj]);
    }
    cluster_sync();  // no CTA leaves while the others read its sums
  }
#else
  __trap();  // wgmma needs sm_90a (cuflute.kernels builds these for it alone)
#endif
}

template <int BITS, int GROUP, typename T, int BM, int WG, int STAGES, int KS, int BATCH, bool SK, bool RC>
__global__ void CUFLUTE_CLUSTER_ALONG_Z(KS) __launch_bounds__(128 * WG, 1)
lut_wgmma(const uint4* __restrict__ x_image, const uint4* __restrict__ qweight, const u32* __restrict__ scales,
          const u32* __restrict__ pair_lut, T* __restrict__ y, int M, int N, int K, int k_chunks, int n_groups,
          float4* __restrict__ partials, u32* __restrict__ arrivals) {
  lut_wgmma_cta<BITS, GROUP, T, BM, WG, STAGES, KS, BATCH, SK, RC>(x_image, qweight, scales, pair_lut, y, M, N, K,
                                                               k_chunks, n_groups, partials, arrivals);
}

}  // namespace cuflute

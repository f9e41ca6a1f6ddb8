// Per-dtype pieces of the LUT GEMM: conversions and the tensor-core instruction
// (m16n8k16, fp32 accumulate).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cuflute {

using u32 = unsigned int;

template <typename T> struct DTypeTraits;

template <> struct DTypeTraits<__half> {
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  // A word of two values (a scale word {S[row gid], S[row gid + 8]}, a pair LUT entry) as floats.
  static __device__ __forceinline__ float2 pair_to_float2(u32 w) {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
  static __device__ __forceinline__ u32 pair_from_float2(float2 v) {
    const __half2 h = __float22half2_rn(v);
    return *reinterpret_cast<const u32*>(&h);
  }
  // Two values times two, each product rounded once (as lut_dequant's float32 product, rounded:
  // the product of two of these is exact in float32).
  static __device__ __forceinline__ u32 mul_pairs(u32 a, u32 b) {
    const __half2 h = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const u32*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4],
                                             u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct DTypeTraits<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  // A word of two values (a scale word {S[row gid], S[row gid + 8]}, a pair LUT entry) as floats:
  // a bfloat16 is a float's high half. Written as the shift and the mask, not as
  // __bfloat1622float2, with which ptxas spilled 20 bytes of nt5_mt2_wk4 (4-bit, g = 128, sm_90).
  static __device__ __forceinline__ float2 pair_to_float2(u32 w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
  static __device__ __forceinline__ u32 pair_from_float2(float2 v) {
    const __nv_bfloat162 h = __float22bfloat162_rn(v);
    return *reinterpret_cast<const u32*>(&h);
  }
  // Two values times two, each product rounded once (as lut_dequant's float32 product, rounded:
  // the product of two of these is exact in float32).
  static __device__ __forceinline__ u32 mul_pairs(u32 a, u32 b) {
    const __nv_bfloat162 h = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                     *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const u32*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4],
                                             u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

}  // namespace cuflute

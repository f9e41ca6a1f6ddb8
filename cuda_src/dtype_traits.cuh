// Per-dtype pieces of the LUT GEMM: the packed pair type, the scale multiply,
// the float conversion and the tensor-core instruction (m16n8k16, fp32 accumulate).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cuflute {

using u32 = unsigned int;

template <typename T> struct DTypeTraits;

template <> struct DTypeTraits<__half> {
  using pair_t = __half2;
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  // One HMUL2: the pair {T[q0], T[q1]} times the row's group scale, each product rounded
  // once to the dtype (cuflute.reference.dequantize rounds the same way).
  static __device__ __forceinline__ u32 scale_pair(u32 pair, __half2 scale) {
    __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&pair), scale);
    return *reinterpret_cast<u32*>(&r);
  }
  static __device__ __forceinline__ __half2 broadcast_low(u32 w) {
    return __low2half2(*reinterpret_cast<const __half2*>(&w));
  }
  static __device__ __forceinline__ __half2 broadcast_high(u32 w) {
    return __high2half2(*reinterpret_cast<const __half2*>(&w));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4],
                                             u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct DTypeTraits<__nv_bfloat16> {
  using pair_t = __nv_bfloat162;
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ u32 scale_pair(u32 pair, __nv_bfloat162 scale) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&pair), scale);
    return *reinterpret_cast<u32*>(&r);
  }
  static __device__ __forceinline__ __nv_bfloat162 broadcast_low(u32 w) {
    return __low2bfloat162(*reinterpret_cast<const __nv_bfloat162*>(&w));
  }
  static __device__ __forceinline__ __nv_bfloat162 broadcast_high(u32 w) {
    return __high2bfloat162(*reinterpret_cast<const __nv_bfloat162*>(&w));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4],
                                             u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

}  // namespace cuflute

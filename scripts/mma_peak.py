"""The tensor cores' rate for lut_gemm's instruction (mma.sync m16n8k16, fp32 accumulate), as
a floor for the large-M regime: every m16n8k16 that a LUT GEMM of M columns issues is at least
N K M / 2048 of them, whatever its tiles (a development tool, run on the device machine).

python scripts/mma_peak.py            # fp16 and bf16, 1 to 4 warps a scheduler

Each warp runs CHAINS independent accumulators through the same A and B fragments (the rate,
not the latency, is measured); the FLOPs over the event-timed run, median of 5.
"""
import cupy

from cuflute.kernels import compile_options

CHAINS = 8
STEPS = 4096

SOURCE = r"""
#include "dtype_traits.cuh"
template <typename T>
__global__ void mma_chains(float* out, int steps) {
  using cuflute::u32;
  const u32 lane = threadIdx.x & 31;
  const u32 a[4] = {0x3c003c00u ^ lane, 0x3c003c00u, 0x3c003c00u ^ (lane << 3), 0x3c003c00u};
  const u32 b0 = 0x38003800u ^ lane, b1 = 0x38003800u;
  float c[%(chains)d][4] = {};
  for (int i = 0; i < steps; ++i)
#pragma unroll
    for (int j = 0; j < %(chains)d; ++j) cuflute::DTypeTraits<T>::mma(c[j], a, b0, b1);
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < %(chains)d; ++j) sum += c[j][0] + c[j][1] + c[j][2] + c[j][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;  // keeps the chains alive
}
""" % {"chains": CHAINS}


def main():
    props = cupy.cuda.runtime.getDeviceProperties(0)
    sms = props["multiProcessorCount"]
    clock_ghz = cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrClockRate, 0) / 1e6
    module = cupy.RawModule(code=SOURCE, options=compile_options(),
                            name_expressions=["mma_chains<__half>", "mma_chains<__nv_bfloat16>"])
    print(f"{props['name'].decode()}: {sms} SMs, boost clock {clock_ghz:.2f} GHz")
    print("dtype    warps/scheduler  TFLOP/s  mma/clock/SM (at the boost clock)")
    for dtype in ("__half", "__nv_bfloat16"):
        kernel = module.get_function(f"mma_chains<{dtype}>")
        for warps_per_scheduler in (1, 2, 4):
            threads = 4 * 32 * warps_per_scheduler
            out = cupy.empty(sms * threads, dtype=cupy.float32)
            kernel((sms,), (threads,), (out, cupy.int32(STEPS)))  # warm-up
            times = []
            for _ in range(5):
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                kernel((sms,), (threads,), (out, cupy.int32(STEPS)))
                end.record()
                end.synchronize()
                times.append(cupy.cuda.get_elapsed_time(start, end) * 1e-3)
            seconds = sorted(times)[2]
            mmas = sms * threads // 32 * STEPS * CHAINS
            tflops = mmas * 16 * 8 * 16 * 2 / seconds / 1e12
            per_clock = mmas / sms / (seconds * clock_ghz * 1e9)
            print(f"{dtype:<14} {warps_per_scheduler:>5} {tflops:>12.0f} {per_clock:>10.2f}")


if __name__ == "__main__":
    main()

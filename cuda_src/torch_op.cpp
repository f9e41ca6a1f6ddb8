// torch.ops.cuflute.qgemm's CUDA kernel in C++: the eager launch path without Python.
//
// The op is defined, and implemented in Python, by cuflute/torch.py. Through the dispatcher a
// Python kernel costs about 6 us of host time a call before it does anything (the boxing of
// nine arguments into Python objects); this one reads the arguments unboxed, allocates the
// output, looks the launch up in its own table and calls cuLaunchKernelEx. What it does not
// know it asks Python once per (weight, M):
//
//   planner(x, qweight, scales, pair_lut, n, k, bits, group_size, dtype)
//       -> (CUfunction address, grid x, y, z, threads, shared bytes, k_chunks, n_groups,
//           programmatic), or None where one lut_gemm launch does not do it (the dense path,
//           a warpgroup config's x image and lut_wgmma);
//           programmatic: launch it as a programmatic dependent launch (cuflute/gemm.py)
//   fallback(same arguments) -> the output: the Python kernel, for everything else (errors,
//       x that is not a contiguous 16-byte-aligned [.., K] tensor, M = 0, the planner's None)
//
// A plan depends only on the key's addresses, sizes, dtype, M and device: memory freed and
// reused at the same addresses with the same sizes holds a weight of the same layout (the
// same argument as cuflute/torch.py's views). The driver is reached through dlsym on the
// libcuda that CuPy and torch have loaded: nothing to link, no CUDA toolkit version to match.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <dlfcn.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>

namespace {

namespace py = pybind11;

using CUresult = int;
using CUfunction = void*;
using CUcontext = void*;
// CUlaunchAttribute and CUlaunchConfig as cuda.h lays them out (cuflute/gemm.py has the same).
struct LaunchAttribute {
  unsigned id, pad;
  int value[16];
};
struct LaunchConfig {
  unsigned grid[3], block[3], shared_bytes;
  cudaStream_t stream;
  LaunchAttribute* attrs;
  unsigned num_attrs;
};
static_assert(sizeof(LaunchAttribute) == 72 && sizeof(LaunchConfig) == 56,
              "CUlaunchAttribute / CUlaunchConfig layout");
constexpr unsigned kProgrammaticStreamSerialization = 6;  // CUlaunchAttributeID
using LaunchKernelEx = CUresult (*)(const LaunchConfig*, CUfunction, void**, void**);
using CtxGetCurrent = CUresult (*)(CUcontext*);
using GetErrorString = CUresult (*)(CUresult, const char**);

struct Driver {
  LaunchKernelEx launch_kernel_ex = nullptr;
  CtxGetCurrent ctx_get_current = nullptr;
  GetErrorString get_error_string = nullptr;

  Driver() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    TORCH_CHECK(lib != nullptr, "cuflute: libcuda.so.1 not found: ", dlerror());
    launch_kernel_ex = reinterpret_cast<LaunchKernelEx>(dlsym(lib, "cuLaunchKernelEx"));
    ctx_get_current = reinterpret_cast<CtxGetCurrent>(dlsym(lib, "cuCtxGetCurrent"));
    get_error_string = reinterpret_cast<GetErrorString>(dlsym(lib, "cuGetErrorString"));
    TORCH_CHECK(launch_kernel_ex && ctx_get_current && get_error_string,
                "cuflute: libcuda.so.1 lacks cuLaunchKernelEx, cuCtxGetCurrent or cuGetErrorString");
  }
};

const Driver& driver() {
  static const Driver d;
  return d;
}

struct Key {
  std::uintptr_t qweight, scales, pair_lut;
  int64_t n, k, bits, group_size, m;
  int dtype, device;
  bool operator==(const Key& o) const {
    return qweight == o.qweight && scales == o.scales && pair_lut == o.pair_lut && n == o.n &&
           k == o.k && bits == o.bits && group_size == o.group_size && m == o.m &&
           dtype == o.dtype && device == o.device;
  }
};

struct KeyHash {
  size_t operator()(const Key& key) const {
    size_t h = std::hash<std::uintptr_t>()(key.qweight);
    for (int64_t v : {int64_t(key.scales), int64_t(key.pair_lut), key.n, key.k, key.bits,
                      key.group_size, key.m, int64_t(key.dtype), int64_t(key.device)})
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};

struct Plan {
  bool direct;  // false: the Python fallback runs this call
  CUfunction function;
  unsigned grid[3], threads, shared_bytes;
  int k_chunks, n_groups;
  bool programmatic;
};

constexpr size_t kMaxPlans = 1 << 16;
std::mutex plans_mutex;
std::unordered_map<Key, Plan, KeyHash> plans;
// Leaked on purpose: destroying Python objects after the interpreter has gone would crash.
py::object* planner = nullptr;
py::object* fallback = nullptr;

at::Tensor call_fallback(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& pair_lut, int64_t n, int64_t k, int64_t bits,
                         int64_t group_size, c10::string_view dtype) {
  py::gil_scoped_acquire gil;
  return (*fallback)(x, qweight, scales, pair_lut, n, k, bits, group_size, std::string(dtype))
      .cast<at::Tensor>();
}

Plan make_plan(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& pair_lut, int64_t n, int64_t k, int64_t bits,
               int64_t group_size, c10::string_view dtype) {
  py::gil_scoped_acquire gil;
  py::object answer =
      (*planner)(x, qweight, scales, pair_lut, n, k, bits, group_size, std::string(dtype));
  Plan plan{};
  if (answer.is_none()) return plan;
  auto t = answer.cast<py::tuple>();
  plan.direct = true;
  plan.function = reinterpret_cast<CUfunction>(t[0].cast<std::uintptr_t>());
  for (int i = 0; i < 3; ++i) plan.grid[i] = t[1 + i].cast<unsigned>();
  plan.threads = t[4].cast<unsigned>();
  plan.shared_bytes = t[5].cast<unsigned>();
  plan.k_chunks = t[6].cast<int>();
  plan.n_groups = t[7].cast<int>();
  plan.programmatic = t[8].cast<bool>();
  return plan;
}

at::Tensor qgemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& pair_lut, int64_t n, int64_t k, int64_t bits,
                      int64_t group_size, c10::string_view dtype) {
  const int dtype_code = dtype == "float16" ? 0 : dtype == "bfloat16" ? 1 : -1;
  const at::ScalarType scalar = dtype_code == 1 ? at::kBFloat16 : at::kHalf;
  const bool launchable =
      dtype_code >= 0 && x.scalar_type() == scalar && x.dim() >= 1 && x.size(-1) == k &&
      k % 8 == 0 && n > 0 && x.numel() > 0 && x.is_contiguous() &&
      reinterpret_cast<std::uintptr_t>(x.data_ptr()) % 16 == 0 &&
      qweight.device() == x.device() && scales.device() == x.device() &&
      pair_lut.device() == x.device();
  if (!launchable) return call_fallback(x, qweight, scales, pair_lut, n, k, bits, group_size, dtype);

  const int64_t m = x.numel() / k;
  const int device = x.get_device();
  const Key key{reinterpret_cast<std::uintptr_t>(qweight.data_ptr()),
                reinterpret_cast<std::uintptr_t>(scales.data_ptr()),
                reinterpret_cast<std::uintptr_t>(pair_lut.data_ptr()),
                n, k, bits, group_size, m, dtype_code, device};
  Plan plan;
  bool found;
  {
    std::lock_guard<std::mutex> lock(plans_mutex);
    auto it = plans.find(key);
    found = it != plans.end();
    if (found) plan = it->second;
  }
  if (!found) {
    plan = make_plan(x, qweight, scales, pair_lut, n, k, bits, group_size, dtype);
    std::lock_guard<std::mutex> lock(plans_mutex);
    if (plans.size() >= kMaxPlans) plans.clear();
    plans.emplace(key, plan);
  }
  if (!plan.direct) return call_fallback(x, qweight, scales, pair_lut, n, k, bits, group_size, dtype);

  c10::cuda::CUDAGuard guard(x.device());
  const Driver& cu = driver();
  CUcontext context = nullptr;
  if (cu.ctx_get_current(&context) == 0 && context == nullptr) {
    // A thread that never made the device's primary context current (since CUDA 12,
    // cudaSetDevice does; the guard skips it when the device is already the current one).
    C10_CUDA_CHECK(cudaSetDevice(device));
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());

  const void* x_ptr = x.data_ptr();
  long long x_row_stride = k;
  const void* q_ptr = qweight.data_ptr();
  const void* s_ptr = scales.data_ptr();
  const void* lut_ptr = pair_lut.data_ptr();
  void* y_ptr = out.data_ptr();
  int sizes[5] = {int(m), int(n), int(k), plan.k_chunks, plan.n_groups};
  // lut_gemm(x, x_row_stride, qweight, scales, pair_lut, y, M, N, K, k_chunks, n_groups)
  void* params[] = {&x_ptr, &x_row_stride, &q_ptr, &s_ptr, &lut_ptr, &y_ptr,
                    &sizes[0], &sizes[1], &sizes[2], &sizes[3], &sizes[4]};
  LaunchAttribute programmatic{kProgrammaticStreamSerialization, 0, {1}};
  const LaunchConfig config{{plan.grid[0], plan.grid[1], plan.grid[2]}, {plan.threads, 1, 1},
                            plan.shared_bytes, c10::cuda::getCurrentCUDAStream(device).stream(),
                            &programmatic, plan.programmatic ? 1u : 0u};
  const CUresult status = cu.launch_kernel_ex(&config, plan.function, params, nullptr);
  if (status != 0) {
    const char* text = "unknown error";
    cu.get_error_string(status, &text);
    TORCH_CHECK(false, "cuflute: cuLaunchKernelEx failed: ", text);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cuflute, CUDA, m) { m.impl("qgemm", &qgemm_cuda); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_python_side", [](py::object plan, py::object python_kernel) {
    planner = new py::object(std::move(plan));
    fallback = new py::object(std::move(python_kernel));
  });
  m.def("plan_count", [] {
    std::lock_guard<std::mutex> lock(plans_mutex);
    return plans.size();
  });
}

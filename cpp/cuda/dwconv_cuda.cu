// CUDA sparse depth-wise conv: the phases of dwconv_block.h run by one thread block per
// (32-channel group, spatial tile, image), with barriers between them; fp32 / fp16 / bf16 I/O, fp32 accumulation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "dwconv_block.h"
#include "dwconv_cuda.h"

namespace deprune {
namespace cuda {
namespace {

using namespace cuda_block;

struct IOHalf {
  static __device__ __forceinline__ float load(const void* base, int64_t i) {
    return __half2float(static_cast<const __half*>(base)[i]);
  }
  static __device__ __forceinline__ void store(void* base, int64_t i, float v) {
    static_cast<__half*>(base)[i] = __float2half_rn(v);
  }
};

struct IOBFloat16 {
  static __device__ __forceinline__ float load(const void* base, int64_t i) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
  static __device__ __forceinline__ void store(void* base, int64_t i, float v) {
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  }
};

// Grid: x = spatial tile, y = group (from group_base), z = image (from n_base); y/z are capped at 65535 per launch.
template <class IO, Layout L>
__global__ void __launch_bounds__(kThreads) sparse_dwconv2d_kernel(KernelParams p, int64_t group_base,
                                                                    int64_t n_base) {
  extern __shared__ __align__(16) unsigned char smem[];
  const BlockCoord b{static_cast<int32_t>(blockIdx.x), group_base + blockIdx.y, n_base + blockIdx.z};
  const int tid = static_cast<int>(threadIdx.x);
  ThreadState st;
  init_state(st);
  const int32_t chunks = num_chunks(p, b);  // uniform across the block, so every barrier below is reached by all
  for (int32_t k = 0; k < chunks; ++k) {
    if (k > 0) __syncthreads();  // the previous chunk is fully consumed before it is overwritten
    phase_load(p, b, tid, kThreads, smem, k);
    __syncthreads();
    phase_accumulate<IO, L>(p, b, tid, smem, k, st);
  }
  phase_store<IO, L>(p, b, tid, st);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("sparse_dwconv2d (CUDA): ") + what + " failed: " + cudaGetErrorString(err));
}

template <class IO, Layout L>
void launch(const KernelParams& p, cudaStream_t stream) {
  constexpr int64_t kMaxGridYZ = 65535;
  const size_t smem = shared_bytes(p.chunk);
  for (int64_t g0 = 0; g0 < p.groups; g0 += kMaxGridYZ) {
    for (int64_t n0 = 0; n0 < p.s.N; n0 += kMaxGridYZ) {
      const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(std::min(kMaxGridYZ, p.groups - g0)),
                      static_cast<unsigned>(std::min(kMaxGridYZ, p.s.N - n0)));
      sparse_dwconv2d_kernel<IO, L><<<grid, kThreads, smem, stream>>>(p, g0, n0);
      check(cudaGetLastError(), "kernel launch");
    }
  }
}

template <class IO>
void launch_layout(const KernelParams& p, Layout layout, cudaStream_t stream) {
  if (layout == Layout::NCHW)
    launch<IO, Layout::NCHW>(p, stream);
  else
    launch<IO, Layout::NHWC>(p, stream);
}

}  // namespace

bool compiled() { return true; }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" error so later runtime calls are unaffected
    return 0;
  }
  return count;
}

void sparse_dwconv2d(const DWConvShape& shape, const SparseTaps& taps, const float* bias, Activation act,
                     DType dtype, Layout layout, const void* x, void* y, int device, std::uintptr_t stream) {
  const KernelParams p = make_params(shape, taps, bias, act, layout, x, y);
  // Launch on the input's device, then restore the caller's current device (torch tracks its own).
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  check(cudaSetDevice(device), ("cudaSetDevice(" + std::to_string(device) + ")").c_str());
  struct Restore {
    int dev;
    ~Restore() { cudaSetDevice(dev); }
  } restore{previous};
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32: launch_layout<IOFloat>(p, layout, s); break;
    case DType::Float16: launch_layout<IOHalf>(p, layout, s); break;
    case DType::BFloat16: launch_layout<IOBFloat16>(p, layout, s); break;
    default: throw std::invalid_argument("sparse_dwconv2d (CUDA): unknown dtype code " +
                                         std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace cuda
}  // namespace deprune

// CUDA sparse depth-wise conv: the block programs of dwconv_block.h (NCHW: one thread block per 32-channel group,
// spatial tile and image) and dwconv_cl.h (channels_last: channel-block tiles x pixel strips), with barriers
// between their phases; fp32 / fp16 / bf16 I/O, fp32 accumulation.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "dwconv_block.h"
#include "dwconv_cl.h"
#include "dwconv_cuda.h"

namespace deprune {
namespace cuda {
namespace {

using namespace cuda_block;

// One thread of the block: run_block's per-thread code runs for this thread, its barriers are __syncthreads().
struct DeviceThread {
  ThreadState st;
  __device__ __forceinline__ ThreadState& state(int) { return st; }
  template <class F>
  __device__ __forceinline__ void each(const F& f) {
    f(static_cast<int>(threadIdx.x));
  }
  __device__ __forceinline__ void barrier() { __syncthreads(); }
  __device__ __forceinline__ void finish() {}
};

// Grid and block program: dwconv_block.h (for_each_launch, block_coord, run_block).
template <class IO>
__global__ void __launch_bounds__(kThreads) sparse_dwconv2d_kernel(KernelParams p, int64_t group_base,
                                                                    int64_t n_base) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceThread thread;
  run_block<IO>(p, block_coord(blockIdx.x, blockIdx.y, blockIdx.z, group_base, n_base), smem, thread);
}

// channels_last: dwconv_cl.h (for_each_cl_launch, run_cl_block); blockDim.x = p.threads.
template <class IO>
__global__ void __launch_bounds__(cuda_cl::kMaxThreads) sparse_dwconv2d_cl_kernel(cuda_cl::ClParams p,
                                                                                    int64_t ptile_base,
                                                                                    int64_t ctile_base) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceThread thread;
  cuda_cl::run_cl_block<IO>(p, ptile_base + blockIdx.x, ctile_base + blockIdx.y, smem, thread);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("sparse_dwconv2d (CUDA): ") + what + " failed: " + cudaGetErrorString(err));
}

// Multiprocessors of `device`, read once per device (the channels_last geometry depends on it).
int multiprocessors(int device) {
  static std::atomic<int> cache[64] = {};
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  if (device >= 0 && device < 64) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

template <class IO>
void launch(const DWConvShape& shape, const SparseTaps& taps, const BlockTaps& block, const float* bias,
            Activation act, Layout layout, const void* x, void* y, int device, cudaStream_t stream) {
  if (layout == Layout::NCHW) {
    const KernelParams p = make_params(shape, taps, bias, act, x, y);
    const size_t smem = shared_bytes(p.chunk);
    for_each_launch(p, [&](const GridLaunch& g) {
      sparse_dwconv2d_kernel<IO><<<dim3(g.tiles, g.groups, g.images), kThreads, smem, stream>>>(p, g.group_base,
                                                                                                g.n_base);
      check(cudaGetLastError(), "kernel launch");
    });
    return;
  }
  const cuda_cl::ClParams p = cuda_cl::make_cl_params(shape, block, bias, act, x, y, multiprocessors(device));
  const size_t smem = cuda_cl::cl_shared_bytes(p);
  cuda_cl::for_each_cl_launch(p, [&](const cuda_cl::ClLaunch& g) {
    sparse_dwconv2d_cl_kernel<IO><<<dim3(g.pixel_tiles, g.channel_tiles), p.threads, smem, stream>>>(
        p, g.ptile_base, g.ctile_base);
    check(cudaGetLastError(), "kernel launch");
  });
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

void sparse_dwconv2d(const DWConvShape& shape, const SparseTaps& taps, const BlockTaps& block, const float* bias,
                     Activation act, DType dtype, Layout layout, const void* x, void* y, int device,
                     std::uintptr_t stream) {
  // Launch on the input's device; when it is not the current one, switch and restore the caller's (torch tracks its
  // own). The usual case, x on the current device, costs one cudaGetDevice.
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  struct Restore {
    int dev;
    ~Restore() {
      if (dev >= 0) cudaSetDevice(dev);
    }
  } restore{-1};
  if (previous != device) {
    check(cudaSetDevice(device), ("cudaSetDevice(" + std::to_string(device) + ")").c_str());
    restore.dev = previous;
  }
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32: launch<IOFloat>(shape, taps, block, bias, act, layout, x, y, device, s); break;
    case DType::Float16: launch<IOHalf>(shape, taps, block, bias, act, layout, x, y, device, s); break;
    case DType::BFloat16: launch<IOBFloat16>(shape, taps, block, bias, act, layout, x, y, device, s); break;
    default: throw std::invalid_argument("sparse_dwconv2d (CUDA): unknown dtype code " +
                                         std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace cuda
}  // namespace deprune

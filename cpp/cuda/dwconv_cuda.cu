// CUDA sparse depth-wise conv: the phases of dwconv_block.h run by one thread block per
// (32-channel group, spatial tile, image), with barriers between them; fp32 / fp16 / bf16 I/O, fp32 accumulation.
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
template <class IO, Layout L>
__global__ void __launch_bounds__(kThreads) sparse_dwconv2d_kernel(KernelParams p, int64_t group_base,
                                                                    int64_t n_base) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceThread thread;
  run_block<IO, L>(p, block_coord(blockIdx.x, blockIdx.y, blockIdx.z, group_base, n_base), smem, thread);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("sparse_dwconv2d (CUDA): ") + what + " failed: " + cudaGetErrorString(err));
}

template <class IO, Layout L>
void launch(const KernelParams& p, cudaStream_t stream) {
  const size_t smem = shared_bytes(p.chunk);
  for_each_launch(p, [&](const GridLaunch& g) {
    sparse_dwconv2d_kernel<IO, L><<<dim3(g.tiles, g.groups, g.images), kThreads, smem, stream>>>(p, g.group_base,
                                                                                                 g.n_base);
    check(cudaGetLastError(), "kernel launch");
  });
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
    case DType::Float32: launch_layout<IOFloat>(p, layout, s); break;
    case DType::Float16: launch_layout<IOHalf>(p, layout, s); break;
    case DType::BFloat16: launch_layout<IOBFloat16>(p, layout, s); break;
    default: throw std::invalid_argument("sparse_dwconv2d (CUDA): unknown dtype code " +
                                         std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace cuda
}  // namespace deprune

// Host emulation of the CUDA kernel: the grid is walked block by block and, inside a block, every phase of
// dwconv_block.h runs for all threads before the next one starts (what __syncthreads() guarantees on the GPU),
// with a host buffer standing in for shared memory. Also the CUDA entry points of a build without CUDA.
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "dwconv_block.h"
#include "dwconv_cuda.h"

namespace deprune {

void sparse_dwconv2d_emulate_cuda(const DWConvShape& shape, const SparseTaps& taps, const float* bias,
                                  Activation act, Layout layout, const float* x, float* y) {
  using namespace cuda_block;
  const KernelParams p = make_params(shape, taps, bias, act, layout, x, y);
  // uint64_t storage gives the 8-byte alignment the kernel's dynamic shared memory has.
  std::vector<uint64_t> smem((shared_bytes(p.chunk) + sizeof(uint64_t) - 1) / sizeof(uint64_t));
  std::vector<ThreadState> threads(kThreads);
  for (int64_t n = 0; n < shape.N; ++n) {
    for (int64_t g = 0; g < p.groups; ++g) {
      for (int32_t tile = 0; tile < p.tiles; ++tile) {
        const BlockCoord b{tile, g, n};
        for (ThreadState& st : threads) init_state(st);
        // Poison shared memory per block so a read of an entry the block did not load shows up as NaN.
        for (uint64_t& word : smem) word = 0x7fc000007fc00000ull;
        const int32_t chunks = num_chunks(p, b);
        for (int32_t k = 0; k < chunks; ++k) {
          for (int tid = 0; tid < kThreads; ++tid) phase_load(p, b, tid, kThreads, smem.data(), k);
          for (int tid = 0; tid < kThreads; ++tid) {
            if (layout == Layout::NCHW)
              phase_accumulate<IOFloat, Layout::NCHW>(p, b, tid, smem.data(), k, threads[tid]);
            else
              phase_accumulate<IOFloat, Layout::NHWC>(p, b, tid, smem.data(), k, threads[tid]);
          }
        }
        for (int tid = 0; tid < kThreads; ++tid) {
          if (layout == Layout::NCHW)
            phase_store<IOFloat, Layout::NCHW>(p, b, tid, threads[tid]);
          else
            phase_store<IOFloat, Layout::NHWC>(p, b, tid, threads[tid]);
        }
      }
    }
  }
}

#if !defined(DEPRUNE_WITH_CUDA)
namespace cuda {

bool compiled() { return false; }

int device_count() { return 0; }

void sparse_dwconv2d(const DWConvShape&, const SparseTaps&, const float*, Activation, DType, Layout, const void*,
                     void*, int, std::uintptr_t) {
  throw std::runtime_error(
      "timm_deprune was built without CUDA kernels; rebuild with a CUDA compiler or -C "
      "cmake.define.DEPRUNE_CUDA=ON");
}

}  // namespace cuda
#endif

}  // namespace deprune

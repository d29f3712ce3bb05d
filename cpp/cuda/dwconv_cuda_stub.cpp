// The CUDA entry points of a build without CUDA kernels (CMake compiles this file instead of dwconv_cuda.cu): the
// module still imports, reports no CUDA, and a CUDA call raises naming how to rebuild.
#include <cstdint>
#include <stdexcept>

#include "dwconv_cuda.h"

namespace deprune {
namespace cuda {

bool compiled() { return false; }

int device_count() { return 0; }

void sparse_dwconv2d(const DWConvShape&, const SparseTaps&, const BlockTaps&, const float*, Activation, DType, Layout,
                     const void*, void*, int, std::uintptr_t) {
  throw std::runtime_error(
      "timm_deprune was built without CUDA kernels; rebuild with a CUDA compiler or -C "
      "cmake.define.DEPRUNE_CUDA=ON");
}

}  // namespace cuda
}  // namespace deprune

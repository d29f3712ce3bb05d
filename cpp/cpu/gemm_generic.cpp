// Packed SGEMM micro-kernels compiled for the 'generic' instruction set (flags in CMakeLists.txt); chosen at run time.
#include <array>
#include <cstdint>
#include <utility>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>  // masked loads and stores at the N edge (gemm_kernels.inc)
#endif

#include "gemm.h"

#define GEMM_W 4
#define GEMM_MR 3
#define GEMM_NP 1
#define GEMM_KC 512

namespace deprune {
namespace cpu {
namespace generic {
#include "gemm_kernels.inc"
}  // namespace generic
}  // namespace cpu
}  // namespace deprune

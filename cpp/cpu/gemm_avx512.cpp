// Packed SGEMM micro-kernels compiled for the 'avx512' instruction set (flags in CMakeLists.txt); chosen at run time.
#include <array>
#include <cstdint>
#include <utility>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>  // masked loads and stores at the N edge (gemm_kernels.inc)
#endif

#include "gemm.h"

#define GEMM_W 16
#define GEMM_MR 12
#define GEMM_NP 2
#define GEMM_KC 256

namespace deprune {
namespace cpu {
namespace avx512 {
#include "gemm_kernels.inc"
}  // namespace avx512
}  // namespace cpu
}  // namespace deprune

// Packed SGEMM micro-kernels compiled for the 'avx2' instruction set (flags in CMakeLists.txt); chosen at run time.
#include <array>
#include <cstdint>
#include <utility>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>  // masked loads and stores at the N edge (gemm_kernels.inc)
#endif

#include "gemm.h"

#define GEMM_W 8
#define GEMM_MR 6
#define GEMM_NP 1
#define GEMM_KC 384

namespace deprune {
namespace cpu {
namespace avx2 {
#include "gemm_kernels.inc"
}  // namespace avx2
}  // namespace cpu
}  // namespace deprune

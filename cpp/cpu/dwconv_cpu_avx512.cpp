// CPU kernels compiled for the 'avx512' instruction set (flags in CMakeLists.txt); chosen at run time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "dwconv_cpu.h"

namespace deprune {
namespace cpu {
namespace avx512 {
#include "dwconv_isa.inc"
}  // namespace avx512
}  // namespace cpu
}  // namespace deprune

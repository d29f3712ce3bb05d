// CPU kernels compiled for the 'generic' instruction set (flags in CMakeLists.txt); chosen at run time.
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
namespace generic {
#include "dwconv_isa.inc"
}  // namespace generic
}  // namespace cpu
}  // namespace deprune

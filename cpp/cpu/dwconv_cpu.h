// CPU backend of the sparse depth-wise conv: vectorised kernels per instruction set, chosen at run time,
// run on a small persistent thread pool.
#pragma once

#include <cstdint>

#include "deprune/dwconv.h"

namespace deprune {
namespace cpu {

constexpr int kMaxTaps = 11 * 11;  // largest kernel the plan builder accepts

// Arguments of one call; pointers are host pointers. `block` is used for Layout::NHWC only.
struct DWConvArgs {
  DWConvShape shape;
  SparseTaps taps;
  BlockTaps block;
  const float* bias;  // [C] or nullptr
  Activation act;
  Layout layout;
  const float* x;
  float* y;
};

// Zero-padded scratch plane of the NCHW kernel: `phases` (= stride_w) column phases of rows x cols floats,
// wide enough that every output row can be computed in whole 8-float vectors.
struct NchwScratch {
  int64_t rows, cols, phases;
  int64_t floats() const { return rows * cols * phases; }                  // the phase planes
  int64_t row_floats() const { return (cols * phases + 15) / 16 * 16; }   // one padded input row after them
  int64_t total_floats() const { return floats() + row_floats(); }
};
inline NchwScratch nchw_scratch_geometry(const DWConvShape& s) {
  const int64_t padded_ow = (s.OW + 7) / 8 * 8;
  return NchwScratch{(s.OH - 1) * s.stride_h + (s.kh - 1) * static_cast<int64_t>(s.dil_h) + 1,
                     padded_ow + (s.kw - 1) * static_cast<int64_t>(s.dil_w) / s.stride_w, s.stride_w};
}

// Runs the call with up to `num_threads` threads (the caller's thread included).
void sparse_dwconv2d(const DWConvArgs& args, int num_threads);

// Name of the instruction set the kernels dispatch to: "avx512", "avx2" or "generic" (the best this CPU
// supports, unless overridden by set_isa or the DEPRUNE_CPU_ISA environment variable).
const char* isa();
// Forces an instruction set (for tests and benchmarks); throws std::invalid_argument if the CPU lacks it.
void set_isa(const char* name);
// Whether this CPU (and OS) can run the named instruction set.
bool isa_supported(const char* name);

// Per-ISA entry points (one translation unit each, compiled with its own -m flags). They compute the
// output rows/planes in [begin, end) of the work split described in dwconv_cpu.cpp.
using RangeKernel = void (*)(const DWConvArgs& args, int64_t begin, int64_t end, float* scratch);
namespace generic { void nchw(const DWConvArgs&, int64_t, int64_t, float*); void nhwc(const DWConvArgs&, int64_t, int64_t, float*); }
namespace avx2 { void nchw(const DWConvArgs&, int64_t, int64_t, float*); void nhwc(const DWConvArgs&, int64_t, int64_t, float*); }
namespace avx512 { void nchw(const DWConvArgs&, int64_t, int64_t, float*); void nhwc(const DWConvArgs&, int64_t, int64_t, float*); }

}  // namespace cpu
}  // namespace deprune

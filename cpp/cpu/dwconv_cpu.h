// CPU backend of the sparse depth-wise conv: vectorised kernels per instruction set, chosen at run time,
// run on a small persistent thread pool.
#pragma once

#include <cstdint>

#include "deprune/dwconv.h"

namespace deprune {
namespace cpu {

constexpr int kMaxTaps = 11 * 11;  // largest kernel the plan builder accepts
constexpr int kNhwcPixBlock = 8;   // output pixels per register-blocked step of the channels_last kernel

constexpr int64_t kMaxSpan = 21;                  // rows of the largest window: 11 taps, dilation 2
constexpr int64_t kNhwcFarInput = 8 << 20;       // input bytes above which channels_last prefetches / uses a ring
constexpr int64_t kNhwcRingBytes = 512 << 10;    // most bytes of one task's ring (it must stay in L2)
constexpr int64_t kNhwcRingChannels = 64;        // fewest channels: with 32 (112x112) the ring was 0.89-0.93x

// Input rows under the kernel window of one output row.
inline int64_t window_rows(const DWConvShape& s) { return (s.kh - 1) * static_cast<int64_t>(s.dil_h) + 1; }

// Whether the input is far beyond the caches (batch 16 of the models' early layers).
inline bool nhwc_far_input(const DWConvShape& s) {
  return s.N * s.C * s.H * s.W * static_cast<int64_t>(sizeof(float)) > kNhwcFarInput;
}

// Whether the row-by-row channels_last order copies input rows into a ring (see RowRing). Paired A/B at batch 16
// (BENCHMARKS.md): 1.25-1.5x on the 56x56, 28x28 and 112x112 stride-2 layers of mobilenetv2 / efficientnet_b0.
inline bool nhwc_ring(const DWConvShape& s) {
  return s.C >= kNhwcRingChannels && nhwc_far_input(s) &&
         2 * window_rows(s) * s.W * s.C * static_cast<int64_t>(sizeof(float)) <= kNhwcRingBytes;
}

// Tiled channels_last order (small images; the dispatcher's nhwc_order decides): the zero-padded input of one
// image and one channel block that the output's windows cover, rows x cols pixels of kChannelBlock floats.
struct NhwcTile {
  int64_t rows, cols;
  int64_t floats() const { return rows * cols * kChannelBlock; }
};
inline NhwcTile nhwc_tile_geometry(const DWConvShape& s) {
  return {(s.OH - 1) * static_cast<int64_t>(s.stride_h) + (s.kh - 1) * static_cast<int64_t>(s.dil_h) + 1,
          (s.OW - 1) * static_cast<int64_t>(s.stride_w) + (s.kw - 1) * static_cast<int64_t>(s.dil_w) + 1};
}
// Channel blocks per unit of the tiled order: as many as fit kNhwcTileBytes of tiles, at most kNhwcTileBlocks, so
// the copy reads each pixel's channels of the unit as one contiguous run (up to 256 bytes).
constexpr int64_t kNhwcTileBlocks = 8;
constexpr int64_t kNhwcTileBytes = 64 << 10;
inline int64_t nhwc_tile_blocks(const DWConvShape& s) {
  const int64_t per_block = nhwc_tile_geometry(s).floats() * static_cast<int64_t>(sizeof(float));
  const int64_t fit = kNhwcTileBytes / per_block;
  return fit < 1 ? 1 : fit > kNhwcTileBlocks ? kNhwcTileBlocks : fit;
}

// Scratch floats of one channels_last task: an int64 offset per block-tap entry, then either the unit's tiles
// (tiled order) or a 64-byte aligned staging block of kNhwcPixBlock pixels, C zeros, the tap pointers of one
// row's bounds-checked pixels and the row ring.
inline int64_t nhwc_scratch_floats(const DWConvShape& s, int64_t entries, bool tiled) {
  if (tiled) return 2 * entries + 16 + nhwc_tile_blocks(s) * nhwc_tile_geometry(s).floats();
  return 2 * entries + 32 + (kNhwcPixBlock + 1) * s.C + 2 + 2 * s.OW * s.kh * s.kw +
         (nhwc_ring(s) ? 16 + 2 * window_rows(s) * s.W * s.C : 0);
}

// Loop order of the channels_last kernel, chosen per call by the dispatcher (see dwconv_nhwc.inc):
// Rows = one unit per (n, oy) output row; Grouped = the same units, bounds-checked pixels in groups;
// Tiled = one unit per (n, nhwc_tile_blocks channel blocks).
enum class NhwcOrder { Rows, Grouped, Tiled };

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
  // Write the output with non-temporal stores (set by the dispatcher when it is too large to stay in cache).
  bool stream_output = false;
  // channels_last only: the loop order (set by the dispatcher).
  NhwcOrder nhwc_order = NhwcOrder::Rows;
};

// Scratch of the NCHW kernel for one plane: the zero-padded input split into stride_h x stride_w phase planes
// that share one row pitch `cols`, so output (oy, ox) and kept tap (dy, dx) read phase (dy % sh, dx % sw) at
// flat index (oy + dy / sh) * cols + ox + dx / sw: every tap is one contiguous offset and the plane is
// computed as a flat 1-D convolution over OH * cols outputs (the cols - OW extra per row are discarded).
struct NchwScratch {
  int64_t rows, cols, phases;  // rows and cols of each phase plane; phases = stride_h * stride_w
  int64_t phase_floats() const { return rows * cols + 32; }     // + slack for the last vector's reads
  int64_t flat_outputs() const { return (rows_out * cols + 31) / 32 * 32; }
  int64_t row_floats() const { return (cols * stride_w + 15) / 16 * 16; }  // one padded input row
  int64_t total_floats() const { return phases * phase_floats() + flat_outputs() + row_floats(); }
  int64_t rows_out, stride_w;
};
inline NchwScratch nchw_scratch_geometry(const DWConvShape& s) {
  const int64_t dy_max = (s.kh - 1) * static_cast<int64_t>(s.dil_h), dx_max = (s.kw - 1) * static_cast<int64_t>(s.dil_w);
  NchwScratch g{};
  g.rows = s.OH + dy_max / s.stride_h;
  g.cols = s.OW + dx_max / s.stride_w;
  g.phases = static_cast<int64_t>(s.stride_h) * s.stride_w;
  g.rows_out = s.OH;
  g.stride_w = s.stride_w;
  return g;
}

// Runs the call with up to `num_threads` threads (the caller's thread included).
void sparse_dwconv2d(const DWConvArgs& args, int num_threads);

// Name of the instruction set the kernels dispatch to: "avx512", "avx2" or "generic" (the best this CPU
// supports, unless overridden by set_isa or the DEPRUNE_CPU_ISA environment variable).
const char* isa();
// Whether the instruction set was named (DEPRUNE_CPU_ISA or set_isa) rather than picked.
bool isa_forced();
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

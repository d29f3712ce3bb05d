// The CUDA sparse depth-wise conv in NCHW as __host__ __device__ code: the per-thread phases, the block program that
// chains them with barriers (run_block) and the grid split into launches (for_each_launch, block_coord). The CUDA
// kernel (dwconv_cuda.cu) and the host emulation (dwconv_emulate.cpp) both instantiate run_block and walk the same
// launches, so the emulation executes the kernel's program, barriers and grid split included, not a copy of it.
//
// Work split: one thread block per (32-channel group, spatial tile, image). A tile is `tile_pixels` consecutive
// output pixels in row-major (oy, ox) order. The group's kept-tap list (its CSR slice plus the 33 per-channel
// offsets) is staged in shared memory in chunks of at most `chunk` entries; every block of a BWT-balanced layer
// thus does the same amount of work.
// Warp w computes channels w, w+8, w+16, w+24 of the group; its 32 lanes take consecutive pixels, so loads and stores
// of one channel plane are coalesced and the tap loop is warp-uniform (no divergence). channels_last has its own
// program (dwconv_cl.h).
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "deprune/dwconv.h"
#include "dwconv_io.h"  // IOFloat / IOHalf / IOBFloat16

// Device pass only: the host compiler (g++ under nvcc, or for the emulation) would warn about an unknown pragma.
#if defined(__CUDA_ARCH__)
#define DEPRUNE_UNROLL _Pragma("unroll")
#else
#define DEPRUNE_UNROLL
#endif

namespace deprune {
namespace cuda_block {

constexpr int kGroup = 32;                          // channels per block: one diagonal-wise sub-GEMM (ARCHITECTURE.md §1)
constexpr int kThreads = 256;                       // threads per block
constexpr int kWarps = kThreads / 32;               // 8
constexpr int kChannelsPerWarp = kGroup / kWarps;   // 4 channels per warp
constexpr int kMaxRows = 4;                         // outputs per thread per channel (register accumulators)
constexpr int kMaxChunk = 2048;                     // shared-memory entries per chunk (16 KiB of 8-byte entries)
constexpr int kOffsetWords = 34;                    // 33 group offsets + 1 pad word keeps the entries 8-byte aligned

// One kept tap in shared memory: its weight and its input displacement, padding folded in (dy = ky*dil_h - pad_top).
struct SharedEntry {
  float w;
  int16_t dy;
  int16_t dx;
};
static_assert(sizeof(SharedEntry) == 8, "shared entries must stay 8 bytes (one 64-bit shared load per tap)");

// Everything a block needs; built once on the host by make_params.
struct KernelParams {
  DWConvShape s;
  const int32_t* offsets;  // [C + 1]
  const int32_t* taps;     // [nnz]; may be null when nnz == 0
  const float* weights;    // [nnz]; may be null when nnz == 0
  const float* bias;       // [C] or nullptr
  Activation act;
  const void* x;
  void* y;
  int32_t ohw;          // OH * OW
  int32_t rows;         // outputs per thread per channel, 1..kMaxRows
  int32_t tile_pixels;  // output pixels per block
  int32_t tiles;        // spatial tiles per (image, group)
  int64_t groups;       // ceil(C / 32)
  int32_t chunk;        // shared-memory capacity in entries
};

struct BlockCoord {
  int32_t tile;
  int64_t group;
  int64_t n;
};

// Per-thread registers that live across the chunk loop.
struct ThreadState {
  float acc[kChannelsPerWarp][kMaxRows];
};

inline size_t shared_bytes(int32_t chunk) {
  return kOffsetWords * sizeof(int32_t) + static_cast<size_t>(chunk) * sizeof(SharedEntry);
}

// Validates the sizes the kernel's 32-bit index math relies on and derives the launch geometry.
inline KernelParams make_params(const DWConvShape& s, const SparseTaps& t, const float* bias, Activation act,
                                const void* x, void* y) {
  if (!x || !y || !t.offsets) throw std::invalid_argument("sparse_dwconv2d (CUDA): null x, y or offsets pointer");
  if (s.H * s.W > INT32_MAX || s.OH * s.OW > (INT32_MAX >> 1))
    throw std::invalid_argument("sparse_dwconv2d (CUDA): spatial size too large for 32-bit indexing, got H=" +
                                std::to_string(s.H) + " W=" + std::to_string(s.W) + " C=" + std::to_string(s.C) +
                                " OH=" + std::to_string(s.OH) + " OW=" + std::to_string(s.OW));
  check_int16_displacements(s);
  KernelParams p{};
  p.s = s;
  p.offsets = t.offsets;
  p.taps = t.taps;
  p.weights = t.weights;
  p.bias = bias;
  p.act = act;
  p.x = x;
  p.y = y;
  p.ohw = static_cast<int32_t>(s.OH * s.OW);
  const int32_t lanes = 32;  // pixels covered per row of accumulators
  int32_t rows = (p.ohw + lanes - 1) / lanes;
  p.rows = rows < 1 ? 1 : (rows > kMaxRows ? kMaxRows : rows);
  p.tile_pixels = lanes * p.rows;
  p.tiles = (p.ohw + p.tile_pixels - 1) / p.tile_pixels;
  p.groups = (s.C + kGroup - 1) / kGroup;
  // A valid plan keeps each tap at most once, so a group holds <= 32*kh*kw entries: one chunk up to 7x7 kernels.
  const int64_t full = (int64_t{kGroup} * s.kh * s.kw + 31) / 32 * 32;
  p.chunk = static_cast<int32_t>(full < kMaxChunk ? full : kMaxChunk);
  return p;
}

DEPRUNE_HD int32_t group_channels(const KernelParams& p, int64_t group) {
  const int64_t left = p.s.C - group * kGroup;
  return static_cast<int32_t>(left < kGroup ? left : kGroup);
}

// The group's entries [first, last) of the CSR arrays; every thread reads the same two values, so the
// chunk count (and with it every barrier) is uniform across the block.
DEPRUNE_HD void group_entries(const KernelParams& p, int64_t group, int32_t& first, int32_t& last) {
  first = p.offsets[group * kGroup];
  last = p.offsets[group * kGroup + group_channels(p, group)];
  if (last < first) last = first;
}

DEPRUNE_HD int32_t num_chunks(const KernelParams& p, const BlockCoord& b) {
  int32_t first, last;
  group_entries(p, b.group, first, last);
  return (last - first + p.chunk - 1) / p.chunk;
}

DEPRUNE_HD int32_t* shared_offsets(void* smem) { return static_cast<int32_t*>(smem); }
DEPRUNE_HD const int32_t* shared_offsets(const void* smem) { return static_cast<const int32_t*>(smem); }
DEPRUNE_HD SharedEntry* shared_entries(void* smem) {
  return reinterpret_cast<SharedEntry*>(static_cast<char*>(smem) + kOffsetWords * sizeof(int32_t));
}
DEPRUNE_HD const SharedEntry* shared_entries(const void* smem) {
  return reinterpret_cast<const SharedEntry*>(static_cast<const char*>(smem) + kOffsetWords * sizeof(int32_t));
}

// Range [lo, hi) of the group's entries held by chunk k.
DEPRUNE_HD void chunk_range(const KernelParams& p, const BlockCoord& b, int32_t k, int32_t& lo, int32_t& hi) {
  int32_t first, last;
  group_entries(p, b.group, first, last);
  lo = first + k * p.chunk;
  hi = last - lo < p.chunk ? last : lo + p.chunk;
}

DEPRUNE_HD void init_state(ThreadState& st) {
  for (int ci = 0; ci < kChannelsPerWarp; ++ci)
    for (int j = 0; j < kMaxRows; ++j) st.acc[ci][j] = 0.f;
}

// Phase 1 (per chunk): copy the group's 33 offsets and the chunk's taps/weights into shared memory, consecutive
// threads on consecutive entries (coalesced), decoding each tap into its padded input displacement once.
DEPRUNE_HD void phase_load(const KernelParams& p, const BlockCoord& b, int tid, int nthreads, void* smem, int32_t k) {
  int32_t lo, hi;
  chunk_range(p, b, k, lo, hi);
  int32_t* s_off = shared_offsets(smem);
  SharedEntry* s_ent = shared_entries(smem);
  const int32_t nch = group_channels(p, b.group);
  for (int i = tid; i <= nch; i += nthreads) s_off[i] = p.offsets[b.group * kGroup + i];
  for (int32_t i = tid; i < hi - lo; i += nthreads) {
    const int32_t tap = p.taps[lo + i];
    const int32_t ky = tap / p.s.kw;
    const int32_t kx = tap - ky * p.s.kw;
    SharedEntry e;
    e.w = p.weights[lo + i];
    e.dy = static_cast<int16_t>(ky * p.s.dil_h - p.s.pad_top);
    e.dx = static_cast<int16_t>(kx * p.s.dil_w - p.s.pad_left);
    s_ent[i] = e;
  }
}

// Phase 2 (per chunk), NCHW: accumulate the chunk's entries of this warp's channels into registers.
template <class IO>
DEPRUNE_HD void phase_accumulate_nchw(const KernelParams& p, const BlockCoord& b, int tid, const void* smem, int32_t k,
                                      ThreadState& st) {
  int32_t lo, hi;
  chunk_range(p, b, k, lo, hi);
  const int32_t* s_off = shared_offsets(smem);
  const SharedEntry* s_ent = shared_entries(smem);
  const int warp = tid / 32, lane = tid % 32;
  const int32_t nch = group_channels(p, b.group);
  const int32_t H = static_cast<int32_t>(p.s.H), W = static_cast<int32_t>(p.s.W), OW = static_cast<int32_t>(p.s.OW);
  int32_t iy0[kMaxRows], ix0[kMaxRows];
  bool ok[kMaxRows];
  DEPRUNE_UNROLL
  for (int j = 0; j < kMaxRows; ++j) {
    const int32_t pix = b.tile * p.tile_pixels + lane + 32 * j;
    ok[j] = j < p.rows && pix < p.ohw;
    const int32_t oy = ok[j] ? pix / OW : 0;
    iy0[j] = oy * p.s.stride_h;
    ix0[j] = (ok[j] ? pix - oy * OW : 0) * p.s.stride_w;
  }
  DEPRUNE_UNROLL
  for (int ci = 0; ci < kChannelsPerWarp; ++ci) {
    const int32_t cl = warp + kWarps * ci;
    if (cl >= nch) break;
    const int64_t plane = ((b.n * p.s.C) + b.group * kGroup + cl) * (p.s.H * p.s.W);
    const int32_t e0 = s_off[cl] > lo ? s_off[cl] : lo;
    const int32_t e1 = s_off[cl + 1] < hi ? s_off[cl + 1] : hi;
    for (int32_t e = e0; e < e1; ++e) {
      const SharedEntry ent = s_ent[e - lo];  // same address for the whole warp: a broadcast
      DEPRUNE_UNROLL
      for (int j = 0; j < kMaxRows; ++j) {
        const int32_t iy = iy0[j] + ent.dy, ix = ix0[j] + ent.dx;
        // Unsigned compares test 0 <= v < size in one step; out of range is the zero padding.
        if (ok[j] && static_cast<uint32_t>(iy) < static_cast<uint32_t>(H) &&
            static_cast<uint32_t>(ix) < static_cast<uint32_t>(W))
          st.acc[ci][j] += ent.w * IO::load(p.x, plane + (iy * W + ix));
      }
    }
  }
}

// Phase 3, NCHW: bias + activation epilogue, lanes on consecutive pixels of one channel plane.
template <class IO>
DEPRUNE_HD void phase_store_nchw(const KernelParams& p, const BlockCoord& b, int tid, const ThreadState& st) {
  const int warp = tid / 32, lane = tid % 32;
  const int32_t nch = group_channels(p, b.group);
  DEPRUNE_UNROLL
  for (int ci = 0; ci < kChannelsPerWarp; ++ci) {
    const int32_t cl = warp + kWarps * ci;
    if (cl >= nch) break;
    const int64_t c = b.group * kGroup + cl;
    const float bias = p.bias ? p.bias[c] : 0.f;
    const int64_t plane = (b.n * p.s.C + c) * p.ohw;
    DEPRUNE_UNROLL
    for (int j = 0; j < kMaxRows; ++j) {
      const int32_t pix = b.tile * p.tile_pixels + lane + 32 * j;
      if (j < p.rows && pix < p.ohw) IO::store(p.y, plane + pix, apply_activation(st.acc[ci][j] + bias, p.act));
    }
  }
}

// --- grid -------------------------------------------------------------------------------------------------------
// Grid: x = spatial tile, y = channel group, z = image. CUDA caps grid y and z at 65535, so a layer with more groups
// or images is split into several launches, each told where its y / z range starts.
constexpr int64_t kMaxGridYZ = 65535;

struct GridLaunch {
  uint32_t tiles, groups, images;  // grid x, y, z of this launch
  int64_t group_base, n_base;      // group / image of blockIdx.y == 0 / blockIdx.z == 0
};

// Calls f(const GridLaunch&) for each launch that together cover every (tile, group, image) block once.
template <class F>
void for_each_launch(const KernelParams& p, F&& f) {
  for (int64_t g0 = 0; g0 < p.groups; g0 += kMaxGridYZ) {
    for (int64_t n0 = 0; n0 < p.s.N; n0 += kMaxGridYZ) {
      const int64_t ng = p.groups - g0 < kMaxGridYZ ? p.groups - g0 : kMaxGridYZ;
      const int64_t nn = p.s.N - n0 < kMaxGridYZ ? p.s.N - n0 : kMaxGridYZ;
      f(GridLaunch{static_cast<uint32_t>(p.tiles), static_cast<uint32_t>(ng), static_cast<uint32_t>(nn), g0, n0});
    }
  }
}

// The block a (blockIdx.x, blockIdx.y, blockIdx.z) of a launch computes.
DEPRUNE_HD BlockCoord block_coord(uint32_t bx, uint32_t by, uint32_t bz, int64_t group_base, int64_t n_base) {
  return BlockCoord{static_cast<int32_t>(bx), group_base + by, n_base + bz};
}

// --- the block program -------------------------------------------------------------------------------------------
// `Threads` runs the per-thread code of one block:
//   each(f)   runs f(tid) for this block's threads (on the GPU: the calling thread only);
//   barrier() is __syncthreads(): every thread's work before it is done before any thread's work after it;
//   state(t)  is thread t's registers that live across the chunk loop;
//   finish()  ends the block (the emulation runs what is still pending).
// The barriers sit here, outside any per-thread branch, and the chunk count is the same for every thread, so every
// thread reaches every barrier. Per-thread lambdas capture by value: the emulation runs them at the next barrier.
template <class IO, class Threads>
DEPRUNE_HD void run_block(const KernelParams& params, const BlockCoord& coord, void* smem, Threads& threads) {
  const KernelParams* p = &params;
  const BlockCoord* b = &coord;
  Threads* th = &threads;
  threads.each([=](int tid) { init_state(th->state(tid)); });
  const int32_t chunks = num_chunks(params, coord);
  for (int32_t k = 0; k < chunks; ++k) {
    if (k > 0) threads.barrier();  // the previous chunk is fully consumed before it is overwritten
    threads.each([=](int tid) { phase_load(*p, *b, tid, kThreads, smem, k); });
    threads.barrier();  // the chunk is fully loaded before any thread reads it
    threads.each([=](int tid) { phase_accumulate_nchw<IO>(*p, *b, tid, smem, k, th->state(tid)); });
  }
  threads.each([=](int tid) { phase_store_nchw<IO>(*p, *b, tid, th->state(tid)); });
  threads.finish();
}

}  // namespace cuda_block
}  // namespace deprune

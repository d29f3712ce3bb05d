// The CUDA sparse depth-wise conv in channels_last (NHWC) as __host__ __device__ code: launch geometry
// (make_cl_params, for_each_cl_launch), the two phases of a block and the block program that chains them
// (run_cl_block). The CUDA kernel (dwconv_cuda.cu) and the host emulation (dwconv_emulate.cpp) both instantiate
// run_cl_block and walk the same launches.
//
// Work split. The plan's channel blocks (8 consecutive channels sharing one tap list: the union of their kept taps,
// kernels/plan.py block_*) are the unit: a thread computes one channel block for a strip of `strip` consecutive
// output pixels of one row, with one 16-byte load per tap and pixel (8 fp16 / bf16 channels; two for fp32), so every
// lane of a thread walks the same list. A thread block holds `tile_blocks` consecutive channel blocks x `slots`
// strips; consecutive threads take consecutive channel blocks of one strip, so a warp's loads and stores are
// contiguous runs of the pixel's channels. Each thread runs `spt` strips, `slots` apart.
//
// Phase 1 (stage): the block's channel blocks' entries are decoded once into shared memory (fixed kh*kw slots per
// channel block): the 8 weights, the tap's padded displacement (dy, dx), its element offset (dy * W + dx) * C and
// the lanes the tap is kept in (a -0.0 weight marks a pruned lane, which never reads its input: NaN / Inf inputs
// of pruned taps stay out, as on the CPU). Phase 2 (compute): per strip, per entry, per pixel: one vector load,
// 8 fused multiply-adds; a strip whose whole receptive field lies inside the image runs without bounds checks.
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "deprune/dwconv.h"
#include "dwconv_io.h"  // IOFloat / IOHalf / IOBFloat16, pruned_lane

#if defined(__CUDA_ARCH__)
#define DEPRUNE_CL_UNROLL _Pragma("unroll")
#else
#define DEPRUNE_CL_UNROLL
#endif

namespace deprune {
namespace cuda_cl {

constexpr int kLanes = kChannelBlock;          // channels per channel block (8)
constexpr int kMaxThreads = 256;                // threads per block, at most (the kernel's launch bound)
constexpr int kMaxStrip = 4;                    // output pixels per thread per strip (register accumulators)
constexpr int kMaxTileBlocks = 32;              // channel blocks per thread block
constexpr int kMaxStripsPerThread = 8;
constexpr size_t kSharedLimit = 48 * 1024;      // dynamic shared memory without the opt-in attribute
constexpr size_t kHeaderBytes = kMaxTileBlocks * sizeof(int32_t);  // entry counts; keeps entries 16-byte aligned

// One staged tap of a channel block: 48 bytes, the weights first so they load as three 16-byte words.
struct alignas(16) Entry {
  float w[kLanes];
  int32_t off;     // element offset of the tap from the strip's first input pixel: (dy * W + dx) * C
  int16_t dy, dx;  // padded input displacement: ky * dil_h - pad_top, kx * dil_w - pad_left
  uint32_t lanes;  // bit c set: lane c keeps the tap
  uint32_t pad;
};
static_assert(sizeof(Entry) == 48, "staged entries must stay 48 bytes");

struct ClParams {
  DWConvShape s;
  BlockTaps t;
  const float* bias;  // [C] or nullptr
  Activation act;
  const void* x;
  void* y;
  int32_t kk;            // kh * kw: shared slots per channel block
  int32_t nblocks;       // ceil(C / 8)
  int32_t tile_blocks;   // channel blocks per thread block
  int32_t threads;       // threads per block (tile_blocks * slots <= threads <= kMaxThreads)
  int32_t slots;         // strips in flight per block
  int32_t strip;         // output pixels per strip, 1..kMaxStrip
  int32_t spt;           // strips per thread
  int32_t strips_per_row;
  int64_t strips;        // N * OH * strips_per_row
  int64_t pixel_tiles;   // grid x: ceil(strips / (slots * spt))
  int64_t channel_tiles; // grid y: ceil(nblocks / tile_blocks)
  bool vec;              // C % 8 == 0 and x, y 16-byte aligned: vector loads and stores
};

inline size_t cl_shared_bytes(const ClParams& p) {
  return kHeaderBytes + static_cast<size_t>(p.tile_blocks) * p.kk * sizeof(Entry);
}

// Validates what the kernel's index math relies on and picks the geometry: the largest strip, then the most threads
// per block, that still give at least two blocks per multiprocessor (`sms`), then more strips per thread while the
// grid stays above eight blocks per multiprocessor.
inline ClParams make_cl_params(const DWConvShape& s, const BlockTaps& t, const float* bias, Activation act,
                               const void* x, void* y, int sms) {
  if (!x || !y || !t.offsets) throw std::invalid_argument("sparse_dwconv2d (CUDA): null x, y or block offsets pointer");
  if (s.H * s.W * s.C > INT32_MAX || s.OH * s.OW * s.C > INT32_MAX)
    throw std::invalid_argument("sparse_dwconv2d (CUDA): image too large for 32-bit indexing, got H=" +
                                std::to_string(s.H) + " W=" + std::to_string(s.W) + " C=" + std::to_string(s.C) +
                                " OH=" + std::to_string(s.OH) + " OW=" + std::to_string(s.OW));
  cuda_block::check_int16_displacements(s);
  ClParams p{};
  p.s = s;
  p.t = t;
  p.bias = bias;
  p.act = act;
  p.x = x;
  p.y = y;
  p.kk = s.kh * s.kw;
  p.nblocks = static_cast<int32_t>((s.C + kLanes - 1) / kLanes);
  const int64_t fit = static_cast<int64_t>((kSharedLimit - kHeaderBytes) / (sizeof(Entry) * p.kk));
  if (fit < 1)
    throw std::invalid_argument("sparse_dwconv2d (CUDA): kernel " + std::to_string(s.kh) + "x" +
                                std::to_string(s.kw) + " too large for the channels_last kernel's shared memory");
  p.tile_blocks = static_cast<int32_t>(fit < kMaxTileBlocks ? fit : kMaxTileBlocks);
  if (p.tile_blocks > p.nblocks) p.tile_blocks = p.nblocks;
  p.channel_tiles = (p.nblocks + p.tile_blocks - 1) / p.tile_blocks;
  const int64_t want = 2 * int64_t{sms < 1 ? 1 : sms};
  bool found = false;
  for (int strip = kMaxStrip; strip >= 1 && !found; strip /= 2) {
    for (int threads = kMaxThreads; threads >= 64 && !found; threads /= 2) {
      if (threads < p.tile_blocks) break;
      p.strip = strip;
      p.threads = threads;
      p.slots = threads / p.tile_blocks;
      p.strips_per_row = static_cast<int32_t>((s.OW + strip - 1) / strip);
      p.strips = s.N * s.OH * p.strips_per_row;
      found = (p.strips + p.slots - 1) / p.slots * p.channel_tiles >= want;
    }
  }
  // Not found: the last try (strip 1, the fewest threads) gives the most blocks.
  p.spt = 1;
  while (p.spt < kMaxStripsPerThread &&
         (p.strips + 2 * p.spt * p.slots - 1) / (2 * p.spt * p.slots) * p.channel_tiles >= 4 * want)
    p.spt *= 2;
  p.pixel_tiles = (p.strips + int64_t{p.slots} * p.spt - 1) / (int64_t{p.slots} * p.spt);
  const auto aligned = [](const void* q) { return reinterpret_cast<std::uintptr_t>(q) % 16 == 0; };
  p.vec = s.C % kLanes == 0 && aligned(x) && aligned(y);
  return p;
}

DEPRUNE_HD int32_t* staged_counts(void* smem) { return static_cast<int32_t*>(smem); }
DEPRUNE_HD const int32_t* staged_counts(const void* smem) { return static_cast<const int32_t*>(smem); }
DEPRUNE_HD Entry* staged_entries(void* smem) { return reinterpret_cast<Entry*>(static_cast<char*>(smem) + kHeaderBytes); }
DEPRUNE_HD const Entry* staged_entries(const void* smem) {
  return reinterpret_cast<const Entry*>(static_cast<const char*>(smem) + kHeaderBytes);
}

// Channel blocks of channel tile `ctile`: [first, first + count).
DEPRUNE_HD int32_t tile_block_count(const ClParams& p, int64_t ctile) {
  const int64_t left = p.nblocks - ctile * p.tile_blocks;
  return static_cast<int32_t>(left < p.tile_blocks ? left : p.tile_blocks);
}

// Phase 1: decode the tile's channel-block entries into shared memory, consecutive threads on consecutive slots.
// A block's list holds at most kh*kw entries in a valid plan (the custom op checks); more are not staged.
DEPRUNE_HD void stage(const ClParams& p, int64_t ctile, int tid, void* smem) {
  int32_t* counts = staged_counts(smem);
  Entry* ent = staged_entries(smem);
  const int64_t b0 = ctile * p.tile_blocks;
  const int32_t nb = tile_block_count(p, ctile);
  for (int i = tid; i < nb; i += p.threads) {
    const int32_t n = p.t.offsets[b0 + i + 1] - p.t.offsets[b0 + i];
    counts[i] = n < 0 ? 0 : (n > p.kk ? p.kk : n);
  }
  const int32_t W = static_cast<int32_t>(p.s.W), C = static_cast<int32_t>(p.s.C);
  for (int32_t idx = tid; idx < nb * p.kk; idx += p.threads) {
    const int32_t lb = idx / p.kk, i = idx - lb * p.kk;
    const int32_t e = p.t.offsets[b0 + lb] + i;
    if (e >= p.t.offsets[b0 + lb + 1]) continue;
    const int32_t tap = p.t.taps[e];
    const int32_t ky = tap / p.s.kw, kx = tap - ky * p.s.kw;
    Entry E;
    E.dy = static_cast<int16_t>(ky * p.s.dil_h - p.s.pad_top);
    E.dx = static_cast<int16_t>(kx * p.s.dil_w - p.s.pad_left);
    // Only taps that land inside the image are read, and their offsets fit: H * W * C < 2^31 (make_cl_params).
    E.off = static_cast<int32_t>((int64_t{E.dy} * W + E.dx) * C);
    E.lanes = 0;
    E.pad = 0;
    for (int c = 0; c < kLanes; ++c) {
      E.w[c] = p.t.weights[int64_t{e} * kLanes + c];
      if (!cuda_block::pruned_lane(E.w[c])) E.lanes |= 1u << c;
    }
    ent[idx] = E;
  }
}

// Accumulates one strip: `nr` pixels starting at input element `xi` (the strip's first pixel, channel block c0),
// input coordinates (iy0, ix0) of the first pixel before the tap displacement.
template <class IO, bool Interior, bool Vec>
DEPRUNE_HD void accumulate(const ClParams& p, const Entry* ent, int32_t count, int64_t xi, int32_t iy0, int32_t ix0,
                           int32_t nr, int32_t c0, float (&acc)[kMaxStrip][kLanes]) {
  const int32_t H = static_cast<int32_t>(p.s.H), W = static_cast<int32_t>(p.s.W), C = static_cast<int32_t>(p.s.C);
  const int32_t step = p.s.stride_w * C;  // elements between two pixels of the strip
  for (int32_t e = 0; e < count; ++e) {
    const Entry E = ent[e];
    DEPRUNE_CL_UNROLL
    for (int r = 0; r < kMaxStrip; ++r) {
      if (r >= nr) break;
      if (!Interior) {
        const int32_t iy = iy0 + E.dy, ix = ix0 + r * p.s.stride_w + E.dx;
        if (static_cast<uint32_t>(iy) >= static_cast<uint32_t>(H) ||
            static_cast<uint32_t>(ix) >= static_cast<uint32_t>(W))
          continue;  // zero padding
      }
      const int64_t i = xi + E.off + r * step;
      float v[kLanes];
      if (Vec) {
        IO::load8(p.x, i, v);
      } else {
        DEPRUNE_CL_UNROLL
        for (int c = 0; c < kLanes; ++c) v[c] = c0 + c < C ? IO::load(p.x, i + c) : 0.f;
      }
      DEPRUNE_CL_UNROLL
      for (int c = 0; c < kLanes; ++c) acc[r][c] += E.w[c] * ((E.lanes >> c) & 1u ? v[c] : 0.f);
    }
  }
}

// Phase 2: this thread's strips of its channel block, then the bias + activation epilogue.
template <class IO>
DEPRUNE_HD void compute(const ClParams& p, int64_t ptile, int64_t ctile, int tid, const void* smem) {
  const int32_t lb = tid % p.tile_blocks, slot = tid / p.tile_blocks;
  if (slot >= p.slots || lb >= tile_block_count(p, ctile)) return;
  const int32_t count = staged_counts(smem)[lb];
  const Entry* ent = staged_entries(smem) + lb * p.kk;
  const int32_t H = static_cast<int32_t>(p.s.H), W = static_cast<int32_t>(p.s.W), C = static_cast<int32_t>(p.s.C);
  const int32_t OH = static_cast<int32_t>(p.s.OH), OW = static_cast<int32_t>(p.s.OW);
  const int32_t c0 = static_cast<int32_t>((ctile * p.tile_blocks + lb) * kLanes);
  float bias[kLanes];
  for (int c = 0; c < kLanes; ++c) bias[c] = p.bias && c0 + c < C ? p.bias[c0 + c] : 0.f;
  const int64_t per_image = int64_t{OH} * p.strips_per_row;
  // Receptive field of a strip relative to its first input pixel, for the interior test.
  const int32_t top = -p.s.pad_top, bottom = (p.s.kh - 1) * p.s.dil_h - p.s.pad_top;
  const int32_t left = -p.s.pad_left, right = (p.s.kw - 1) * p.s.dil_w - p.s.pad_left;
  for (int32_t k = 0; k < p.spt; ++k) {
    const int64_t g = (ptile * p.spt + k) * p.slots + slot;
    if (g >= p.strips) return;
    const int64_t n = g / per_image;
    const int32_t rem = static_cast<int32_t>(g - n * per_image);
    const int32_t oy = rem / p.strips_per_row;
    const int32_t ox0 = (rem - oy * p.strips_per_row) * p.strip;
    const int32_t nr = OW - ox0 < p.strip ? OW - ox0 : p.strip;
    const int32_t iy0 = oy * p.s.stride_h, ix0 = ox0 * p.s.stride_w;
    const int64_t xi = n * (int64_t{H} * W * C) + int64_t{iy0 * W + ix0} * C + c0;
    float acc[kMaxStrip][kLanes];
    for (int r = 0; r < kMaxStrip; ++r)
      for (int c = 0; c < kLanes; ++c) acc[r][c] = 0.f;
    const bool interior = iy0 + top >= 0 && iy0 + bottom < H && ix0 + left >= 0 &&
                          ix0 + (nr - 1) * p.s.stride_w + right < W;
    if (p.vec) {
      if (interior)
        accumulate<IO, true, true>(p, ent, count, xi, iy0, ix0, nr, c0, acc);
      else
        accumulate<IO, false, true>(p, ent, count, xi, iy0, ix0, nr, c0, acc);
    } else {
      if (interior)
        accumulate<IO, true, false>(p, ent, count, xi, iy0, ix0, nr, c0, acc);
      else
        accumulate<IO, false, false>(p, ent, count, xi, iy0, ix0, nr, c0, acc);
    }
    const int64_t yi = ((n * OH + oy) * OW + ox0) * C + c0;
    DEPRUNE_CL_UNROLL
    for (int r = 0; r < kMaxStrip; ++r) {
      if (r >= nr) break;
      float out[kLanes];
      for (int c = 0; c < kLanes; ++c) out[c] = apply_activation(acc[r][c] + bias[c], p.act);
      if (p.vec) {
        IO::store8(p.y, yi + int64_t{r} * C, out);
      } else {
        for (int c = 0; c < kLanes; ++c)
          if (c0 + c < C) IO::store(p.y, yi + int64_t{r} * C + c, out[c]);
      }
    }
  }
}

// --- grid -------------------------------------------------------------------------------------------------------
// Grid: x = pixel tile, y = channel tile. CUDA caps grid x at 2^31 - 1 and y at 65535 blocks, so a larger grid is
// split into launches, each told where its x / y range starts.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

struct ClLaunch {
  uint32_t pixel_tiles, channel_tiles;  // grid x, y of this launch
  int64_t ptile_base, ctile_base;       // tiles of blockIdx.x == 0 / blockIdx.y == 0
};

template <class F>
void for_each_cl_launch(const ClParams& p, F&& f) {
  for (int64_t c0 = 0; c0 < p.channel_tiles; c0 += kMaxGridY) {
    for (int64_t x0 = 0; x0 < p.pixel_tiles; x0 += kMaxGridX) {
      const int64_t nc = p.channel_tiles - c0 < kMaxGridY ? p.channel_tiles - c0 : kMaxGridY;
      const int64_t nx = p.pixel_tiles - x0 < kMaxGridX ? p.pixel_tiles - x0 : kMaxGridX;
      f(ClLaunch{static_cast<uint32_t>(nx), static_cast<uint32_t>(nc), x0, c0});
    }
  }
}

// --- the block program -------------------------------------------------------------------------------------------
// `Threads` as for cuda_block::run_block (each / barrier / finish). One barrier: every entry is staged before any
// thread reads one; the barrier sits outside any per-thread branch, so every thread reaches it.
template <class IO, class Threads>
DEPRUNE_HD void run_cl_block(const ClParams& params, int64_t ptile, int64_t ctile, void* smem, Threads& threads) {
  const ClParams* p = &params;
  threads.each([=](int tid) { stage(*p, ctile, tid, smem); });
  threads.barrier();
  threads.each([=](int tid) { compute<IO>(*p, ptile, ctile, tid, smem); });
  threads.finish();
}

}  // namespace cuda_cl
}  // namespace deprune

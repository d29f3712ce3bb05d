// CPU dispatch: picks the instruction set once, splits the output into tasks and runs them on the pool.
#include "dwconv_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"

namespace deprune {
namespace cpu {
namespace {

struct IsaKernels {
  const char* name;
  RangeKernel nchw;
  RangeKernel nhwc;
};

const IsaKernels kIsas[] = {
    {"avx512", &avx512::nchw, &avx512::nhwc},
    {"avx2", &avx2::nchw, &avx2::nhwc},
    {"generic", &generic::nchw, &generic::nhwc},
};

bool supported(const IsaKernels& k) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  if (std::strcmp(k.name, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(k.name, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  if (std::strcmp(k.name, "generic") != 0) return false;
#endif
  return true;
}

const IsaKernels* find(const char* name) {
  for (const auto& k : kIsas)
    if (std::strcmp(k.name, name) == 0) return &k;
  return nullptr;
}

std::atomic<bool> g_forced{false};  // the ISA was named by DEPRUNE_CPU_ISA or set_isa

const IsaKernels* best() {
  if (const char* env = std::getenv("DEPRUNE_CPU_ISA")) {
    const IsaKernels* k = find(env);
    if (k && supported(*k)) {
      g_forced.store(true, std::memory_order_release);
      return k;
    }
  }
  // AVX-512 is opt-in (DEPRUNE_CPU_ISA=avx512 or set_cpu_isa) until it has been verified on such a CPU:
  // the development machines have none, so the default never runs code no test has executed.
  for (const auto& k : kIsas)
    if (std::strcmp(k.name, "avx512") != 0 && supported(k)) return &k;
  return &kIsas[2];
}

std::atomic<const IsaKernels*> g_isa{nullptr};

const IsaKernels& current() {
  const IsaKernels* k = g_isa.load(std::memory_order_acquire);
  if (!k) {
    k = best();
    g_isa.store(k, std::memory_order_release);
  }
  return *k;
}

// Below this many multiply-adds a call runs on one thread: waking a worker costs more than it saves.
constexpr int64_t kMinWorkPerThread = 48 * 1024;
// Output size above which the kernels use non-temporal stores.
constexpr int64_t kStreamBytes = 8 << 20;

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Output positions along one axis whose whole window lies inside the input (no padding read).
int64_t interior(int64_t out, int64_t in, int64_t pad, int64_t k, int64_t dil, int64_t stride) {
  const int64_t lo = std::min(out, std::max<int64_t>(0, -floor_div(-pad, stride)));
  const int64_t hi = std::max(lo, std::min(out, floor_div(in - 1 + pad - (k - 1) * dil, stride) + 1));
  return hi - lo;
}

// Loop order of the channels_last kernel.
// - Grouped where at least a quarter of the output pixels have part of their window in the padding (14x14 with a
//   3x3 window, 28x28 with 5x5, every 7x7). Paired measurements of both orders (BENCHMARKS.md): grouped 1.1-1.5x
//   faster on those layers at batch 1 and 16, row by row 5-9% faster on the wide, memory-bound layers (112x112,
//   56x56) at batch 16.
// - Tiled instead of grouped with a window of at least 25 taps, an output that is not streamed (the tiled order
//   stores 8 channels per pixel at a time; at batch 16 on 28x28 the grouped order's streamed stores were worth
//   more, 0.92-1.00x), one block's tile within kNhwcTileBytes, and at least 16 multiply-adds per output pixel and
//   block for every input pixel copied into its tile (entries / blocks * outputs / copied inputs): the 5x5 layers
//   at stride 1 with most of each block's taps kept, as element masks give. Paired A/B against the grouped order
//   (BENCHMARKS.md), efficientnet_b0's 5x5 stride-1 layers: every tap kept 1.06-1.38x, element masks at 29%
//   1.04-1.35x; block:8 masks (7 or 12 taps of 25 per block) 0.75-1.16x and 3x3 windows 0.67-1.04x, where
//   copying the input costs about what the bounds checks it saves do.
NhwcOrder nhwc_order(const DWConvShape& s, int64_t entries, bool far_output) {
  const int64_t inner = interior(s.OH, s.H, s.pad_top, s.kh, s.dil_h, s.stride_h) *
                        interior(s.OW, s.W, s.pad_left, s.kw, s.dil_w, s.stride_w);
  if (4 * (s.OH * s.OW - inner) < s.OH * s.OW) return NhwcOrder::Rows;
  const NhwcTile g = nhwc_tile_geometry(s);
  if (s.kh * s.kw < 25 || far_output || g.floats() * static_cast<int64_t>(sizeof(float)) > kNhwcTileBytes)
    return NhwcOrder::Grouped;
  const int64_t blocks = (s.C + kChannelBlock - 1) / kChannelBlock;
  const int64_t copied = std::min<int64_t>(s.H, g.rows - s.pad_top) * std::min<int64_t>(s.W, g.cols - s.pad_left);
  return entries * s.OH * s.OW >= 16 * blocks * copied ? NhwcOrder::Tiled : NhwcOrder::Grouped;
}

}  // namespace

const char* isa() { return current().name; }

bool isa_forced() {
  current();  // reads DEPRUNE_CPU_ISA on first use
  return g_forced.load(std::memory_order_acquire);
}

bool isa_supported(const char* name) {
  const IsaKernels* k = find(name);
  return k && supported(*k);
}

void set_isa(const char* name) {
  const IsaKernels* k = find(name);
  if (!k) throw std::invalid_argument(std::string("unknown CPU instruction set '") + name +
                                      "', expected one of: avx512, avx2, generic");
  if (!supported(*k)) throw std::invalid_argument(std::string("this CPU does not support '") + name + "'");
  g_isa.store(k, std::memory_order_release);
  g_forced.store(true, std::memory_order_release);
}

void sparse_dwconv2d(const DWConvArgs& a, int num_threads) {
  const DWConvShape& s = a.shape;
  if (s.kh * s.kw > kMaxTaps) throw std::invalid_argument("kernel larger than 11x11");
  const IsaKernels& k = current();
  const bool nhwc = a.layout == Layout::NHWC;
  const int64_t blocks = (s.C + kChannelBlock - 1) / kChannelBlock;
  // Outputs far beyond the caches go straight to memory: saves the read-for-ownership of every output line.
  const bool far_output = s.N * s.C * s.OH * s.OW * static_cast<int64_t>(sizeof(float)) > kStreamBytes;
  const NhwcOrder order = nhwc ? nhwc_order(s, a.block.offsets[blocks], far_output) : NhwcOrder::Rows;
  const bool tiled = order == NhwcOrder::Tiled;
  // Units of work: (n, c) planes (NCHW), (n, oy) output rows or (n, group of channel blocks) (channels_last).
  int64_t units = nhwc ? s.N * s.OH : s.N * s.C;
  if (tiled) {
    const int64_t band = nhwc_tile_blocks(s);
    units = s.N * ((blocks + band - 1) / band);
  }
  const int64_t nnz = a.taps.offsets[s.C];
  const int64_t work = (nnz + s.C) * s.N * s.OH * s.OW;
  int64_t threads = std::min<int64_t>({num_threads, units, std::max<int64_t>(1, work / kMinWorkPerThread)});
  // Several tasks per thread so an uneven split (unbalanced masks, border rows) evens out.
  const int64_t tasks = threads > 1 ? std::min<int64_t>(units, threads * 4) : 1;
  // NHWC: see nhwc_scratch_floats; NCHW: the padded phase planes.
  const int64_t scratch_floats =
      nhwc ? nhwc_scratch_floats(s, a.block.offsets[blocks], tiled) : nchw_scratch_geometry(s).total_floats();
  RangeKernel fn = nhwc ? k.nhwc : k.nchw;
  DWConvArgs args = a;
  args.nhwc_order = order;
  // (channels_last: only with whole channel blocks, where a pixel block's output is one contiguous run)
  args.stream_output = far_output && (!nhwc || s.C % kChannelBlock == 0);
  parallel_for(static_cast<int>(tasks), static_cast<int>(threads), [&](int t) {
    thread_local std::vector<float> scratch;
    if (static_cast<int64_t>(scratch.size()) < scratch_floats) scratch.resize(scratch_floats);
    const int64_t begin = units * t / tasks, end = units * (t + 1) / tasks;
    fn(args, begin, end, scratch.data());
  });
}

}  // namespace cpu
}  // namespace deprune

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

const IsaKernels* best() {
  if (const char* env = std::getenv("DEPRUNE_CPU_ISA")) {
    const IsaKernels* k = find(env);
    if (k && supported(*k)) return k;
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
// Output size above which the NCHW kernel uses non-temporal stores.
constexpr int64_t kStreamBytes = 8 << 20;

}  // namespace

const char* isa() { return current().name; }

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
}

void sparse_dwconv2d(const DWConvArgs& a, int num_threads) {
  const DWConvShape& s = a.shape;
  if (s.kh * s.kw > kMaxTaps) throw std::invalid_argument("kernel larger than 11x11");
  const IsaKernels& k = current();
  const bool nhwc = a.layout == Layout::NHWC;
  const int64_t units = nhwc ? s.N * s.OH : s.N * s.C;
  const int64_t nnz = a.taps.offsets[s.C];
  const int64_t work = (nnz + s.C) * s.N * s.OH * s.OW;
  int64_t threads = std::min<int64_t>({num_threads, units, std::max<int64_t>(1, work / kMinWorkPerThread)});
  // Several tasks per thread so an uneven split (unbalanced masks, border rows) evens out.
  const int64_t tasks = threads > 1 ? std::min<int64_t>(units, threads * 4) : 1;
  // NHWC: see nhwc_scratch_floats; NCHW: the padded phase planes.
  const int64_t scratch_floats =
      nhwc ? nhwc_scratch_floats(s, a.block.offsets[(s.C + kChannelBlock - 1) / kChannelBlock])
           : nchw_scratch_geometry(s).total_floats();
  RangeKernel fn = nhwc ? k.nhwc : k.nchw;
  DWConvArgs args = a;
  // Outputs far beyond the caches go straight to memory: saves the read-for-ownership of every output line.
  // (channels_last: only with whole channel blocks, where a pixel block's output is one contiguous run)
  args.stream_output = s.N * s.C * s.OH * s.OW * static_cast<int64_t>(sizeof(float)) > kStreamBytes &&
                       (!nhwc || s.C % kChannelBlock == 0);
  parallel_for(static_cast<int>(tasks), static_cast<int>(threads), [&](int t) {
    thread_local std::vector<float> scratch;
    if (static_cast<int64_t>(scratch.size()) < scratch_floats) scratch.resize(scratch_floats);
    const int64_t begin = units * t / tasks, end = units * (t + 1) / tasks;
    fn(args, begin, end, scratch.data());
  });
}

}  // namespace cpu
}  // namespace deprune

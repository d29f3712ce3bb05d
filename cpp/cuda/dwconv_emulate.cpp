// Host emulation of the CUDA kernels: the launches of for_each_launch (NCHW) / for_each_cl_launch (channels_last)
// are walked block by block and each block runs run_block (dwconv_block.h) / run_cl_block (dwconv_cl.h), the
// kernel's own program, with a host buffer standing in for shared memory.
//
// Between two barriers every thread runs its whole share of the program before the next thread starts (thread
// order alternating between descending and ascending), which is one of the schedules a GPU may pick. A barrier
// missing from run_block then shows up here: a thread reads shared entries another thread has not written yet
// (shared memory is poisoned with NaN per block) or that it has already overwritten with the next chunk.
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "dwconv_block.h"
#include "dwconv_cl.h"
#include "dwconv_cuda.h"

namespace deprune {
namespace {

using namespace cuda_block;

class EmulatedThreads {
 public:
  explicit EmulatedThreads(int threads = kThreads) : threads_(threads), states_(threads) {}

  ThreadState& state(int tid) { return states_[tid]; }
  template <class F>
  void each(const F& f) {
    pending_.emplace_back(f);
  }
  void barrier() { run_pending(); }
  void finish() { run_pending(); }

  // Before each block: registers hold NaN, so a thread that skips init_state is seen.
  void poison() {
    for (ThreadState& st : states_)
      for (auto& row : st.acc)
        for (float& v : row) v = std::numeric_limits<float>::quiet_NaN();
    pending_.clear();
  }

 private:
  void run_pending() {
    descending_ = !descending_;
    for (int i = 0; i < threads_; ++i) {
      const int tid = descending_ ? threads_ - 1 - i : i;
      for (const auto& f : pending_) f(tid);
    }
    pending_.clear();
  }

  int threads_;
  std::vector<ThreadState> states_;
  std::vector<std::function<void(int)>> pending_;
  bool descending_ = false;
};

// 16-byte words: the alignment the kernel's dynamic shared memory has (staged channels_last entries are 16-aligned).
struct alignas(16) SharedWord {
  uint64_t lo, hi;
};
constexpr uint64_t kNaNs = 0x7fc000007fc00000ull;  // two fp32 NaNs: an entry the block did not stage

template <class IO>
void emulate_nchw(const KernelParams& p) {
  // uint64_t storage gives the 8-byte alignment the kernel's dynamic shared memory has.
  std::vector<uint64_t> smem((shared_bytes(p.chunk) + sizeof(uint64_t) - 1) / sizeof(uint64_t));
  EmulatedThreads threads;
  for_each_launch(p, [&](const GridLaunch& g) {
    for (uint32_t bz = 0; bz < g.images; ++bz) {
      for (uint32_t by = 0; by < g.groups; ++by) {
        for (uint32_t bx = 0; bx < g.tiles; ++bx) {
          for (uint64_t& word : smem) word = 0x7fc000007fc00000ull;  // NaN: an entry the block did not load
          threads.poison();
          run_block<IO>(p, block_coord(bx, by, bz, g.group_base, g.n_base), smem.data(), threads);
        }
      }
    }
  });
}

template <class IO>
void emulate_cl(const cuda_cl::ClParams& p) {
  std::vector<SharedWord> smem((cuda_cl::cl_shared_bytes(p) + sizeof(SharedWord) - 1) / sizeof(SharedWord));
  EmulatedThreads threads(p.threads);
  cuda_cl::for_each_cl_launch(p, [&](const cuda_cl::ClLaunch& g) {
    for (uint32_t by = 0; by < g.channel_tiles; ++by) {
      for (uint32_t bx = 0; bx < g.pixel_tiles; ++bx) {
        for (SharedWord& word : smem) word = SharedWord{kNaNs, kNaNs};
        threads.poison();
        cuda_cl::run_cl_block<IO>(p, g.ptile_base + bx, g.ctile_base + by, smem.data(), threads);
      }
    }
  });
}

template <class IO>
void emulate(const DWConvShape& shape, const SparseTaps& taps, const BlockTaps& block, const float* bias,
             Activation act, Layout layout, const void* x, void* y, int sms) {
  if (layout == Layout::NCHW)
    emulate_nchw<IO>(make_params(shape, taps, bias, act, x, y));
  else
    emulate_cl<IO>(cuda_cl::make_cl_params(shape, block, bias, act, x, y, sms));
}

}  // namespace

void sparse_dwconv2d_emulate_cuda(const DWConvShape& shape, const SparseTaps& taps, const BlockTaps& block,
                                  const float* bias, Activation act, DType dtype, Layout layout, const void* x,
                                  void* y, int sms) {
  switch (dtype) {
    case DType::Float32: emulate<IOFloat>(shape, taps, block, bias, act, layout, x, y, sms); break;
    case DType::Float16: emulate<IOHalf>(shape, taps, block, bias, act, layout, x, y, sms); break;
    case DType::BFloat16: emulate<IOBFloat16>(shape, taps, block, bias, act, layout, x, y, sms); break;
    default: throw std::invalid_argument("sparse_dwconv2d (CUDA emulation): unknown dtype code " +
                                         std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace deprune

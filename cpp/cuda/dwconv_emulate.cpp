// Host emulation of the CUDA kernel: the launches of for_each_launch are walked block by block and each block runs
// run_block (dwconv_block.h), the kernel's own program, with a host buffer standing in for shared memory.
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
#include "dwconv_cuda.h"

namespace deprune {
namespace {

using namespace cuda_block;

class EmulatedThreads {
 public:
  EmulatedThreads() : states_(kThreads) {}

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
    for (int i = 0; i < kThreads; ++i) {
      const int tid = descending_ ? kThreads - 1 - i : i;
      for (const auto& f : pending_) f(tid);
    }
    pending_.clear();
  }

  std::vector<ThreadState> states_;
  std::vector<std::function<void(int)>> pending_;
  bool descending_ = false;
};

template <class IO, Layout L>
void emulate(const KernelParams& p) {
  // uint64_t storage gives the 8-byte alignment the kernel's dynamic shared memory has.
  std::vector<uint64_t> smem((shared_bytes(p.chunk) + sizeof(uint64_t) - 1) / sizeof(uint64_t));
  EmulatedThreads threads;
  for_each_launch(p, [&](const GridLaunch& g) {
    for (uint32_t bz = 0; bz < g.images; ++bz) {
      for (uint32_t by = 0; by < g.groups; ++by) {
        for (uint32_t bx = 0; bx < g.tiles; ++bx) {
          for (uint64_t& word : smem) word = 0x7fc000007fc00000ull;  // NaN: an entry the block did not load
          threads.poison();
          run_block<IO, L>(p, block_coord(bx, by, bz, g.group_base, g.n_base), smem.data(), threads);
        }
      }
    }
  });
}

template <class IO>
void emulate_layout(const KernelParams& p, Layout layout) {
  if (layout == Layout::NCHW)
    emulate<IO, Layout::NCHW>(p);
  else
    emulate<IO, Layout::NHWC>(p);
}

}  // namespace

void sparse_dwconv2d_emulate_cuda(const DWConvShape& shape, const SparseTaps& taps, const float* bias,
                                  Activation act, DType dtype, Layout layout, const void* x, void* y) {
  const KernelParams p = make_params(shape, taps, bias, act, layout, x, y);
  switch (dtype) {
    case DType::Float32: emulate_layout<IOFloat>(p, layout); break;
    case DType::Float16: emulate_layout<IOHalf>(p, layout); break;
    case DType::BFloat16: emulate_layout<IOBFloat16>(p, layout); break;
    default: throw std::invalid_argument("sparse_dwconv2d (CUDA emulation): unknown dtype code " +
                                         std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace deprune

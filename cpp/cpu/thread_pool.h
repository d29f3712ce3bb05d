// A small persistent thread pool for the CPU kernels: workers spin briefly between calls (batch-1 layers are
// tens of microseconds) and then sleep, so they do not steal cores from PyTorch's own threads for long.
#pragma once

#include <functional>

namespace deprune {
namespace cpu {

// Runs fn(t) for t in [0, num_tasks) on up to num_threads threads, the caller's thread included, and returns
// when all are done. Calls from several threads at once are safe (a busy pool runs the later call inline).
void parallel_for(int num_tasks, int num_threads, const std::function<void(int)>& fn);

}  // namespace cpu
}  // namespace deprune

// Parallel loop of the CPU kernels over OpenMP. The extension links libgomp.so.1 by soname: imported after
// torch (as timm_deprune always does), it binds to the libgomp torch already loaded, so our kernels and
// PyTorch's share one thread team instead of two pools fighting over the cores.
#pragma once

#include <functional>

namespace deprune {
namespace cpu {

// Runs fn(t) for t in [0, num_tasks) on up to num_threads threads; returns when all are done.
void parallel_for(int num_tasks, int num_threads, const std::function<void(int)>& fn);

// Whether the build has OpenMP (otherwise parallel_for runs serially).
bool has_openmp();

}  // namespace cpu
}  // namespace deprune

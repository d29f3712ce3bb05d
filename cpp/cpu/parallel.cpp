#include "parallel.h"

#include <algorithm>

namespace deprune {
namespace cpu {

void parallel_for(int num_tasks, int num_threads, const std::function<void(int)>& fn) {
  const int threads = std::max(1, std::min(num_threads, num_tasks));
#if defined(_OPENMP)
  if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int t = 0; t < num_tasks; ++t) fn(t);
    return;
  }
#endif
  for (int t = 0; t < num_tasks; ++t) fn(t);
}

bool has_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace deprune

// Packed SGEMM driver: packs the weights, splits a call into cache blocks and tasks, runs them on the pool with
// the instruction set cpu::isa() names (the same choice and override as the DW kernel).
#include "gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "dwconv_cpu.h"
#include "parallel.h"

namespace deprune {
namespace cpu {
namespace {

float* alloc_floats(int64_t n) {
  const size_t bytes = ((static_cast<size_t>(n) * sizeof(float) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return static_cast<float*>(p);
}

// The DW kernels' ISA when it was named (DEPRUNE_CPU_ISA, set_cpu_isa: tests run every ISA); otherwise AVX-512
// wherever the CPU has it: its 32 registers hold a 12x32 tile (the AVX2 one is 6x16), 1.3-2x the GFLOP/s of AVX2
// on efficientnet_b0's point-wise shapes on the 2-core AMD EPYC dev VM (BENCHMARKS.md, 2026-12-04). The DW kernels
// keep AVX2 by default: there AVX-512 measured no faster.
const GemmIsa& current_gemm() {
  if (!isa_forced() && isa_supported("avx512")) return avx512::kGemm;
  const char* name = isa();
  if (std::strcmp(name, "avx512") == 0) return avx512::kGemm;
  if (std::strcmp(name, "avx2") == 0) return avx2::kGemm;
  return generic::kGemm;
}

// Rows of one task's A block: with a GEMM_KC-wide reduction block it stays in L2 while every panel passes.
constexpr int64_t kBlockRowsMax = 256;
// Below this many multiply-adds a call runs on one thread: waking a worker costs more than it saves.
constexpr int64_t kMinWorkPerThread = 64 * 1024;

std::string str(int64_t v) { return std::to_string(v); }

}  // namespace

void PackedGemm::Free::operator()(float* p) const { std::free(p); }

PackedGemm::PackedGemm(const float* w, int64_t N, int64_t K, int64_t stride_n, int64_t stride_k, const float* bias)
    : n_(N), k_(K) {
  if (N < 1 || K < 1)
    throw std::invalid_argument("GEMM weights need N >= 1 output and K >= 1 input channels, got N=" + str(N) +
                                " K=" + str(K));
  if (!w) throw std::invalid_argument("GEMM weights pointer is null");
  const int64_t P = panels();
  data_.reset(alloc_floats(P * K * kGemmPanel));
  bias_.reset(alloc_floats(P * kGemmPanel));
  for (int64_t p = 0; p < P; ++p) {
    float* dst = data_.get() + p * K * kGemmPanel;
    const int64_t n0 = p * kGemmPanel, cols = std::min(kGemmPanel, N - n0);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < cols; ++j) dst[k * kGemmPanel + j] = w[(n0 + j) * stride_n + k * stride_k];
  }
  if (bias) std::memcpy(bias_.get(), bias, static_cast<size_t>(N) * sizeof(float));
}

const char* gemm_isa() {
  const GemmIsa& k = current_gemm();
  return &k == &avx512::kGemm ? "avx512" : &k == &avx2::kGemm ? "avx2" : "generic";
}

bool gemm_supports(Activation act) {
  return act == Activation::Identity || act == Activation::ReLU || act == Activation::ReLU6 ||
         act == Activation::SiLU || act == Activation::HardSwish;
}

void gemm(const PackedGemm& w, const GemmArgs& g, int num_threads) {
  const int64_t N = w.N(), K = w.K();
  if (g.M < 0) throw std::invalid_argument("GEMM rows M must be >= 0, got " + str(g.M));
  if (g.M == 0) return;
  if (!g.a || !g.c) throw std::invalid_argument("GEMM input and output pointers must be non-null");
  if (g.lda < K) throw std::invalid_argument("GEMM input row stride must be >= K=" + str(K) + ", got " + str(g.lda));
  if (g.ldc < N) throw std::invalid_argument("GEMM output row stride must be >= N=" + str(N) + ", got " + str(g.ldc));
  if (g.residual && g.ldr < N)
    throw std::invalid_argument("GEMM residual row stride must be >= N=" + str(N) + ", got " + str(g.ldr));
  if (!gemm_supports(g.act))
    throw std::invalid_argument("GEMM epilogue supports activations 0-4 (identity, relu, relu6, silu, hardswish),"
                                " got code " + str(static_cast<int32_t>(g.act)));
  if (num_threads < 1) throw std::invalid_argument("threads must be >= 1, got " + str(num_threads));

  const GemmIsa& k = current_gemm();
  const int64_t P = w.panels();
  const int64_t work = g.M * N * K;
  const int threads = static_cast<int>(std::min<int64_t>(num_threads, std::max<int64_t>(1, work / kMinWorkPerThread)));

  // Tasks: row blocks x panel ranges. Row blocks are whole register tiles; when they are fewer than 4 per thread
  // the panels are split too, so small-M calls (batch 1, 7x7) still use every thread.
  const int64_t tiles = (g.M + k.mr - 1) / k.mr;
  const int64_t tiles_per_block = std::max<int64_t>(1, kBlockRowsMax / k.mr);
  int64_t row_blocks = (tiles + tiles_per_block - 1) / tiles_per_block;
  int64_t panel_groups = 1;
  if (threads > 1) {
    const int64_t want = 4 * threads;
    if (row_blocks < want) row_blocks = std::min(tiles, want);
    if (row_blocks < want) panel_groups = std::min(P, (want + row_blocks - 1) / row_blocks);
  }
  const int64_t tiles_per_task = (tiles + row_blocks - 1) / row_blocks;
  row_blocks = (tiles + tiles_per_task - 1) / tiles_per_task;
  // Panel ranges in whole register tiles (2 panels on AVX-512) so no task computes a narrow tile it need not.
  const int64_t step = (P + panel_groups - 1) / panel_groups;
  const int64_t panels_per_task = ((step + 1) / 2) * 2 < P ? ((step + 1) / 2) * 2 : P;
  panel_groups = (P + panels_per_task - 1) / panels_per_task;
  const int64_t tasks = row_blocks * panel_groups;
  // Equal reduction blocks of at most the ISA's kc (409 = 205 + 204, not 384 + 25).
  const int64_t k_blocks = (K + k.kc - 1) / k.kc, kc = (K + k_blocks - 1) / k_blocks;

  parallel_for(static_cast<int>(tasks), threads, [&](int t) {
    const int64_t rb = t / panel_groups, pg = t % panel_groups;
    const int64_t m0 = rb * tiles_per_task * k.mr, m1 = std::min(g.M, m0 + tiles_per_task * k.mr);
    const int64_t p0 = pg * panels_per_task, p1 = std::min(P, p0 + panels_per_task);
    for (int64_t k0 = 0; k0 < K; k0 += kc) k.block(w, g, m0, m1, p0, p1, k0, std::min(K, k0 + kc));
  });
}

}  // namespace cpu
}  // namespace deprune

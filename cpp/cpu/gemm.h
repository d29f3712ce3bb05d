// Packed SGEMM for point-wise (1x1) convolutions in NHWC: C[M,N] = act(A[M,K] * B[K,N] + bias) + residual.
// A is the activation (M = batch*H*W rows of K input channels, row stride given), B the 1x1 weights, packed once
// into panels of kGemmPanel output channels (PackedGemm) and reused across calls. Torch-free; micro-kernels per
// instruction set (gemm_{generic,avx2,avx512}.cpp), chosen at run time with the DW kernel's cpu::isa().
#pragma once

#include <cstdint>
#include <memory>

#include "deprune/dwconv.h"

namespace deprune {
namespace cpu {

// Output channels per packed panel: one AVX-512 vector, two AVX2 vectors, four SSE vectors.
constexpr int64_t kGemmPanel = 16;

// Weights packed into ceil(N / kGemmPanel) panels, each [K][kGemmPanel] (columns past N are zero), and the bias
// padded the same way. Immutable once built; safe to share between threads and calls.
class PackedGemm {
 public:
  // w(n, k) = w[n * stride_n + k * stride_k]: [N,K] (a conv weight) has stride_n = K, stride_k = 1; [K,N] has
  // stride_n = 1, stride_k = N. bias may be nullptr (zero). Throws std::invalid_argument on N < 1 or K < 1.
  PackedGemm(const float* w, int64_t N, int64_t K, int64_t stride_n, int64_t stride_k, const float* bias);

  int64_t N() const { return n_; }
  int64_t K() const { return k_; }
  int64_t panels() const { return (n_ + kGemmPanel - 1) / kGemmPanel; }
  const float* panel(int64_t p) const { return data_.get() + p * k_ * kGemmPanel; }
  const float* bias() const { return bias_.get(); }  // panels() * kGemmPanel floats

 private:
  struct Free {
    void operator()(float* p) const;
  };
  int64_t n_, k_;
  std::unique_ptr<float[], Free> data_, bias_;
};

// One call: rows of a, c and residual are contiguous along channels; strides are in floats.
struct GemmArgs {
  int64_t M;
  const float* a;      // [M, K], row stride lda >= K
  int64_t lda;
  float* c;            // [M, N], row stride ldc >= N; must not overlap a or residual
  int64_t ldc;
  const float* residual;  // [M, N] added after the activation, or nullptr
  int64_t ldr;
  Activation act;      // Identity, ReLU, ReLU6, SiLU or HardSwish
};

// c = act(a * B + bias) + residual on up to num_threads threads. Throws std::invalid_argument on bad sizes.
void gemm(const PackedGemm& w, const GemmArgs& args, int num_threads);

// Instruction set of the GEMM micro-kernels: the DW kernels' when forced, else the best this CPU has.
const char* gemm_isa();

// Whether the epilogue implements this activation.
bool gemm_supports(Activation act);

// Per-ISA block: rows [m0, m1), panels [p0, p1), reduction [k0, k1) of one call; k0 > 0 adds to c, k1 == K
// applies the epilogue. Each ISA reports its register tile's rows (mr) and its preferred K block (kc).
struct GemmIsa {
  void (*block)(const PackedGemm& w, const GemmArgs& args, int64_t m0, int64_t m1, int64_t p0, int64_t p1,
                int64_t k0, int64_t k1);
  int64_t mr, kc;
};
namespace generic { extern const GemmIsa kGemm; }
namespace avx2 { extern const GemmIsa kGemm; }
namespace avx512 { extern const GemmIsa kGemm; }

}  // namespace cpu
}  // namespace deprune

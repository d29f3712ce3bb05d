// Torch-free description of one sparse depth-wise convolution call, shared by the CPU and CUDA backends.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DEPRUNE_HD __host__ __device__ __forceinline__
#else
#define DEPRUNE_HD inline
#endif

namespace deprune {

// Epilogue activations; the integer values are part of the Python <-> C++ contract (kernels/activations.py).
enum class Activation : int32_t { Identity = 0, ReLU = 1, ReLU6 = 2, SiLU = 3, HardSwish = 4, GELU = 5 };
constexpr int32_t kNumActivations = 6;

// Element dtypes of x / y (the kept-tap weights and bias are always fp32; accumulation is fp32).
enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Memory layout of x and y: NCHW-contiguous or channels_last (NHWC-contiguous).
enum class Layout : int32_t { NCHW = 0, NHWC = 1 };

struct DWConvShape {
  int64_t N, C, H, W;    // input
  int64_t OH, OW;        // output
  int32_t kh, kw;
  int32_t stride_h, stride_w;
  int32_t dil_h, dil_w;
  int32_t pad_top, pad_left;  // bottom/right padding is implied by OH/OW
};

// Per-channel kept taps in CSR form: channel c owns entries [offsets[c], offsets[c+1]).
// taps[i] = ky * kw + kx, weights[i] its fp32 weight.
struct SparseTaps {
  const int32_t* offsets;
  const int32_t* taps;
  const float* weights;
};

// Per channel-block kept taps for channels_last: block b covers channels [b*kBlock, b*kBlock+kBlock);
// entries [block_offsets[b], block_offsets[b+1]) list every tap kept by at least one channel of the block,
// block_weights[i*kBlock + j] is channel (b*kBlock + j)'s weight for that tap (0 where it is pruned or >= C).
constexpr int32_t kChannelBlock = 8;
struct BlockTaps {
  const int32_t* offsets;
  const int32_t* taps;
  const float* weights;
};

DEPRUNE_HD float apply_activation(float v, Activation act) {
  switch (act) {
    case Activation::ReLU: return v > 0.f ? v : 0.f;
    case Activation::ReLU6: return v > 0.f ? (v < 6.f ? v : 6.f) : 0.f;
    case Activation::SiLU: return v / (1.f + expf(-v));
    case Activation::HardSwish: {
      float t = v + 3.f;
      t = t > 0.f ? (t < 6.f ? t : 6.f) : 0.f;
      return v * t * (1.f / 6.f);
    }
    case Activation::GELU: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case Activation::Identity:
    default: return v;
  }
}

}  // namespace deprune

// Native execution of a whole depth-wise separable block (timm DepthwiseSeparableConv, InvertedResidual,
// UniversalInvertedResidual) in NHWC fp32: a chain of stages, each one existing kernel call, run in one call with a
// workspace the block keeps and reuses. Stages: a point-wise conv (the packed SGEMM of gemm.h, bias + activation),
// a sparse depth-wise conv (the kernel of dwconv_cpu.h with its plan, bias + activation), a squeeze-excite (mean
// pool, FC + act, FC, sigmoid / hard-sigmoid gate, multiplied into the activation in place). The residual (the
// block's input) is added after the last stage. Torch-free; weights are copied in when the block is built.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "deprune/dwconv.h"
#include "dwconv_cpu.h"  // DWConvArgs
#include "gemm.h"

namespace deprune {
namespace cpu {

// Squeeze-excite gate function (timm: nn.Sigmoid or hard_sigmoid = relu6(x + 3) / 6).
enum class Gate : int32_t { Sigmoid = 0, HardSigmoid = 1 };

// A sparse depth-wise conv stage: the plan tensors of kernels/plan.py (per-channel and 8-channel-block CSR).
struct BlockDW {
  int64_t C;
  int32_t kh, kw, sh, sw;
  bool same;       // TF "SAME" padding resolved per input size (timm's Conv2dSame); else pad below
  int32_t pad[4];  // top, bottom, left, right
  std::vector<int32_t> offsets, taps, block_offsets, block_taps;
  std::vector<float> values, block_values, bias;  // bias empty: none
  Activation act;

  // The DW kernel's arguments for this stage over `shape` (NHWC), reading x and writing y.
  DWConvArgs args(const DWConvShape& shape, const float* x, float* y) const {
    DWConvArgs a{};
    a.shape = shape;
    a.taps = SparseTaps{offsets.data(), taps.data(), values.data()};
    a.block = BlockTaps{block_offsets.data(), block_taps.data(), block_values.data()};
    a.bias = bias.empty() ? nullptr : bias.data();
    a.act = act;
    a.layout = Layout::NHWC;
    a.x = x;
    a.y = y;
    return a;
  }
};

struct BlockSE {
  int64_t C, R;                     // channels, reduced channels
  std::vector<float> w1, b1, w2, b2;  // w1 [R, C], w2 [C, R]
  Activation act;
  Gate gate;
};

// Spatial size and channels of an NHWC activation (batch is the call's).
struct BlockDims {
  int64_t H, W, C;
};

class NativeBlock {
 public:
  enum class Kind { PW, DW, SE };

  void add_pw(std::unique_ptr<PackedGemm> w, Activation act);
  void add_dw(BlockDW dw);
  void add_se(BlockSE se);
  void set_residual(bool r) { residual_ = r; }
  bool residual() const { return residual_; }
  int64_t stages() const { return static_cast<int64_t>(order_.size()); }
  int64_t in_channels() const;

  // Output dims for an input of these dims; throws std::invalid_argument naming the wrong value.
  BlockDims out_dims(const BlockDims& in) const;

  // y = block(x), x [N, H, W, C] and y [N, OH, OW, OC] contiguous; y must not overlap x. Calls are serialised per
  // block (the workspace is the block's).
  void run(const float* x, float* y, int64_t N, const BlockDims& in, int num_threads);

  // Floats of workspace held now (grows to the largest input seen, then reused).
  int64_t workspace_floats() const { return ws_[0].size + ws_[1].size + se_ws_.size; }

 private:
  struct Step {
    Kind kind;
    int64_t index;  // into pw_ / dw_ / se_
  };
  // 64-byte aligned floats, grown (never shrunk) to the largest call's need; contents are scratch.
  struct Buffer {
    struct Free {
      void operator()(float* p) const;
    };
    std::unique_ptr<float[], Free> data;
    int64_t size = 0;
    float* reserve(int64_t n);
  };
  BlockDims step_dims(const Step& s, const BlockDims& in) const;
  // Floats of one image's widest intermediate activation (dims: the input, then each stage's output).
  int64_t per_image_floats(const std::vector<BlockDims>& dims) const;
  // The stages on N images with `threads` threads per kernel call, through workspace buffers ws[0..1] and se_ws.
  void run_stages(const float* x, float* y, int64_t N, const std::vector<BlockDims>& dims, int threads,
                  Buffer* ws, Buffer& se_ws);
  void resolve_pads(const BlockDW& d, const BlockDims& in, int32_t* pads, int64_t* oh, int64_t* ow) const;
  void run_se(const BlockSE& se, float* x, int64_t N, const BlockDims& d, int threads, Buffer& se_ws);
  // Squeeze-excite of one image from its pooled means s [C]: hidden h [R], gate g [C].
  void se_fc_gate(const BlockSE& se, const float* s, float* h, float* g) const;
  // [PW-expand] -> DW -> [SE] -> PW-project, tiled over bands of output rows (see block_banded.cpp); false when
  // the block has another shape.
  bool run_banded(const float* x, float* y, int64_t N, const std::vector<BlockDims>& dims, int threads);

  std::vector<Step> order_;
  std::vector<std::unique_ptr<PackedGemm>> pw_;
  std::vector<Activation> pw_act_;
  std::vector<BlockDW> dw_;
  std::vector<BlockSE> se_;
  bool residual_ = false;
  std::mutex mu_;
  Buffer ws_[2], se_ws_;
};

}  // namespace cpu
}  // namespace deprune

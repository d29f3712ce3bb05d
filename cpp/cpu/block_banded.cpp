// Banded execution of a [PW-expand] -> DW -> [SE] -> PW-project block (DESIGN.md §6): each task takes one image's
// band of output rows, expands only the input rows its depth-wise window reads (the halo rows of neighbouring
// bands are expanded again), runs the depth-wise conv on them and, without squeeze-excite, projects the band
// straight into the output, so the expanded activation lives in a per-thread buffer of about kBandBytes instead of
// going through memory. With squeeze-excite the gate needs the whole image's depth-wise output: pass 1 writes it and
// per-row channel sums, the gates are computed per image, pass 2 scales each band and projects it. One parallel
// region per pass; every kernel call inside runs on its task's thread.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "block.h"
#include "dwconv_cpu.h"
#include "parallel.h"

namespace deprune {
namespace cpu {
namespace {

// Bytes of one band's expanded input rows: with the band's depth-wise output and the weights, within L2.
constexpr int64_t kBandBytes = 512 << 10;

}  // namespace

bool NativeBlock::run_banded(const float* x, float* y, int64_t N, const std::vector<BlockDims>& dims, int threads) {
  const int64_t steps = stages();
  const bool expand = order_[0].kind == Kind::PW;
  const int64_t i_dw = expand ? 1 : 0;
  if (steps < i_dw + 2 || steps > i_dw + 3 || order_[i_dw].kind != Kind::DW || order_.back().kind != Kind::PW)
    return false;
  const bool has_se = steps == i_dw + 3;
  if (has_se && order_[i_dw + 1].kind != Kind::SE) return false;
  const BlockDims& in = dims.front();
  const BlockDims& mid = dims[i_dw];      // the depth-wise input (expanded)
  const BlockDims& dwo = dims[i_dw + 1];  // the depth-wise output
  const BlockDims& out = dims.back();
  const BlockDW& d = dw_[order_[i_dw].index];
  const PackedGemm* pw_exp = expand ? pw_[order_[0].index].get() : nullptr;
  const Activation exp_act = expand ? pw_act_[order_[0].index] : Activation::Identity;
  const PackedGemm& pw_proj = *pw_[order_.back().index];
  const Activation proj_act = pw_act_[order_.back().index];
  const BlockSE* se = has_se ? &se_[order_[i_dw + 1].index] : nullptr;
  int32_t pads[4];
  int64_t OH, OW;
  resolve_pads(d, mid, pads, &OH, &OW);

  // Output rows per band: as many as keep the band's expanded rows within kBandBytes, but enough bands for every
  // thread at small batches.
  const int64_t row_bytes = mid.W * mid.C * static_cast<int64_t>(sizeof(float));
  int64_t rows = std::max<int64_t>(1, (kBandBytes / std::max<int64_t>(row_bytes, 1) - d.kh) / d.sh + 1);
  const int64_t want_bands = (2 * threads + N - 1) / N;
  rows = std::max<int64_t>(1, std::min(rows, (OH + want_bands - 1) / want_bands));
  const int64_t bands = (OH + rows - 1) / rows;
  // Only worth it while the halo recompute is small: (rows_in / (rows * stride)) - 1 extra expansion.
  if (expand && (rows * d.sh + d.kh - d.sh) * 4 > rows * d.sh * 5 && bands > 1) return false;

  const int64_t tasks = N * bands;
  const int64_t dwo_image = dwo.H * dwo.W * dwo.C;
  float* full = has_se ? ws_[0].reserve(std::max<int64_t>(1, N * dwo_image)) : nullptr;
  float* row_sums = has_se ? se_ws_.reserve(N * OH * d.C + N * (se->R + d.C)) : nullptr;
  float* gates = has_se ? row_sums + N * OH * d.C : nullptr;

  auto pass1 = [&](int t) {
    thread_local NativeBlock::Buffer e_buf, d_buf;
    const int64_t n = t / bands, b = t % bands;
    const int64_t oy0 = b * rows, oy1 = std::min(OH, oy0 + rows);
    const int64_t iy_lo = std::max<int64_t>(0, oy0 * d.sh - pads[0]);
    const int64_t iy_hi = std::min<int64_t>(mid.H, (oy1 - 1) * d.sh - pads[0] + d.kh);
    const float* src = x + (n * in.H + iy_lo) * in.W * in.C;
    const float* dw_in = src;
    if (expand) {
      float* e = e_buf.reserve((iy_hi - iy_lo) * mid.W * mid.C);
      gemm(*pw_exp, GemmArgs{(iy_hi - iy_lo) * in.W, src, in.C, e, mid.C, nullptr, 0, exp_act}, 1);
      dw_in = e;
    }
    float* dst = has_se ? full + n * dwo_image + oy0 * OW * d.C : d_buf.reserve((oy1 - oy0) * OW * d.C);
    const DWConvShape band{1, d.C, iy_hi - iy_lo, mid.W, oy1 - oy0, OW, d.kh, d.kw, d.sh, d.sw, 1, 1,
                           static_cast<int32_t>(iy_lo - (oy0 * d.sh - pads[0])), pads[2]};
    sparse_dwconv2d(d.args(band, dw_in, dst), 1);
    if (has_se) {  // per-row channel sums in fp32; the gate adds the rows in fp64, in row order
      for (int64_t r = 0; r < oy1 - oy0; ++r) {
        float* sum = row_sums + (n * OH + oy0 + r) * d.C;
        for (int64_t c = 0; c < d.C; ++c) sum[c] = 0.0f;
        const float* p = dst + r * OW * d.C;
        for (int64_t xw = 0; xw < OW; ++xw, p += d.C)
          for (int64_t c = 0; c < d.C; ++c) sum[c] += p[c];
      }
      return;
    }
    const int64_t off = (n * OH + oy0) * OW;
    gemm(pw_proj, GemmArgs{(oy1 - oy0) * OW, dst, d.C, y + off * out.C, out.C,
                           residual_ ? x + off * in.C : nullptr, in.C, proj_act}, 1);
  };
  parallel_for(static_cast<int>(tasks), threads, pass1);
  if (!has_se) return true;

  std::vector<double> total(static_cast<size_t>(d.C));
  std::vector<float> pooled(static_cast<size_t>(d.C)), hidden(static_cast<size_t>(se->R));
  for (int64_t n = 0; n < N; ++n) {
    std::fill(total.begin(), total.end(), 0.0);
    for (int64_t r = 0; r < OH; ++r) {
      const float* sum = row_sums + (n * OH + r) * d.C;
      for (int64_t c = 0; c < d.C; ++c) total[c] += sum[c];
    }
    for (int64_t c = 0; c < d.C; ++c) pooled[c] = static_cast<float>(total[c] / static_cast<double>(OH * OW));
    se_fc_gate(*se, pooled.data(), hidden.data(), gates + n * d.C);
  }
  parallel_for(static_cast<int>(tasks), threads, [&](int t) {
    const int64_t n = t / bands, b = t % bands;
    const int64_t oy0 = b * rows, oy1 = std::min(OH, oy0 + rows);
    float* band = full + n * dwo_image + oy0 * OW * d.C;
    const float* g = gates + n * d.C;
    float* p = band;
    for (int64_t i = 0; i < (oy1 - oy0) * OW; ++i, p += d.C)
      for (int64_t c = 0; c < d.C; ++c) p[c] *= g[c];
    const int64_t off = (n * OH + oy0) * OW;
    gemm(pw_proj, GemmArgs{(oy1 - oy0) * OW, band, d.C, y + off * out.C, out.C,
                           residual_ ? x + off * in.C : nullptr, in.C, proj_act}, 1);
  });
  return true;
}

}  // namespace cpu
}  // namespace deprune

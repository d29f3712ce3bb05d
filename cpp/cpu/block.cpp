// Native block driver: shapes through the stages, the reused workspace, and squeeze-excite. The point-wise and
// depth-wise stages are the existing kernels (gemm(), sparse_dwconv2d()), each parallel on the shared pool.
#include "block.h"

#include <algorithm>
#include <cmath>
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

std::string str(int64_t v) { return std::to_string(v); }

std::string dims_str(const BlockDims& d) { return "H=" + str(d.H) + " W=" + str(d.W) + " C=" + str(d.C); }

// Channels per squeeze-excite pooling task: long enough runs of one pixel's channels, enough tasks at batch 1.
constexpr int64_t kPoolChunk = 64;
// Image-by-image execution (see run): at least this many images per thread, and intermediates of at most this size.
constexpr int64_t kImagesPerThread = 2;
constexpr int64_t kImageBytesMax = 16 << 20;

float gate_value(float v, Gate g) {
  if (g == Gate::HardSigmoid) {
    const float t = v + 3.0f;
    return (t > 0.0f ? (t < 6.0f ? t : 6.0f) : 0.0f) * (1.0f / 6.0f);
  }
  return 1.0f / (1.0f + std::exp(-v));
}

}  // namespace

void NativeBlock::Buffer::Free::operator()(float* p) const { std::free(p); }

float* NativeBlock::Buffer::reserve(int64_t n) {
  if (n > size) {
    const size_t bytes = ((static_cast<size_t>(n) * sizeof(float) + 63) / 64) * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    data.reset(static_cast<float*>(p));
    size = n;
  }
  return data.get();
}

void NativeBlock::add_pw(std::unique_ptr<PackedGemm> w, Activation act) {
  if (!w) throw std::invalid_argument("point-wise stage needs packed weights");
  if (!gemm_supports(act))
    throw std::invalid_argument("point-wise stage activation code must be 0-4, got " + str(static_cast<int>(act)));
  order_.push_back({Kind::PW, static_cast<int64_t>(pw_.size())});
  pw_.push_back(std::move(w));
  pw_act_.push_back(act);
}

void NativeBlock::add_dw(BlockDW d) {
  if (d.C < 1) throw std::invalid_argument("depth-wise stage needs C >= 1, got " + str(d.C));
  if (d.kh < 1 || d.kw < 1 || d.kh > 11 || d.kw > 11)
    throw std::invalid_argument("depth-wise kernel must be 1..11 in each dimension, got " + str(d.kh) + "x" +
                                str(d.kw));
  if ((d.sh != 1 && d.sh != 2) || (d.sw != 1 && d.sw != 2))
    throw std::invalid_argument("depth-wise stride must be 1 or 2, got (" + str(d.sh) + ", " + str(d.sw) + ")");
  if (!d.same)
    for (int i = 0; i < 4; ++i) {
      const int32_t lim = i < 2 ? d.kh - 1 : d.kw - 1;
      if (d.pad[i] < 0 || d.pad[i] > lim)
        throw std::invalid_argument("depth-wise padding (top, bottom, left, right) must be in [0, kernel - 1], got " +
                                    str(d.pad[0]) + ", " + str(d.pad[1]) + ", " + str(d.pad[2]) + ", " +
                                    str(d.pad[3]));
    }
  const int64_t taps = static_cast<int64_t>(d.kh) * d.kw;
  const int64_t blocks = (d.C + kChannelBlock - 1) / kChannelBlock;
  auto check_csr = [&](const std::vector<int32_t>& off, const std::vector<int32_t>& idx, int64_t rows,
                       const char* what) {
    if (static_cast<int64_t>(off.size()) != rows + 1)
      throw std::invalid_argument(std::string(what) + "offsets must have " + str(rows + 1) + " entries, got " +
                                  str(static_cast<int64_t>(off.size())));
    if (off[0] != 0 || off[rows] != static_cast<int64_t>(idx.size()))
      throw std::invalid_argument(std::string(what) + "offsets must run from 0 to " +
                                  str(static_cast<int64_t>(idx.size())));
    for (int64_t r = 0; r < rows; ++r)
      if (off[r + 1] < off[r]) throw std::invalid_argument(std::string(what) + "offsets must be non-decreasing");
    for (int32_t t : idx)
      if (t < 0 || t >= taps)
        throw std::invalid_argument(std::string(what) + "taps must be in [0, " + str(taps) + "), got " + str(t));
  };
  check_csr(d.offsets, d.taps, d.C, "");
  check_csr(d.block_offsets, d.block_taps, blocks, "block_");
  if (d.values.size() != d.taps.size())
    throw std::invalid_argument("values must have one weight per tap (" + str(static_cast<int64_t>(d.taps.size())) +
                                "), got " + str(static_cast<int64_t>(d.values.size())));
  if (d.block_values.size() != d.block_taps.size() * kChannelBlock)
    throw std::invalid_argument("block_values must have " +
                                str(static_cast<int64_t>(d.block_taps.size()) * kChannelBlock) + " floats, got " +
                                str(static_cast<int64_t>(d.block_values.size())));
  if (!d.bias.empty() && static_cast<int64_t>(d.bias.size()) != d.C)
    throw std::invalid_argument("depth-wise bias must have C=" + str(d.C) + " floats, got " +
                                str(static_cast<int64_t>(d.bias.size())));
  if (static_cast<int32_t>(d.act) < 0 || static_cast<int32_t>(d.act) >= kNumActivations)
    throw std::invalid_argument("depth-wise activation code must be in [0, " + str(kNumActivations) + "), got " +
                                str(static_cast<int32_t>(d.act)));
  order_.push_back({Kind::DW, static_cast<int64_t>(dw_.size())});
  dw_.push_back(std::move(d));
}

void NativeBlock::add_se(BlockSE se) {
  if (se.C < 1 || se.R < 1)
    throw std::invalid_argument("squeeze-excite needs C >= 1 and R >= 1, got C=" + str(se.C) + " R=" + str(se.R));
  if (static_cast<int64_t>(se.w1.size()) != se.C * se.R || static_cast<int64_t>(se.w2.size()) != se.C * se.R ||
      static_cast<int64_t>(se.b1.size()) != se.R || static_cast<int64_t>(se.b2.size()) != se.C)
    throw std::invalid_argument("squeeze-excite weights must be [R, C], [R], [C, R], [C] with C=" + str(se.C) +
                                " R=" + str(se.R));
  if (static_cast<int32_t>(se.act) < 0 || static_cast<int32_t>(se.act) >= kNumActivations)
    throw std::invalid_argument("squeeze-excite activation code must be in [0, " + str(kNumActivations) + "), got " +
                                str(static_cast<int32_t>(se.act)));
  if (se.gate != Gate::Sigmoid && se.gate != Gate::HardSigmoid)
    throw std::invalid_argument("squeeze-excite gate code must be 0 (sigmoid) or 1 (hard sigmoid), got " +
                                str(static_cast<int32_t>(se.gate)));
  // Stored transposed (w1 as [C, R], w2 as [R, C]) so both products run as row updates the compiler vectorises.
  std::vector<float> t1(se.w1.size()), t2(se.w2.size());
  for (int64_t r = 0; r < se.R; ++r)
    for (int64_t c = 0; c < se.C; ++c) {
      t1[c * se.R + r] = se.w1[r * se.C + c];
      t2[r * se.C + c] = se.w2[c * se.R + r];
    }
  se.w1.swap(t1);
  se.w2.swap(t2);
  order_.push_back({Kind::SE, static_cast<int64_t>(se_.size())});
  se_.push_back(std::move(se));
}

int64_t NativeBlock::in_channels() const {
  if (order_.empty()) return 0;
  const Step& s = order_.front();
  if (s.kind == Kind::PW) return pw_[s.index]->K();
  if (s.kind == Kind::DW) return dw_[s.index].C;
  return se_[s.index].C;
}

void NativeBlock::resolve_pads(const BlockDW& d, const BlockDims& in, int32_t* pads, int64_t* oh, int64_t* ow) const {
  const int64_t sizes[2] = {in.H, in.W}, k[2] = {d.kh, d.kw}, s[2] = {d.sh, d.sw};
  int64_t out[2];
  for (int a = 0; a < 2; ++a) {
    if (d.same) {
      out[a] = (sizes[a] + s[a] - 1) / s[a];
      const int64_t total = std::max<int64_t>((out[a] - 1) * s[a] + k[a] - sizes[a], 0);
      pads[2 * a] = static_cast<int32_t>(total / 2);
      pads[2 * a + 1] = static_cast<int32_t>(total - total / 2);
    } else {
      pads[2 * a] = d.pad[2 * a];
      pads[2 * a + 1] = d.pad[2 * a + 1];
      out[a] = (sizes[a] + pads[2 * a] + pads[2 * a + 1] - k[a]) / s[a] + 1;
      if (sizes[a] + pads[2 * a] + pads[2 * a + 1] < k[a]) out[a] = 0;
    }
  }
  if (out[0] < 1 || out[1] < 1)
    throw std::invalid_argument("input of spatial size " + str(in.H) + "x" + str(in.W) + " is too small for the " +
                                str(d.kh) + "x" + str(d.kw) + " depth-wise conv: output would be " + str(out[0]) +
                                "x" + str(out[1]));
  *oh = out[0];
  *ow = out[1];
}

BlockDims NativeBlock::step_dims(const Step& s, const BlockDims& in) const {
  if (s.kind == Kind::PW) {
    const PackedGemm& w = *pw_[s.index];
    if (in.C != w.K())
      throw std::invalid_argument("point-wise stage expects " + str(w.K()) + " input channels, got " + str(in.C));
    return {in.H, in.W, w.N()};
  }
  if (s.kind == Kind::SE) {
    if (in.C != se_[s.index].C)
      throw std::invalid_argument("squeeze-excite expects " + str(se_[s.index].C) + " channels, got " + str(in.C));
    return in;
  }
  const BlockDW& d = dw_[s.index];
  if (in.C != d.C)
    throw std::invalid_argument("depth-wise stage expects " + str(d.C) + " channels, got " + str(in.C));
  int32_t pads[4];
  int64_t oh, ow;
  resolve_pads(d, in, pads, &oh, &ow);
  return {oh, ow, in.C};
}

BlockDims NativeBlock::out_dims(const BlockDims& in) const {
  if (order_.empty()) throw std::invalid_argument("the block has no stages");
  if (order_.front().kind == Kind::SE || order_.back().kind == Kind::SE)
    throw std::invalid_argument("a block cannot start or end with squeeze-excite (it gates in place)");
  if (in.H < 1 || in.W < 1 || in.C < 1)
    throw std::invalid_argument("input sizes must be >= 1, got " + dims_str(in));
  BlockDims d = in;
  for (const Step& s : order_) d = step_dims(s, d);
  if (residual_ && (d.H != in.H || d.W != in.W || d.C != in.C))
    throw std::invalid_argument("a residual block must keep its input's shape: input " + dims_str(in) + ", output " +
                                dims_str(d));
  return d;
}

namespace {
// out[o] = b[o] + sum_i in[i] * w[i * n_out + o]: one of squeeze-excite's two small fully connected layers.
void fc(const float* in, int64_t n_in, const float* w, const float* b, int64_t n_out, float* out) {
  for (int64_t o = 0; o < n_out; ++o) out[o] = b[o];
  for (int64_t i = 0; i < n_in; ++i) {
    const float v = in[i];
    const float* row = w + i * n_out;
    for (int64_t o = 0; o < n_out; ++o) out[o] += row[o] * v;
  }
}
}  // namespace

void NativeBlock::se_fc_gate(const BlockSE& se, const float* s, float* h, float* g) const {
  fc(s, se.C, se.w1.data(), se.b1.data(), se.R, h);
  for (int64_t r = 0; r < se.R; ++r) h[r] = apply_activation(h[r], se.act);
  fc(h, se.R, se.w2.data(), se.b2.data(), se.C, g);
  for (int64_t c = 0; c < se.C; ++c) g[c] = gate_value(g[c], se.gate);
}

void NativeBlock::run_se(const BlockSE& se, float* x, int64_t N, const BlockDims& d, int threads,
                         Buffer& se_ws) {
  const int64_t C = se.C, R = se.R, P = d.H * d.W;
  float* pooled = se_ws.reserve(N * (2 * C + R));
  float* hidden = pooled + N * C;
  float* gate = hidden + N * R;
  const int64_t chunks = (C + kPoolChunk - 1) / kPoolChunk;
  const int pool_threads = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, N * P * C / 32768)));
  parallel_for(static_cast<int>(N * chunks), pool_threads, [&](int t) {
    const int64_t n = t / chunks, c0 = (t % chunks) * kPoolChunk, nc = std::min(kPoolChunk, C - c0);
    double total[kPoolChunk] = {};
    float row[kPoolChunk];
    const float* xn = x + n * P * C + c0;
    // Per-row partial sums in fp32 (vectorised), rows added in fp64: the mean of 12544 pixels stays exact to fp32.
    for (int64_t y = 0; y < d.H; ++y) {
      for (int64_t j = 0; j < nc; ++j) row[j] = 0.0f;
      for (int64_t xw = 0; xw < d.W; ++xw) {
        const float* p = xn + (y * d.W + xw) * C;
        for (int64_t j = 0; j < nc; ++j) row[j] += p[j];
      }
      for (int64_t j = 0; j < nc; ++j) total[j] += row[j];
    }
    for (int64_t j = 0; j < nc; ++j) pooled[n * C + c0 + j] = static_cast<float>(total[j] / static_cast<double>(P));
  });
  for (int64_t n = 0; n < N; ++n) se_fc_gate(se, pooled + n * C, hidden + n * R, gate + n * C);
  // The gate scales the activation once, in place; rows split into tasks over all images.
  const int64_t rows = N * d.H;
  const int scale_threads = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, N * P * C / 32768)));
  const int64_t tasks = std::min<int64_t>(rows, 4 * scale_threads);
  parallel_for(static_cast<int>(tasks), scale_threads, [&](int t) {
    const int64_t r0 = rows * t / tasks, r1 = rows * (t + 1) / tasks;
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gate + (r / d.H) * C;
      float* p = x + r * d.W * C;
      for (int64_t xw = 0; xw < d.W; ++xw, p += C)
        for (int64_t c = 0; c < C; ++c) p[c] *= g[c];
    }
  });
}

void NativeBlock::run(const float* x, float* y, int64_t N, const BlockDims& in, int num_threads) {
  if (!x || !y) throw std::invalid_argument("block input and output pointers must be non-null");
  if (N < 1) throw std::invalid_argument("batch must be >= 1, got " + str(N));
  if (num_threads < 1) throw std::invalid_argument("threads must be >= 1, got " + str(num_threads));
  out_dims(in);  // checks the whole chain
  std::vector<BlockDims> dims(1, in);
  for (const Step& s : order_) dims.push_back(step_dims(s, dims.back()));
  std::lock_guard<std::mutex> lock(mu_);
  if (run_banded(x, y, N, dims, num_threads)) return;
  const int64_t widest = per_image_floats(dims);
  // Other block shapes (UIR with dw_start / dw_end): batches of at least kImagesPerThread images per thread run image by image, one image per task on one thread:
  // each image's intermediate activations (a few MB at most) stay in that core's caches instead of the whole
  // batch's going through memory between stages (measured in BENCHMARKS.md, 2026-12-04).
  if (num_threads > 1 && N >= kImagesPerThread * num_threads && widest * 4 <= kImageBytesMax) {
    const int64_t in_floats = in.H * in.W * in.C, out_floats = dims.back().H * dims.back().W * dims.back().C;
    parallel_for(static_cast<int>(N), num_threads, [&](int n) {
      thread_local Buffer ws[2], se_ws;
      run_stages(x + n * in_floats, y + n * out_floats, 1, dims, 1, ws, se_ws);
    });
    return;
  }
  run_stages(x, y, N, dims, num_threads, ws_, se_ws_);
}

int64_t NativeBlock::per_image_floats(const std::vector<BlockDims>& dims) const {
  int64_t widest = 1;
  for (size_t i = 1; i + 1 < dims.size(); ++i) widest = std::max(widest, dims[i].H * dims[i].W * dims[i].C);
  return widest;
}

void NativeBlock::run_stages(const float* x, float* y, int64_t N, const std::vector<BlockDims>& dims, int threads,
                             Buffer* ws, Buffer& se_ws) {
  const int64_t steps = stages();
  const BlockDims& in = dims.front();
  const BlockDims& out = dims.back();
  const int64_t widest = N * per_image_floats(dims);
  float* buf[2] = {ws[0].reserve(widest), ws[1].reserve(widest)};
  const float* cur = x;
  int next = 0;
  for (int64_t i = 0; i < steps; ++i) {
    const Step& s = order_[i];
    const BlockDims& din = dims[i];
    const BlockDims& dout = dims[i + 1];
    const bool last = i + 1 == steps;
    if (s.kind == Kind::SE) {  // never first: cur is a workspace buffer
      run_se(se_[s.index], const_cast<float*>(cur), N, din, threads, se_ws);
      continue;
    }
    float* dst = last ? y : buf[next];
    if (s.kind == Kind::PW) {
      const GemmArgs g{N * din.H * din.W, cur, din.C, dst, dout.C, last && residual_ ? x : nullptr, in.C,
                       pw_act_[s.index]};
      gemm(*pw_[s.index], g, threads);
    } else {
      const BlockDW& d = dw_[s.index];
      int32_t pads[4];
      int64_t oh, ow;
      resolve_pads(d, din, pads, &oh, &ow);
      sparse_dwconv2d(
          d.args(DWConvShape{N, d.C, din.H, din.W, oh, ow, d.kh, d.kw, d.sh, d.sw, 1, 1, pads[0], pads[2]}, cur, dst),
          threads);
      if (last && residual_) {
        const int64_t total = N * out.H * out.W * out.C;
        const int64_t tasks = std::min<int64_t>(4 * threads, std::max<int64_t>(1, total / 16384));
        parallel_for(static_cast<int>(tasks), threads, [&](int t) {
          const int64_t b = total * t / tasks, e = total * (t + 1) / tasks;
          for (int64_t j = b; j < e; ++j) dst[j] += x[j];
        });
      }
    }
    cur = dst;
    next ^= 1;
  }
}

}  // namespace cpu
}  // namespace deprune

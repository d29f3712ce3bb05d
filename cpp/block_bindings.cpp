// Python binding of the native block (cpp/cpu/block.h). Weights arrive once as buffers (numpy arrays, torch tensors
// through .numpy()) and are copied in; run() takes data pointers (integers) of NHWC-contiguous fp32 tensors, like
// the depth-wise kernel's bindings. Every size and code is checked with ValueError naming the wrong value.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/block.h"

namespace py = pybind11;
using namespace deprune;

namespace {

// A C-contiguous buffer of `n` elements of T (n < 0: any length) copied into a vector.
template <typename T>
std::vector<T> copy_buffer(const py::buffer& b, const char* what, int64_t n = -1) {
  const py::buffer_info i = b.request();
  const bool is_float = std::is_same<T, float>::value;
  const bool fmt_ok = is_float ? (i.format == "f" || i.format == "<f" || i.format == "=f")
                               : (i.format == "i" || i.format == "<i" || i.format == "=i" || i.format == "l" ||
                                  i.format == "<l" || i.format == "=l");
  if (!fmt_ok || i.itemsize != static_cast<py::ssize_t>(sizeof(T)))
    throw std::invalid_argument(std::string(what) + " must be " + (is_float ? "float32" : "int32") +
                                ", got format '" + i.format + "' (itemsize " + std::to_string(i.itemsize) + ")");
  int64_t count = 1, expect = static_cast<int64_t>(sizeof(T));
  for (py::ssize_t d = i.ndim - 1; d >= 0; --d) {
    if (i.shape[d] > 1 && i.strides[d] != expect)
      throw std::invalid_argument(std::string(what) + " must be C-contiguous");
    expect *= i.shape[d];
    count *= i.shape[d];
  }
  if (n >= 0 && count != n)
    throw std::invalid_argument(std::string(what) + " must have " + std::to_string(n) + " elements, got " +
                                std::to_string(count));
  std::vector<T> v(static_cast<size_t>(count));
  if (count) std::memcpy(v.data(), i.ptr, static_cast<size_t>(count) * sizeof(T));
  return v;
}

Activation act_code(int32_t a, const char* what) {
  if (a < 0 || a >= kNumActivations)
    throw std::invalid_argument(std::string(what) + " activation code must be in [0, " +
                                std::to_string(kNumActivations) + "), got " + std::to_string(a));
  return static_cast<Activation>(a);
}

void add_pw(cpu::NativeBlock& b, const py::buffer& weights, int64_t out_channels, int64_t in_channels,
            const py::object& bias, int32_t activation) {
  if (out_channels < 1 || in_channels < 1)
    throw std::invalid_argument("point-wise stage needs N >= 1 and K >= 1, got N=" + std::to_string(out_channels) +
                                " K=" + std::to_string(in_channels));
  const std::vector<float> w = copy_buffer<float>(weights, "point-wise weights", out_channels * in_channels);
  std::vector<float> bv;
  if (!bias.is_none()) bv = copy_buffer<float>(bias.cast<py::buffer>(), "point-wise bias", out_channels);
  const Activation act = act_code(activation, "point-wise");
  if (!cpu::gemm_supports(act))
    throw std::invalid_argument("point-wise activation code must be 0-4 (identity, relu, relu6, silu, hardswish), got " +
                                std::to_string(activation));
  b.add_pw(std::make_unique<cpu::PackedGemm>(w.data(), out_channels, in_channels, in_channels, 1,
                                             bv.empty() ? nullptr : bv.data()),
           act);
}

void add_dw(cpu::NativeBlock& b, int64_t channels, const py::buffer& offsets, const py::buffer& taps,
            const py::buffer& values, const py::buffer& block_offsets, const py::buffer& block_taps,
            const py::buffer& block_values, const py::object& bias, std::pair<int32_t, int32_t> kernel,
            std::pair<int32_t, int32_t> stride, const std::optional<std::vector<int32_t>>& padding,
            int32_t activation) {
  cpu::BlockDW d{};
  d.C = channels;
  d.kh = kernel.first;
  d.kw = kernel.second;
  d.sh = stride.first;
  d.sw = stride.second;
  d.same = !padding.has_value();
  if (padding) {
    if (padding->size() != 4)
      throw std::invalid_argument("padding must be 4 ints (top, bottom, left, right) or None (TF SAME), got " +
                                  std::to_string(padding->size()) + " values");
    for (int i = 0; i < 4; ++i) d.pad[i] = (*padding)[i];
  }
  d.offsets = copy_buffer<int32_t>(offsets, "offsets");
  d.taps = copy_buffer<int32_t>(taps, "taps");
  d.values = copy_buffer<float>(values, "values");
  d.block_offsets = copy_buffer<int32_t>(block_offsets, "block_offsets");
  d.block_taps = copy_buffer<int32_t>(block_taps, "block_taps");
  d.block_values = copy_buffer<float>(block_values, "block_values");
  if (!bias.is_none()) d.bias = copy_buffer<float>(bias.cast<py::buffer>(), "depth-wise bias", channels);
  d.act = act_code(activation, "depth-wise");
  b.add_dw(std::move(d));
}

void add_se(cpu::NativeBlock& b, int64_t channels, int64_t reduced, const py::buffer& w1, const py::buffer& b1,
            const py::buffer& w2, const py::buffer& b2, int32_t activation, int32_t gate) {
  if (channels < 1 || reduced < 1)
    throw std::invalid_argument("squeeze-excite needs C >= 1 and R >= 1, got C=" + std::to_string(channels) +
                                " R=" + std::to_string(reduced));
  cpu::BlockSE se{};
  se.C = channels;
  se.R = reduced;
  se.w1 = copy_buffer<float>(w1, "squeeze-excite reduce weight", channels * reduced);
  se.b1 = copy_buffer<float>(b1, "squeeze-excite reduce bias", reduced);
  se.w2 = copy_buffer<float>(w2, "squeeze-excite expand weight", channels * reduced);
  se.b2 = copy_buffer<float>(b2, "squeeze-excite expand bias", channels);
  se.act = act_code(activation, "squeeze-excite");
  if (gate != 0 && gate != 1)
    throw std::invalid_argument("gate code must be 0 (sigmoid) or 1 (hard sigmoid), got " + std::to_string(gate));
  se.gate = static_cast<cpu::Gate>(gate);
  b.add_se(std::move(se));
}

py::tuple out_shape(const cpu::NativeBlock& b, int64_t N, int64_t H, int64_t W, int64_t C) {
  if (N < 1) throw std::invalid_argument("batch must be >= 1, got " + std::to_string(N));
  if (C != b.in_channels())
    throw std::invalid_argument("input has " + std::to_string(C) + " channels, the block expects " +
                                std::to_string(b.in_channels()));
  const cpu::BlockDims d = b.out_dims({H, W, C});
  return py::make_tuple(N, d.H, d.W, d.C);
}

void run(cpu::NativeBlock& b, std::uintptr_t x, std::uintptr_t y, int64_t N, int64_t H, int64_t W, int64_t C,
         int32_t threads) {
  if (C != b.in_channels())
    throw std::invalid_argument("input has " + std::to_string(C) + " channels, the block expects " +
                                std::to_string(b.in_channels()));
  py::gil_scoped_release release;
  b.run(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y), N, {H, W, C}, threads);
}

}  // namespace

void bind_block(py::module_& m) {
  py::class_<cpu::NativeBlock>(m, "NativeBlock",
                               "A whole depth-wise separable block run natively in NHWC fp32: point-wise, sparse"
                               " depth-wise and squeeze-excite stages in order, the input added at the end when"
                               " residual; weights copied in once, workspace kept and reused.")
      .def(py::init<>())
      .def("add_pw", &add_pw, py::arg("weights"), py::arg("out_channels"), py::arg("in_channels"),
           py::arg("bias") = py::none(), py::arg("activation") = 0,
           "weights: float32 [out, in] C-contiguous; bias [out] or None; activation code 0-4.")
      .def("add_dw", &add_dw, py::arg("channels"), py::arg("offsets"), py::arg("taps"), py::arg("values"),
           py::arg("block_offsets"), py::arg("block_taps"), py::arg("block_values"), py::arg("bias"),
           py::arg("kernel"), py::arg("stride"), py::arg("padding"), py::arg("activation"),
           "A SparseDWPlan's six tensors; padding (top, bottom, left, right) or None for TF SAME.")
      .def("add_se", &add_se, py::arg("channels"), py::arg("reduced"), py::arg("w1"), py::arg("b1"), py::arg("w2"),
           py::arg("b2"), py::arg("activation"), py::arg("gate"),
           "w1 [R, C], b1 [R], w2 [C, R], b2 [C]; gate 0 = sigmoid, 1 = hard sigmoid.")
      .def_property("residual", &cpu::NativeBlock::residual, &cpu::NativeBlock::set_residual)
      .def_property_readonly("stages", &cpu::NativeBlock::stages)
      .def_property_readonly("in_channels", &cpu::NativeBlock::in_channels)
      .def_property_readonly("workspace_floats", &cpu::NativeBlock::workspace_floats)
      .def("out_shape", &out_shape, py::arg("N"), py::arg("H"), py::arg("W"), py::arg("C"),
           "(N, OH, OW, OC) for an NHWC input of these sizes; ValueError when the block cannot take it.")
      .def("run", &run, py::arg("x"), py::arg("y"), py::arg("N"), py::arg("H"), py::arg("W"), py::arg("C"),
           py::arg("threads"),
           "x, y: data_ptr() of NHWC-contiguous float32 tensors (y of out_shape, not overlapping x); releases the"
           " GIL.")
      .def("__repr__", [](const cpu::NativeBlock& b) {
        return "NativeBlock(stages=" + std::to_string(b.stages()) + ", in_channels=" + std::to_string(b.in_channels()) +
               ", residual=" + (b.residual() ? "True" : "False") + ")";
      });
}

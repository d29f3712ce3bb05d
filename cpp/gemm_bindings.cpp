// Python binding of the packed point-wise GEMM (cpp/cpu/gemm.h): numpy-compatible buffers (the buffer protocol:
// numpy arrays, torch tensors through .numpy()), every shape, dtype and stride checked here with ValueError
// naming the wrong value.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/gemm.h"

namespace py = pybind11;
using namespace deprune;

namespace {

std::string shape_str(const py::buffer_info& b) {
  std::string s = "(";
  for (size_t i = 0; i < b.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(b.shape[i]);
  return s + (b.shape.size() == 1 ? ",)" : ")");
}

void check_f32(const py::buffer_info& b, const char* what) {
  if (b.itemsize != 4 || (b.format != "f" && b.format != "<f" && b.format != "=f"))
    throw std::invalid_argument(std::string(what) + " must be float32, got format '" + b.format + "' (itemsize " +
                                std::to_string(b.itemsize) + ")");
}

// A float32 matrix view [rows, cols] of a 2-D buffer or of a C-contiguous N-D buffer (NHWC: rows = N*H*W):
// elements along a row contiguous, rows at a positive stride (in floats) >= cols.
struct Matrix {
  float* data;
  int64_t rows, cols, ld;
  uintptr_t begin, end;  // bytes the view spans, for the overlap check
};

Matrix matrix(const py::buffer_info& b, const char* what) {
  check_f32(b, what);
  if (b.ndim < 2)
    throw std::invalid_argument(std::string(what) + " must be 2-D [rows, channels] or N-D channels-last, got shape " +
                                shape_str(b));
  const int64_t cols = b.shape[b.ndim - 1];
  if (cols > 1 && b.strides[b.ndim - 1] != 4)
    throw std::invalid_argument(std::string(what) + " must be contiguous along its last (channel) axis, got stride " +
                                std::to_string(b.strides[b.ndim - 1]) + " bytes");
  int64_t rows = 1;
  for (int d = 0; d < b.ndim - 1; ++d) rows *= b.shape[d];
  int64_t ld = cols;
  if (b.ndim == 2) {
    if (rows > 1) {
      if (b.strides[0] % 4 != 0 || b.strides[0] < 4 * cols)
        throw std::invalid_argument(std::string(what) + " row stride must be a positive multiple of 4 bytes and >= " +
                                    std::to_string(4 * cols) + " bytes (its channels), got " +
                                    std::to_string(b.strides[0]));
      ld = b.strides[0] / 4;
    }
  } else {
    int64_t expect = 4 * cols;
    for (int d = b.ndim - 2; d >= 0; --d) {
      if (b.shape[d] > 1 && b.strides[d] != expect)
        throw std::invalid_argument(std::string(what) + " with " + std::to_string(b.ndim) +
                                    " dims must be C-contiguous (channels-last), got strides in bytes at axis " +
                                    std::to_string(d) + ": " + std::to_string(b.strides[d]) + ", expected " +
                                    std::to_string(expect));
      expect *= b.shape[d];
    }
  }
  const uintptr_t begin = reinterpret_cast<uintptr_t>(b.ptr);
  const uintptr_t end = rows * cols == 0 ? begin : begin + 4 * ((rows - 1) * ld + cols);
  return Matrix{static_cast<float*>(b.ptr), rows, cols, ld, begin, end};
}

Activation activation(const py::object& a) {
  if (py::isinstance<py::str>(a)) {
    const std::string s = a.cast<std::string>();
    if (s == "none" || s == "identity") return Activation::Identity;
    if (s == "relu") return Activation::ReLU;
    if (s == "relu6") return Activation::ReLU6;
    if (s == "silu" || s == "swish") return Activation::SiLU;
    if (s == "hardswish" || s == "hard_swish") return Activation::HardSwish;
    throw std::invalid_argument("activation must be one of none, relu, relu6, silu, hardswish, got '" + s + "'");
  }
  if (py::isinstance<py::bool_>(a) || !py::isinstance<py::int_>(a))
    throw std::invalid_argument("activation must be a name or an int code 0-4, got " +
                                std::string(py::str(py::type::of(a).attr("__name__"))));
  const int64_t code = a.cast<int64_t>();
  if (code < 0 || code >= kNumActivations || !cpu::gemm_supports(static_cast<Activation>(code)))
    throw std::invalid_argument("activation code must be 0-4 (identity, relu, relu6, silu, hardswish), got " +
                                std::to_string(code));
  return static_cast<Activation>(code);
}

std::unique_ptr<cpu::PackedGemm> pack(const py::buffer& weights, const py::object& bias, const std::string& layout) {
  const py::buffer_info w = weights.request();
  check_f32(w, "weights");
  bool ok = w.ndim == 2 || (w.ndim == 4 && w.shape[2] == 1 && w.shape[3] == 1);
  if (!ok)
    throw std::invalid_argument("weights must be 2-D [N, K] / [K, N] or a 1x1 conv weight [N, K, 1, 1], got shape " +
                                shape_str(w));
  if (layout != "nk" && layout != "kn")
    throw std::invalid_argument("layout must be 'nk' ([out, in], a conv weight) or 'kn' ([in, out]), got '" + layout +
                                "'");
  if (w.ndim == 4 && layout != "nk")
    throw std::invalid_argument("a 4-D conv weight [N, K, 1, 1] is 'nk', got layout '" + layout + "'");
  const bool nk = layout == "nk";
  const int64_t N = nk ? w.shape[0] : w.shape[1], K = nk ? w.shape[1] : w.shape[0];
  if (N < 1 || K < 1) throw std::invalid_argument("weights must be non-empty, got shape " + shape_str(w));
  for (int d = 0; d < 2; ++d)
    if (w.strides[d] % 4 != 0 || w.strides[d] < 0)
      throw std::invalid_argument("weights strides must be non-negative multiples of 4 bytes, got " +
                                  std::to_string(w.strides[d]) + " at axis " + std::to_string(d));
  const int64_t s0 = w.strides[0] / 4, s1 = w.strides[1] / 4;
  std::vector<float> b;
  if (!bias.is_none()) {
    const py::buffer_info bi = bias.cast<py::buffer>().request();
    check_f32(bi, "bias");
    if (bi.ndim != 1 || bi.shape[0] != N)
      throw std::invalid_argument("bias must have shape (" + std::to_string(N) + ",) (the output channels), got " +
                                  shape_str(bi));
    b.resize(N);
    const char* p = static_cast<const char*>(bi.ptr);
    for (int64_t i = 0; i < N; ++i) b[i] = *reinterpret_cast<const float*>(p + i * bi.strides[0]);
  }
  return std::make_unique<cpu::PackedGemm>(static_cast<const float*>(w.ptr), N, K, nk ? s0 : s1, nk ? s1 : s0,
                                           b.empty() ? nullptr : b.data());
}

bool overlaps(const Matrix& x, const Matrix& y) { return x.begin < y.end && y.begin < x.end; }

void run(const cpu::PackedGemm& w, const py::buffer& input, const py::buffer& output, const py::object& act,
         const py::object& residual, int threads) {
  const Activation a = activation(act);
  if (threads < 1) throw std::invalid_argument("threads must be >= 1, got " + std::to_string(threads));
  const py::buffer_info bi = input.request();
  const py::buffer_info bo = output.request();
  if (bo.readonly) throw std::invalid_argument("output must be writable");
  const Matrix x = matrix(bi, "input"), y = matrix(bo, "output");
  if (x.cols != w.K())
    throw std::invalid_argument("input must have K=" + std::to_string(w.K()) + " channels (last axis), got shape " +
                                shape_str(bi));
  if (y.cols != w.N() || y.rows != x.rows)
    throw std::invalid_argument("output must have " + std::to_string(x.rows) + " rows of N=" + std::to_string(w.N()) +
                                " channels, got shape " + shape_str(bo));
  if (overlaps(x, y)) throw std::invalid_argument("output must not overlap the input");
  Matrix r{nullptr, 0, 0, 0, 0, 0};
  py::buffer_info br;
  if (!residual.is_none()) {
    br = residual.cast<py::buffer>().request();
    r = matrix(br, "residual");
    if (r.rows != y.rows || r.cols != y.cols)
      throw std::invalid_argument("residual must have the output's " + std::to_string(y.rows) + " rows of " +
                                  std::to_string(y.cols) + " channels, got shape " + shape_str(br));
    if (overlaps(r, y)) throw std::invalid_argument("output must not overlap the residual");
  }
  const cpu::GemmArgs args{x.rows, x.data, x.ld, y.data, y.ld, r.data, r.ld, a};
  py::gil_scoped_release release;
  cpu::gemm(w, args, threads);
}

}  // namespace

void bind_gemm(py::module_& m) {
  m.def("gemm_isa", [] { return std::string(cpu::gemm_isa()); },
        "Instruction set of the point-wise GEMM: the CPU kernels' when forced (DEPRUNE_CPU_ISA, set_cpu_isa),"
        " otherwise AVX-512 where the CPU has it.");
  py::class_<cpu::PackedGemm>(m, "PackedGemm",
                              "Point-wise (1x1) conv weights packed once for the native SGEMM: run() computes"
                              " output = act(input @ W.T + bias) + residual on channels-last rows.")
      .def(py::init(&pack), py::arg("weights"), py::arg("bias") = py::none(), py::arg("layout") = "nk",
           "weights: float32 [N, K] ('nk', a conv weight; also [N, K, 1, 1]) or [K, N] ('kn'); bias: [N] or None.")
      .def("run", &run, py::arg("input"), py::arg("output"), py::arg("activation") = 0,
           py::arg("residual") = py::none(), py::arg("threads") = 1,
           "input [M, K] (rows at any stride) or C-contiguous [..., K]; output and residual [M, N] likewise;"
           " activation: none/relu/relu6/silu/hardswish or code 0-4; releases the GIL.")
      .def_property_readonly("N", &cpu::PackedGemm::N)
      .def_property_readonly("K", &cpu::PackedGemm::K)
      .def("__repr__", [](const cpu::PackedGemm& w) {
        return "PackedGemm(N=" + std::to_string(w.N()) + ", K=" + std::to_string(w.K()) + ")";
      });
}

// Python bindings of the torch-free kernels: tensors cross as raw data pointers (integers) plus sizes.
// All shape/dtype validation happens in timm_deprune/kernels/ (launch.py, op.py); these entry points re-check what could crash.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "cpu/dwconv_cpu.h"
#include "cpu/parallel.h"
#include "cuda/dwconv_cuda.h"
#include "deprune/dwconv.h"

namespace py = pybind11;
using namespace deprune;

void bind_gemm(py::module_& m);   // gemm_bindings.cpp: the packed point-wise GEMM
void bind_block(py::module_& m);  // block_bindings.cpp: a whole depth-wise separable block

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

DWConvShape make_shape(int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW, int32_t kh, int32_t kw,
                       int32_t sh, int32_t sw, int32_t dil_h, int32_t dil_w, int32_t pt, int32_t pl) {
  if (N < 1 || C < 1 || H < 1 || W < 1 || OH < 1 || OW < 1)
    throw std::invalid_argument("sizes must be >= 1, got N=" + std::to_string(N) + " C=" + std::to_string(C) +
                                " H=" + std::to_string(H) + " W=" + std::to_string(W) + " OH=" +
                                std::to_string(OH) + " OW=" + std::to_string(OW));
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || dil_h < 1 || dil_w < 1 || pt < 0 || pl < 0)
    throw std::invalid_argument("kernel/stride/dilation must be >= 1 and padding >= 0");
  return DWConvShape{N, C, H, W, OH, OW, kh, kw, sh, sw, dil_h, dil_w, pt, pl};
}

Activation make_act(int32_t a) {
  if (a < 0 || a >= kNumActivations)
    throw std::invalid_argument("activation code must be in [0, " + std::to_string(kNumActivations) + "), got " +
                                std::to_string(a));
  return static_cast<Activation>(a);
}

Layout make_layout(int32_t l) {
  if (l != 0 && l != 1) throw std::invalid_argument("layout must be 0 (NCHW) or 1 (NHWC), got " + std::to_string(l));
  return static_cast<Layout>(l);
}

// One launch's geometry, epilogue and layout: built (and checked) once per input geometry in Python, then passed
// by reference to every launch of it instead of ~16 positional ints.
struct Launch {
  DWConvShape shape;
  Activation act;
  Layout layout;
};

Launch make_launch(int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW, int32_t kh, int32_t kw,
                   std::pair<int32_t, int32_t> stride, std::pair<int32_t, int32_t> dilation, int32_t pad_top,
                   int32_t pad_left, int32_t activation, int32_t layout) {
  return Launch{make_shape(N, C, H, W, OH, OW, kh, kw, stride.first, stride.second, dilation.first, dilation.second,
                           pad_top, pad_left),
                make_act(activation), make_layout(layout)};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "timm_deprune native kernels (torch-free): sparse depth-wise convolution on CPU and CUDA";

  py::class_<Launch>(m, "Launch",
                     "One launch's geometry (sizes, kernel, stride, dilation, top/left padding), epilogue and layout,"
                     " checked when built.")
      .def(py::init(&make_launch), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("OH"),
           py::arg("OW"), py::arg("kh"), py::arg("kw"), py::arg("stride"), py::arg("dilation"), py::arg("pad_top"),
           py::arg("pad_left"), py::arg("activation"), py::arg("layout"))
      .def_property_readonly("shape", [](const Launch& l) {
        const DWConvShape& s = l.shape;
        return py::make_tuple(s.N, s.C, s.H, s.W, s.OH, s.OW);
      })
      .def("__repr__", [](const Launch& l) {
        const DWConvShape& s = l.shape;
        return "Launch(N=" + std::to_string(s.N) + ", C=" + std::to_string(s.C) + ", H=" + std::to_string(s.H) +
               ", W=" + std::to_string(s.W) + ", OH=" + std::to_string(s.OH) + ", OW=" + std::to_string(s.OW) +
               ", kernel=" + std::to_string(s.kh) + "x" + std::to_string(s.kw) + ", stride=(" +
               std::to_string(s.stride_h) + ", " + std::to_string(s.stride_w) + "), dilation=(" +
               std::to_string(s.dil_h) + ", " + std::to_string(s.dil_w) + "), pad_top=" + std::to_string(s.pad_top) +
               ", pad_left=" + std::to_string(s.pad_left) + ", activation=" + std::to_string(int(l.act)) +
               ", layout=" + std::to_string(int(l.layout)) + ")";
      });

  m.def(
      "dwconv2d_cpu",
      [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t offsets, std::uintptr_t taps, std::uintptr_t weights,
         std::uintptr_t block_offsets, std::uintptr_t block_taps, std::uintptr_t block_weights, std::uintptr_t bias,
         const Launch& launch, int32_t num_threads) {
        cpu::DWConvArgs a{};
        a.shape = launch.shape;
        a.taps = SparseTaps{ptr<const int32_t>(offsets), ptr<const int32_t>(taps), ptr<const float>(weights)};
        a.block = BlockTaps{ptr<const int32_t>(block_offsets), ptr<const int32_t>(block_taps),
                            ptr<const float>(block_weights)};
        a.bias = ptr<const float>(bias);
        a.act = launch.act;
        a.layout = launch.layout;
        a.x = ptr<const float>(x);
        a.y = ptr<float>(y);
        if (!a.x || !a.y || !a.taps.offsets) throw std::invalid_argument("null data pointer");
        if (a.layout == Layout::NHWC && !a.block.offsets)
          throw std::invalid_argument("channels_last needs the plan's block taps");
        py::gil_scoped_release release;
        cpu::sparse_dwconv2d(a, num_threads < 1 ? 1 : num_threads);
      },
      py::arg("x"), py::arg("y"), py::arg("offsets"), py::arg("taps"), py::arg("weights"), py::arg("block_offsets"),
      py::arg("block_taps"), py::arg("block_weights"), py::arg("bias"), py::arg("launch"), py::arg("num_threads"),
      "Sparse depth-wise conv on the CPU (fp32, NCHW or NHWC contiguous); pointers are data_ptr() integers.");

  m.def(
      "dwconv2d_cuda",
      [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t offsets, std::uintptr_t taps, std::uintptr_t weights,
         std::uintptr_t block_offsets, std::uintptr_t block_taps, std::uintptr_t block_weights, std::uintptr_t bias,
         const Launch& launch, int32_t dtype, int32_t device, std::uintptr_t stream) {
        if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0, 1 or 2");
        SparseTaps t{ptr<const int32_t>(offsets), ptr<const int32_t>(taps), ptr<const float>(weights)};
        BlockTaps b{ptr<const int32_t>(block_offsets), ptr<const int32_t>(block_taps), ptr<const float>(block_weights)};
        cuda::sparse_dwconv2d(launch.shape, t, b, ptr<const float>(bias), launch.act, static_cast<DType>(dtype),
                              launch.layout, ptr<const void>(x), ptr<void>(y), device, stream);
      },
      py::arg("x"), py::arg("y"), py::arg("offsets"), py::arg("taps"), py::arg("weights"), py::arg("block_offsets"),
      py::arg("block_taps"), py::arg("block_weights"), py::arg("bias"), py::arg("launch"), py::arg("dtype"),
      py::arg("device"), py::arg("stream"),
      "Sparse depth-wise conv on a CUDA device; pointers are device data_ptr() integers, stream a cudaStream_t."
      " NCHW reads the per-channel taps, channels_last the block taps.");

  m.def(
      "dwconv2d_cuda_emulate",
      [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t offsets, std::uintptr_t taps, std::uintptr_t weights,
         std::uintptr_t block_offsets, std::uintptr_t block_taps, std::uintptr_t block_weights, std::uintptr_t bias,
         const Launch& launch, int32_t dtype, int32_t sms) {
        if (dtype < 0 || dtype > 2)
          throw std::invalid_argument("dtype code must be 0, 1 or 2, got " + std::to_string(dtype));
        if (sms < 1) throw std::invalid_argument("sms must be >= 1, got " + std::to_string(sms));
        SparseTaps t{ptr<const int32_t>(offsets), ptr<const int32_t>(taps), ptr<const float>(weights)};
        BlockTaps b{ptr<const int32_t>(block_offsets), ptr<const int32_t>(block_taps), ptr<const float>(block_weights)};
        py::gil_scoped_release release;
        sparse_dwconv2d_emulate_cuda(launch.shape, t, b, ptr<const float>(bias), launch.act, static_cast<DType>(dtype),
                                     launch.layout, ptr<const void>(x), ptr<void>(y), sms);
      },
      py::arg("x"), py::arg("y"), py::arg("offsets"), py::arg("taps"), py::arg("weights"), py::arg("block_offsets"),
      py::arg("block_taps"), py::arg("block_weights"), py::arg("bias"), py::arg("launch"), py::arg("dtype") = 0,
      py::arg("sms") = 132,
      "Runs the CUDA kernels' block programs on the host, launch by launch and block by block (host pointers; x / y"
      " fp32, fp16 or bf16 by dtype code 0 / 1 / 2; `sms` stands for the device's multiprocessor count, which sets"
      " the channels_last geometry): tests their index math, barriers and grid split.");

  m.def("cuda_compiled", &cuda::compiled, "True when built with the CUDA kernels.");
  m.def("cuda_device_count", &cuda::device_count, "Visible CUDA devices as seen by the extension's runtime.");
  m.def("cpu_isa", [] { return std::string(cpu::isa()); }, "Instruction set the CPU kernels dispatch to.");
  m.def("set_cpu_isa", [](const std::string& name) { cpu::set_isa(name.c_str()); },
        "Force the CPU kernels' instruction set (avx512, avx2, generic); raises if this CPU lacks it.");
  m.def("cpu_isa_supported", [](const std::string& name) { return cpu::isa_supported(name.c_str()); },
        "Whether this CPU can run the named instruction set.");
  m.def("has_openmp", &cpu::has_openmp, "Whether the CPU kernels were built with OpenMP (multi-threaded).");
  m.attr("CHANNEL_BLOCK") = kChannelBlock;
  bind_gemm(m);
  bind_block(m);
}

// Python bindings of the torch-free kernels: tensors cross as raw data pointers (integers) plus sizes.
// All shape/dtype validation happens in timm_deprune/kernels/ (launch.py, op.py); these entry points re-check what could crash.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/dwconv_cpu.h"
#include "cpu/parallel.h"
#include "cuda/dwconv_cuda.h"
#include "deprune/dwconv.h"

namespace py = pybind11;
using namespace deprune;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

DWConvShape make_shape(int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW, int32_t kh, int32_t kw,
                       int32_t sh, int32_t sw, int32_t dh, int32_t dw, int32_t pt, int32_t pl) {
  if (N < 1 || C < 1 || H < 1 || W < 1 || OH < 1 || OW < 1)
    throw std::invalid_argument("sizes must be >= 1, got N=" + std::to_string(N) + " C=" + std::to_string(C) +
                                " H=" + std::to_string(H) + " W=" + std::to_string(W) + " OH=" +
                                std::to_string(OH) + " OW=" + std::to_string(OW));
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || pt < 0 || pl < 0)
    throw std::invalid_argument("kernel/stride/dilation must be >= 1 and padding >= 0");
  return DWConvShape{N, C, H, W, OH, OW, kh, kw, sh, sw, dh, dw, pt, pl};
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "timm_deprune native kernels (torch-free): sparse depth-wise convolution on CPU and CUDA";

  m.def(
      "dwconv2d_cpu",
      [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t offsets, std::uintptr_t taps, std::uintptr_t weights,
         std::uintptr_t block_offsets, std::uintptr_t block_taps, std::uintptr_t block_weights, std::uintptr_t bias,
         int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW, int32_t kh, int32_t kw, int32_t sh,
         int32_t sw, int32_t dh, int32_t dw, int32_t pt, int32_t pl, int32_t act, int32_t layout,
         int32_t num_threads) {
        cpu::DWConvArgs a{};
        a.shape = make_shape(N, C, H, W, OH, OW, kh, kw, sh, sw, dh, dw, pt, pl);
        a.taps = SparseTaps{ptr<const int32_t>(offsets), ptr<const int32_t>(taps), ptr<const float>(weights)};
        a.block = BlockTaps{ptr<const int32_t>(block_offsets), ptr<const int32_t>(block_taps),
                            ptr<const float>(block_weights)};
        a.bias = ptr<const float>(bias);
        a.act = make_act(act);
        a.layout = make_layout(layout);
        a.x = ptr<const float>(x);
        a.y = ptr<float>(y);
        if (!a.x || !a.y || !a.taps.offsets) throw std::invalid_argument("null data pointer");
        if (a.layout == Layout::NHWC && !a.block.offsets)
          throw std::invalid_argument("channels_last needs the plan's block taps");
        py::gil_scoped_release release;
        cpu::sparse_dwconv2d(a, num_threads < 1 ? 1 : num_threads);
      },
      "Sparse depth-wise conv on the CPU (fp32, NCHW or NHWC contiguous); pointers are data_ptr() integers.");

  m.def(
      "dwconv2d_cuda",
      [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t offsets, std::uintptr_t taps, std::uintptr_t weights,
         std::uintptr_t bias, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW, int32_t kh,
         int32_t kw, int32_t sh, int32_t sw, int32_t dh, int32_t dw, int32_t pt, int32_t pl, int32_t act,
         int32_t dtype, int32_t layout, int32_t device, std::uintptr_t stream) {
        DWConvShape s = make_shape(N, C, H, W, OH, OW, kh, kw, sh, sw, dh, dw, pt, pl);
        if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0, 1 or 2");
        SparseTaps t{ptr<const int32_t>(offsets), ptr<const int32_t>(taps), ptr<const float>(weights)};
        cuda::sparse_dwconv2d(s, t, ptr<const float>(bias), make_act(act), static_cast<DType>(dtype),
                              make_layout(layout), ptr<const void>(x), ptr<void>(y), device, stream);
      },
      "Sparse depth-wise conv on a CUDA device; pointers are device data_ptr() integers, stream a cudaStream_t.");

  m.def(
      "dwconv2d_cuda_emulate",
      [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t offsets, std::uintptr_t taps, std::uintptr_t weights,
         std::uintptr_t bias, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW, int32_t kh,
         int32_t kw, int32_t sh, int32_t sw, int32_t dh, int32_t dw, int32_t pt, int32_t pl, int32_t act,
         int32_t layout) {
        DWConvShape s = make_shape(N, C, H, W, OH, OW, kh, kw, sh, sw, dh, dw, pt, pl);
        SparseTaps t{ptr<const int32_t>(offsets), ptr<const int32_t>(taps), ptr<const float>(weights)};
        py::gil_scoped_release release;
        sparse_dwconv2d_emulate_cuda(s, t, ptr<const float>(bias), make_act(act), make_layout(layout),
                                     ptr<const float>(x), ptr<float>(y));
      },
      "Runs the CUDA kernel's per-thread body on the host, block by block (fp32, host pointers): tests its index math.");

  m.def("cuda_compiled", &cuda::compiled, "True when built with the CUDA kernels.");
  m.def("cuda_device_count", &cuda::device_count, "Visible CUDA devices as seen by the extension's runtime.");
  m.def("cpu_isa", [] { return std::string(cpu::isa()); }, "Instruction set the CPU kernels dispatch to.");
  m.def("set_cpu_isa", [](const std::string& name) { cpu::set_isa(name.c_str()); },
        "Force the CPU kernels' instruction set (avx512, avx2, generic); raises if this CPU lacks it.");
  m.def("cpu_isa_supported", [](const std::string& name) { return cpu::isa_supported(name.c_str()); },
        "Whether this CPU can run the named instruction set.");
  m.def("has_openmp", &cpu::has_openmp, "Whether the CPU kernels were built with OpenMP (multi-threaded).");
  m.attr("CHANNEL_BLOCK") = kChannelBlock;
}

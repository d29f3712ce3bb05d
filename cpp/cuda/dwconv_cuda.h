// CUDA backend of the sparse depth-wise conv, and its CPU emulation (the same per-thread body run block by
// block, phase by phase on the host, so the kernel's index math is tested on machines without a GPU).
#pragma once

#include <cstdint>

#include "deprune/dwconv.h"

namespace deprune {
namespace cuda {

// True when the module was compiled with the CUDA kernels.
bool compiled();
// Number of visible CUDA devices (0 when not compiled or no driver); never throws.
int device_count();

// y = act(sparse_dwconv(x) + bias) on `device`, enqueued on `stream` (a cudaStream_t as an integer, 0 = default).
// All pointers are device pointers; x and y have `layout` and `dtype`; weights / bias are fp32, indices int32.
// NCHW reads the per-channel `taps`, channels_last the per-channel-block `block` taps.
// Throws std::runtime_error on a launch error or when not compiled with CUDA.
void sparse_dwconv2d(const DWConvShape& shape, const SparseTaps& taps, const BlockTaps& block, const float* bias,
                     Activation act, DType dtype, Layout layout, const void* x, void* y, int device,
                     std::uintptr_t stream);

}  // namespace cuda

// Host emulation of the CUDA kernel (host pointers; x / y of `dtype`): walks the same launches and runs the same
// block programs (dwconv_block.h run_block, dwconv_cl.h run_cl_block) as the GPU, block by block. `sms` stands for
// the device's multiprocessor count, from which the channels_last geometry is chosen.
void sparse_dwconv2d_emulate_cuda(const DWConvShape& shape, const SparseTaps& taps, const BlockTaps& block,
                                  const float* bias, Activation act, DType dtype, Layout layout, const void* x,
                                  void* y, int sms);

}  // namespace deprune

// Element access of x / y for the CUDA kernel and its host emulation: fp32, fp16 and bf16, all converted to fp32
// for accumulation. On the device the conversions are the CUDA intrinsics; on the host (the emulation) they are
// bit-exact software versions of the same round-to-nearest-even conversions, so an emulated fp16 / bf16 run
// stores exactly the bits the GPU would.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "deprune/dwconv.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace deprune {
namespace cuda_block {

// --- host reference conversions (round to nearest even, like __float2half_rn / __float2bfloat16_rn) -------------
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // quiet NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a half subnormal (or zero); |f| * 2^24 is exact, round it to even
    const float scaled = bits_to_float(ax) * 16777216.0f;
    uint32_t m = static_cast<uint32_t>(scaled);
    const float rest = scaled - static_cast<float>(m);
    if (rest > 0.5f || (rest == 0.5f && (m & 1u))) ++m;
    return static_cast<uint16_t>(sign | m);  // m == 1024 is the smallest normal, as it should be
  }
  uint32_t h = (ax >> 13) - (112u << 10);  // rebias the exponent 127 -> 15, keep the top 10 mantissa bits
  const uint32_t rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is the right result
  return static_cast<uint16_t>(sign | h);
}

inline float bf16_bits_to_float(uint16_t b) { return bits_to_float(uint32_t{b} << 16); }

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Both CUDA programs stage tap displacements as int16: the kernel's extent and padding must fit.
inline void check_int16_displacements(const DWConvShape& s) {
  if ((s.kh - 1) * int64_t{s.dil_h} + s.pad_top > 32767 || (s.kw - 1) * int64_t{s.dil_w} + s.pad_left > 32767 ||
      s.pad_top > 32767 || s.pad_left > 32767)
    throw std::invalid_argument("sparse_dwconv2d (CUDA): kernel extent or padding above 32767");
}

// Whether w is -0.0f: how a plan's block weights mark a lane whose channel pruned the tap (kernels/plan.py).
DEPRUNE_HD bool pruned_lane(float w) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(w) == 0x80000000u;
#else
  return float_to_bits(w) == 0x80000000u;
#endif
}

// --- IO policies: load element i of x as fp32, store fp32 v as element i of y ---------------------------------
// Loads go through a __restrict__ const pointer, so the device compiler may use the read-only data path.
struct IOFloat {
  static DEPRUNE_HD float load(const void* __restrict__ base, int64_t i) {
    return static_cast<const float*>(base)[i];
  }
  static DEPRUNE_HD void store(void* __restrict__ base, int64_t i, float v) { static_cast<float*>(base)[i] = v; }
  // Eight consecutive elements i..i+7 (i * 4 bytes 16-byte aligned on the device: two 16-byte loads / stores).
  static DEPRUNE_HD void load8(const void* __restrict__ base, int64_t i, float* v) {
#if defined(__CUDA_ARCH__)
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
    const float4 a = __ldg(q), b = __ldg(q + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
#else
    for (int c = 0; c < 8; ++c) v[c] = load(base, i + c);
#endif
  }
  static DEPRUNE_HD void store8(void* __restrict__ base, int64_t i, const float* v) {
#if defined(__CUDA_ARCH__)
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(base) + i);
    q[0] = make_float4(v[0], v[1], v[2], v[3]);
    q[1] = make_float4(v[4], v[5], v[6], v[7]);
#else
    for (int c = 0; c < 8; ++c) store(base, i + c, v[c]);
#endif
  }
};

// Eight consecutive 2-byte elements i..i+7 as four pairs (IO::Pair: __half2 or __nv_bfloat162): one 16-byte load /
// store on the device (i * 2 bytes 16-byte aligned); element by element through IO::load / IO::store on the host.
template <class IO>
struct PairsIO {
  static DEPRUNE_HD void load8(const void* __restrict__ base, int64_t i, float* v) {
#if defined(__CUDA_ARCH__)
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + i));
    const auto* h = reinterpret_cast<const typename IO::Pair*>(&raw);
    for (int k = 0; k < 4; ++k) {
      const float2 f = IO::to_float2(h[k]);
      v[2 * k] = f.x, v[2 * k + 1] = f.y;
    }
#else
    for (int c = 0; c < 8; ++c) v[c] = IO::load(base, i + c);
#endif
  }
  static DEPRUNE_HD void store8(void* __restrict__ base, int64_t i, const float* v) {
#if defined(__CUDA_ARCH__)
    uint4 raw;
    auto* h = reinterpret_cast<typename IO::Pair*>(&raw);
    for (int k = 0; k < 4; ++k) h[k] = IO::from_floats(v[2 * k], v[2 * k + 1]);
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + i) = raw;
#else
    for (int c = 0; c < 8; ++c) IO::store(base, i + c, v[c]);
#endif
  }
};

struct IOHalf : PairsIO<IOHalf> {
#if defined(__CUDACC__)
  using Pair = __half2;
  static __device__ __forceinline__ float2 to_float2(__half2 h) { return __half22float2(h); }
  static __device__ __forceinline__ __half2 from_floats(float a, float b) { return __floats2half2_rn(a, b); }
#endif
  static DEPRUNE_HD float load(const void* __restrict__ base, int64_t i) {
    const uint16_t h = static_cast<const uint16_t*>(base)[i];
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    return half_bits_to_float(h);
#endif
  }
  static DEPRUNE_HD void store(void* __restrict__ base, int64_t i, float v) {
#if defined(__CUDA_ARCH__)
    static_cast<uint16_t*>(base)[i] = __half_as_ushort(__float2half_rn(v));
#else
    static_cast<uint16_t*>(base)[i] = float_to_half_bits(v);
#endif
  }
};

struct IOBFloat16 : PairsIO<IOBFloat16> {
#if defined(__CUDACC__)
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(__nv_bfloat162 h) { return __bfloat1622float2(h); }
  static __device__ __forceinline__ __nv_bfloat162 from_floats(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
#endif
  static DEPRUNE_HD float load(const void* __restrict__ base, int64_t i) {
    const uint16_t b = static_cast<const uint16_t*>(base)[i];
#if defined(__CUDA_ARCH__)
    return __bfloat162float(__ushort_as_bfloat16(b));
#else
    return bf16_bits_to_float(b);
#endif
  }
  static DEPRUNE_HD void store(void* __restrict__ base, int64_t i, float v) {
#if defined(__CUDA_ARCH__)
    static_cast<uint16_t*>(base)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
    static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(v);
#endif
  }
};

}  // namespace cuda_block
}  // namespace deprune

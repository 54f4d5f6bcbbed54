// fp16 of the CUDA stand-in (cuda_runtime.h): `__half` holds the bits; conversions go through
// _Float16, which rounds to nearest, ties to even, like the device's cvt.rn.
#pragma once

#include "cuda_runtime.h"

struct __half {
  unsigned short bits;
};

inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { return static_cast<float>(std::bit_cast<_Float16>(h.bits)); }
inline __half __float2half_rn(float x) { return __half{std::bit_cast<unsigned short>(static_cast<_Float16>(x))}; }
inline __half __float2half(float x) { return __float2half_rn(x); }

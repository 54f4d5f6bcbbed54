// The per-element and per-tensor arithmetic of one Fromage step, shared by the CPU kernels and the
// CUDA kernels. Plain C++ (no torch, no CUDA headers): FF_HD marks what the GPU also runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FF_HD __host__ __device__ __forceinline__
#else
#define FF_HD inline
#endif

namespace ff {

// Stochastic rounding recipe, identical to fromage_fused/_math.py (lowbias32 hash on uint32).
FF_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

FF_HD uint32_t sr_stream(int64_t seed, int64_t tensor_index) {
  return mix32(static_cast<uint32_t>(static_cast<uint64_t>(seed)) +
               static_cast<uint32_t>(static_cast<uint64_t>(tensor_index)) * 0x9E3779B9u);
}

// Round-to-nearest-even fp32 -> bf16 bits (NaN becomes the canonical quiet NaN, like torch).
FF_HD uint16_t bf16_bits_rne(uint32_t bits) {
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// bf16 bits of fp32 `bits` rounded stochastically; element `idx` (flat, row-major) of the tensor
// whose stream is `stream` (`idx_low`: its low 32 bits). Non-finite values round to nearest (infinities are exact, NaN becomes
// the quiet NaN). Branch-free, so that loops over it vectorise.
FF_HD uint16_t bf16_bits_stochastic(uint32_t bits, uint32_t idx_low, uint32_t stream) {
  const uint32_t r = mix32(idx_low ^ stream) & 0xFFFFu;
  const bool finite = (bits & 0x7F800000u) != 0x7F800000u;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(finite ? (bits + r) >> 16 : (nan ? 0x7FC0u : bits >> 16));
}

// Only the low 32 bits of the element index enter the hash.
FF_HD uint32_t index_low(int64_t idx) { return static_cast<uint32_t>(static_cast<uint64_t>(idx)); }

// The update of one tensor is p <- cp * p + cg * g. Mirrors _math.coefficients operation for
// operation (float arithmetic, same order), so that the CPU results can be compared bit for bit.
struct Coef {
  float cp;
  float cg;
  float max_norm;  // the tensor's max_norm after this step (meaningful with p_bound only)
};

FF_HD float ff_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

FF_HD Coef coefficients(float s_pp, float s_gg, float s_pg, float lr, float grad_scale, bool has_grad_scale,
                        bool has_p_bound, float p_bound, float max_norm, bool maximize, bool prefactor) {
  const bool both = (s_pp > 0.f) && (s_gg > 0.f);
  float a;
  if (both) {
    a = lr * ff_sqrt(s_pp) / ff_sqrt(s_gg);
  } else {
    a = has_grad_scale ? lr / grad_scale : lr;
  }
  if (maximize) a = -a;
  float s = prefactor ? 1.f / ff_sqrt(1.f + lr * lr) : 1.f;
  float mn = max_norm;
  if (has_p_bound) {
    if (mn < 0.f) mn = p_bound * ff_sqrt(s_pp);
    const float norm_sq = s * s * (s_pp - 2.f * a * s_pg + a * a * s_gg);
    const float norm = ff_sqrt(norm_sq > 0.f ? norm_sq : 0.f);
    if (norm > mn) s = s * mn / norm;
  }
  Coef c;
  c.cp = s;
  c.cg = -a * s;
  c.max_norm = mn;
  return c;
}

}  // namespace ff

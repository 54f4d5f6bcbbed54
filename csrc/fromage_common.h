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

// Rounding of fp32 results to bf16, the integer recipe of fromage_fused/_math.py: NaN becomes the
// quiet NaN 0x7FC0 (kBf16NaN), infinities stay, the largest finite values may round to infinity.
constexpr uint16_t kBf16NaN = 0x7FC0u;

// lowbias32 hash on uint32.
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

FF_HD bool is_nan_bits(uint32_t bits) { return (bits & 0x7FFFFFFFu) > 0x7F800000u; }

// Round-to-nearest-even fp32 -> bf16 bits. Branch-free, so that loops over it vectorise.
FF_HD uint16_t bf16_bits_rne(uint32_t bits) {
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(is_nan_bits(bits) ? kBf16NaN : rounded);
}

// bf16 bits of fp32 `bits` rounded stochastically; element `idx_low` (the low 32 bits of its flat,
// row-major index) of the tensor whose stream is `stream`. Infinities have zero low bits, so adding
// r < 2**16 leaves them as they are. Branch-free.
FF_HD uint16_t bf16_bits_stochastic(uint32_t bits, uint32_t idx_low, uint32_t stream) {
  const uint32_t r = mix32(idx_low ^ stream) & 0xFFFFu;
  return static_cast<uint16_t>(is_nan_bits(bits) ? kBf16NaN : (bits + r) >> 16);
}

// Only the low 32 bits of the element index enter the hash.
FF_HD uint32_t index_low(int64_t idx) { return static_cast<uint32_t>(static_cast<uint64_t>(idx)); }

// Correctly rounded fp32 operations that no compiler fuses into a multiply-add: on the GPU the
// _rn intrinsics (never contracted, whatever -fmad says); on the host plain operators, which the
// CPU kernels compile with -ffp-contract=off. Every backend's apply phase is this arithmetic
// (docs/backends.md, "Bit-identical results"); torch's ops and the Triton kernel carry the same sequence.
FF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FF_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FF_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FF_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FF_HD float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// Whether a step can use lr: >= 0 and finite in float32 (false for NaN). A tensor lr edited after
// construction is never read on the host: a step whose lr is not usable skips, as with found_inf
// (fromage_fused/_math.py: usable_lr).
FF_HD bool usable_lr(float lr) { return lr >= 0.f && lr <= 3.40282347e+38f; }

// The update of one tensor is p <- round(round(cp * p) + round(cg * g)).
struct Coef {
  float cp;
  float cg;
  float max_norm;  // the tensor's max_norm after this step (meaningful with p_bound only)
};

FF_HD float update(const Coef& c, float p, float g) { return add_rn(mul_rn(c.cp, p), mul_rn(c.cg, g)); }

// One rounding per operation, in the order of fromage_fused/_math.py's coefficients(); change both.
FF_HD Coef coefficients(float s_pp, float s_gg, float s_pg, float lr, float grad_scale, bool has_grad_scale,
                        bool has_p_bound, float p_bound, float max_norm, bool maximize, bool prefactor) {
  const bool both = (s_pp > 0.f) && (s_gg > 0.f);
  const float root_p = sqrt_rn(s_pp);
  float a;
  if (both) {
    a = div_rn(mul_rn(lr, root_p), sqrt_rn(s_gg));
  } else {
    a = has_grad_scale ? div_rn(lr, grad_scale) : lr;
  }
  if (maximize) a = -a;
  float s = prefactor ? div_rn(1.f, sqrt_rn(add_rn(1.f, mul_rn(lr, lr)))) : 1.f;
  float mn = max_norm;
  if (has_p_bound) {
    if (mn < 0.f) mn = mul_rn(p_bound, root_p);
    // s*s * (s_pp - 2a*s_pg + a*a*s_gg)
    const float inner = add_rn(sub_rn(s_pp, mul_rn(mul_rn(2.f, a), s_pg)), mul_rn(mul_rn(a, a), s_gg));
    const float norm_sq = mul_rn(mul_rn(s, s), inner);
    const float norm = sqrt_rn(norm_sq > 0.f ? norm_sq : 0.f);
    if (norm > mn) s = div_rn(mul_rn(s, mn), norm);
  }
  Coef c;
  c.cp = s;
  c.cg = mul_rn(-a, s);
  c.max_norm = mn;
  return c;
}

}  // namespace ff

// The engine's arithmetic shared by the CPU and CUDA kernels of every rule: the bf16 roundings (to
// nearest and stochastic, the integer recipes of fromage_fused/engine/rounding.py) and correctly
// rounded fp32 operations that no compiler fuses. Plain C++ (no torch, no CUDA headers): FF_HD marks
// what the GPU also runs.
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

// Rounding of fp32 results to bf16, the integer recipe of fromage_fused/engine/rounding.py: NaN becomes the
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

// 1 where x > 0, else 0 (NaN: 0): a mask as a number, for the rules' bodies.
FF_HD float positive(float x) { return x > 0.f ? 1.f : 0.f; }

// Whether a step can use lr: >= 0 and finite in float32 (false for NaN). A tensor lr edited after
// construction is never read on the host: a step whose lr is not usable skips, as with found_inf
// (fromage_fused/engine/spec.py: usable_lr).
FF_HD bool usable_lr(float lr) { return lr >= 0.f && lr <= 3.40282347e+38f; }

// One term of a per-tensor sum: acc + a * b. On the GPU a fused multiply-add; on the host the
// product and the sum each rounded (the CPU kernels are compiled with -ffp-contract=off; their
// vector loops use at::vec::fmadd, an overload in engine_cpu.cpp).
FF_HD void fma_acc(float& acc, float a, float b) {
#if defined(__CUDA_ARCH__)
  acc = fmaf(a, b, acc);
#else
  acc = acc + a * b;
#endif
}

}  // namespace ff

// Multi-tensor CUDA kernels of the two phases. Only CUDA headers: see fromage_cuda.h.
//
// A launch carries the addresses and sizes of up to kMaxTensors tensors and the (slot, chunk) of
// up to kMaxBlocks blocks by value in its arguments (no host-to-device copy, so a captured CUDA
// graph replays it). Block b handles chunk a.chunk[b] of tensor a.slot[b].
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fromage_common.h"
#include "fromage_cuda.h"

namespace ff {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;

struct Packed {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  float* max_norm[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t partial_base[kMaxTensors];  // first partial (in units of 3 floats) of the tensor
  int32_t index[kMaxTensors];         // position of the tensor in the op's lists
  int32_t nchunks[kMaxTensors];
  int32_t chunk[kMaxBlocks];
  uint8_t slot[kMaxBlocks];
};
// The kernel parameter space is 4 KB (the other arguments take under 100 bytes).
static_assert(sizeof(Packed) <= 3968, "Packed kernel arguments exceed the 4 KB parameter space");

// Element formats: storage type, elements per 16-byte vector, conversions through fp32.
struct F32 {
  using S = float;
  static constexpr int kVec = 4;
  __device__ static float to_f(S x) { return x; }
  __device__ static S from_f(float x) { return x; }
};
struct BF16 {
  using S = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_f(S x) { return __uint_as_float(static_cast<uint32_t>(x) << 16); }
  __device__ static S from_f(float x) { return bf16_bits_rne(__float_as_uint(x)); }
};
struct F16 {
  using S = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_f(S x) { return __half2float(__ushort_as_half(x)); }
  __device__ static S from_f(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

template <class Tr>
__device__ __forceinline__ void load_vec(const typename Tr::S* ptr, float* out) {
  if constexpr (Tr::kVec == 4) {
    const float4 v = *reinterpret_cast<const float4*>(ptr);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(ptr);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[2 * j] = Tr::to_f(static_cast<uint16_t>(w[j] & 0xFFFFu));
      out[2 * j + 1] = Tr::to_f(static_cast<uint16_t>(w[j] >> 16));
    }
  }
}

template <class Tr>
__device__ __forceinline__ void store_vec(typename Tr::S* ptr, const typename Tr::S* v) {
  if constexpr (Tr::kVec == 4) {
    *reinterpret_cast<float4*>(ptr) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    uint4 o;
    o.x = v[0] | (static_cast<uint32_t>(v[1]) << 16);
    o.y = v[2] | (static_cast<uint32_t>(v[3]) << 16);
    o.z = v[4] | (static_cast<uint32_t>(v[5]) << 16);
    o.w = v[6] | (static_cast<uint32_t>(v[7]) << 16);
    *reinterpret_cast<uint4*>(ptr) = o;
  }
}

// fp32 -> storage, stochastically for bf16 when SR (element `idx` of the tensor whose stream is `stream`).
template <class Tr, bool SR>
__device__ __forceinline__ typename Tr::S round_to(float x, int64_t idx, uint32_t stream) {
  if constexpr (SR) {
    return bf16_bits_stochastic(__float_as_uint(x), index_low(idx), stream);
  } else {
    return Tr::from_f(x);
  }
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum of three values over the block, in a fixed order (deterministic); the result is in thread 0.
__device__ __forceinline__ void block_sum3(float& a, float& b, float& c) {
  __shared__ float sh[3][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  if (lane == 0) {
    sh[0][warp] = a;
    sh[1][warp] = b;
    sh[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < kWarps ? sh[0][lane] : 0.f);
    b = warp_sum(lane < kWarps ? sh[1][lane] : 0.f);
    c = warp_sum(lane < kWarps ? sh[2][lane] : 0.f);
  }
  __syncthreads();
}

// Phase 1. Each block writes the fp32 partial sums of its chunk; the last block of a tensor to
// finish (an integer counter per tensor, no float atomics) sums the tensor's partials in a fixed
// order and writes its stats row.
template <class Tr>
__global__ void __launch_bounds__(kThreads) stats_kernel(Packed a, float* __restrict__ stats,
                                                         float* __restrict__ partials, unsigned* __restrict__ counters,
                                                         int inner) {
  using S = typename Tr::S;
  const int slot = a.slot[blockIdx.x];
  const int64_t chunk = a.chunk[blockIdx.x];
  const int64_t start = chunk * kCudaChunk;
  const int64_t left = a.numel[slot] - start;
  const int len = static_cast<int>(left < kCudaChunk ? left : kCudaChunk);
  const S* p = static_cast<const S*>(a.p[slot]) + start;
  const S* g = static_cast<const S*>(a.g[slot]) + start;
  float pp = 0.f, gg = 0.f, pg = 0.f;
  int vec_end = 0;
  if (aligned16(p) && aligned16(g)) {
    vec_end = len - len % Tr::kVec;
    for (int i = threadIdx.x * Tr::kVec; i < vec_end; i += kThreads * Tr::kVec) {
      float pv[Tr::kVec], gv[Tr::kVec];
      load_vec<Tr>(p + i, pv);
      load_vec<Tr>(g + i, gv);
#pragma unroll
      for (int j = 0; j < Tr::kVec; ++j) {
        pp = fmaf(pv[j], pv[j], pp);
        gg = fmaf(gv[j], gv[j], gg);
        pg = fmaf(pv[j], gv[j], pg);
      }
    }
  }
  for (int i = vec_end + threadIdx.x; i < len; i += kThreads) {
    const float pf = Tr::to_f(p[i]), gf = Tr::to_f(g[i]);
    pp = fmaf(pf, pf, pp);
    gg = fmaf(gf, gf, gg);
    pg = fmaf(pf, gf, pg);
  }
  block_sum3(pp, gg, pg);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    float* out = partials + 3 * (a.partial_base[slot] + chunk);
    out[0] = pp;
    out[1] = gg;
    out[2] = pg;
    __threadfence();
    const unsigned done = atomicAdd(&counters[a.index[slot]], 1u);
    last = done + 1 == static_cast<unsigned>(a.nchunks[slot]);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* part = partials + 3 * a.partial_base[slot];
  pp = gg = pg = 0.f;
  for (int k = threadIdx.x; k < a.nchunks[slot]; k += kThreads) {
    pp += __ldcg(part + 3 * k);
    gg += __ldcg(part + 3 * k + 1);
    pg += __ldcg(part + 3 * k + 2);
  }
  block_sum3(pp, gg, pg);
  if (threadIdx.x == 0) {
    float* row = stats + 3 * static_cast<int64_t>(a.index[slot]);
    row[0] = pp;
    row[1] = gg;
    row[2] = inner ? pg : 0.f;
  }
}

// Phase 2. Every block derives its tensor's coefficients from the stats on the device. An unset
// max_norm is written by the first chunk's block; the other blocks of the tensor read either the
// unset value or the written one, and both lead to the same number.
template <class Tr, bool SR>
__global__ void __launch_bounds__(kThreads) apply_kernel(Packed a, const float* __restrict__ stats,
                                                         const float* __restrict__ lr,
                                                         const float* __restrict__ found_inf,
                                                         const float* __restrict__ grad_scale,
                                                         const int64_t* __restrict__ seed, int has_p_bound,
                                                         float p_bound, int maximize, int prefactor) {
  using S = typename Tr::S;
  if (found_inf != nullptr && *found_inf != 0.f) return;
  const int slot = a.slot[blockIdx.x];
  const int64_t chunk = a.chunk[blockIdx.x];
  const int index = a.index[slot];
  const float* row = stats + 3 * static_cast<int64_t>(index);
  const float old = has_p_bound ? *a.max_norm[slot] : 0.f;
  const Coef c = coefficients(row[0], row[1], row[2], *lr, grad_scale ? *grad_scale : 1.f, grad_scale != nullptr,
                              has_p_bound, p_bound, old, maximize, prefactor);
  if (has_p_bound && chunk == 0 && threadIdx.x == 0 && old < 0.f) *a.max_norm[slot] = c.max_norm;
  const uint32_t stream = SR ? sr_stream(*seed, index) : 0u;
  const int64_t start = chunk * kCudaChunk;
  const int64_t left = a.numel[slot] - start;
  const int len = static_cast<int>(left < kCudaChunk ? left : kCudaChunk);
  S* p = static_cast<S*>(a.p[slot]) + start;
  const S* g = static_cast<const S*>(a.g[slot]) + start;
  int vec_end = 0;
  if (aligned16(p) && aligned16(g)) {
    vec_end = len - len % Tr::kVec;
    for (int i = threadIdx.x * Tr::kVec; i < vec_end; i += kThreads * Tr::kVec) {
      float pv[Tr::kVec], gv[Tr::kVec];
      S out[Tr::kVec];
      load_vec<Tr>(p + i, pv);
      load_vec<Tr>(g + i, gv);
#pragma unroll
      for (int j = 0; j < Tr::kVec; ++j) out[j] = round_to<Tr, SR>(update(c, pv[j], gv[j]), start + i + j, stream);
      store_vec<Tr>(p + i, out);
    }
  }
  for (int i = vec_end + threadIdx.x; i < len; i += kThreads)
    p[i] = round_to<Tr, SR>(update(c, Tr::to_f(p[i]), Tr::to_f(g[i])), start + i, stream);
}

__global__ void round_bf16_kernel(const float* __restrict__ x, uint16_t* __restrict__ out, int64_t n,
                                  const int64_t* __restrict__ seed, int64_t tensor_index) {
  const uint32_t stream = sr_stream(*seed, tensor_index);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = bf16_bits_stochastic(__float_as_uint(x[i]), index_low(i), stream);
}

}  // namespace ff

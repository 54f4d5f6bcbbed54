// Multi-tensor CUDA kernels of the two phases. Only CUDA headers: see fromage_cuda.h.
//
// A launch reads the group's tensors from a tensor table in device memory (tensor_table.h): one
// CUDA block per table block, so each phase is one launch whatever the number of tensors. Block b
// handles block b - first[t] of tensor t = owner[b].
#pragma once

#include <cuda/atomic>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fromage_common.h"
#include "fromage_cuda.h"
#include "tensor_table.h"

namespace ff {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// 16-byte vectors of each operand a thread loads before it uses any of them: without them in
// registers first, each store waits for the loads before it (the compiler cannot move a load
// above a store through pointers that may alias), and only 2-3 loads are in flight.
constexpr int kStage = 4;

// This block's place in the tensor table.
struct Slot {
  int32_t t;      // tensor (its position in the op's lists)
  int64_t block;  // block of that tensor
  int64_t blocks;
  int64_t numel;
  int64_t p, g;   // addresses
};

// Addresses read from the table are plain integers: promising that they point to global memory
// lets the compiler use global loads and stores instead of generic ones (slot_of makes sure they do).
template <class T>
__device__ __forceinline__ T* global_ptr(int64_t address, int64_t offset = 0) {
  T* ptr = reinterpret_cast<T*>(address) + offset;
  __builtin_assume(__isGlobal(ptr));
  return ptr;
}

__device__ __forceinline__ Slot slot_of(const int64_t* __restrict__ table, int64_t n) {
  Slot s;
  s.t = reinterpret_cast<const int32_t*>(table + kColumns * n)[blockIdx.x];
  s.block = static_cast<int64_t>(blockIdx.x) - table[kColFirst * n + s.t];
  s.blocks = table[kColBlocks * n + s.t];
  s.numel = table[kColNumel * n + s.t];
  s.p = table[kColP * n + s.t];
  s.g = table[kColG * n + s.t];
  // An empty tensor's address may be null, which is not a global address (global_ptr's promise
  // would be false: undefined behaviour). Its block reads nothing through it, so any global
  // address does: the table's.
  if (s.p == 0) s.p = reinterpret_cast<int64_t>(table);
  if (s.g == 0) s.g = reinterpret_cast<int64_t>(table);
  return s;
}

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

// Phase 1. Each block sums its elements in fp32. A tensor of one block writes its stats row
// directly; otherwise each block writes its partial sums and the last block of the tensor to
// finish (an integer counter per tensor, no float atomics) adds the tensor's partials in a fixed
// order and writes the row.
template <class Tr>
__global__ void __launch_bounds__(kThreads, 2) stats_kernel(const int64_t* __restrict__ table, int64_t n,
                                                         float* __restrict__ stats, float* __restrict__ partials,
                                                         unsigned* __restrict__ counters, int inner) {
  using S = typename Tr::S;
  constexpr int kStep = kThreads * Tr::kVec;  // elements per pass of the whole block
  const Slot at = slot_of(table, n);
  const int64_t start = at.block * kCudaChunk;
  const int64_t left = at.numel - start;
  const int len = static_cast<int>(left < kCudaChunk ? left : kCudaChunk);
  const S* p = global_ptr<const S>(at.p, start);
  const S* g = global_ptr<const S>(at.g, start);
  float pp = 0.f, gg = 0.f, pg = 0.f;
  int vec_end = 0;
  if (aligned16(p) && aligned16(g)) {
    vec_end = len - len % Tr::kVec;
    int i = threadIdx.x * Tr::kVec;
    for (; i + (kStage - 1) * kStep < vec_end; i += kStage * kStep) {
      float pv[kStage][Tr::kVec], gv[kStage][Tr::kVec];
#pragma unroll
      for (int s = 0; s < kStage; ++s) {
        load_vec<Tr>(p + i + s * kStep, pv[s]);
        load_vec<Tr>(g + i + s * kStep, gv[s]);
      }
#pragma unroll
      for (int s = 0; s < kStage; ++s) {
#pragma unroll
        for (int j = 0; j < Tr::kVec; ++j) {
          pp = fmaf(pv[s][j], pv[s][j], pp);
          gg = fmaf(gv[s][j], gv[s][j], gg);
          pg = fmaf(pv[s][j], gv[s][j], pg);
        }
      }
    }
    for (; i < vec_end; i += kStep) {
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
  float* row = stats + 3 * static_cast<int64_t>(at.t);
  if (at.blocks == 1) {
    if (threadIdx.x == 0) {
      row[0] = pp;
      row[1] = gg;
      row[2] = inner ? pg : 0.f;
    }
    return;
  }
  __shared__ bool last;
  if (threadIdx.x == 0) {
    float* out = partials + 3 * static_cast<int64_t>(blockIdx.x);
    out[0] = pp;
    out[1] = gg;
    out[2] = pg;
    __threadfence();
    const unsigned done = atomicAdd(&counters[at.t], 1u);
    last = done + 1 == static_cast<unsigned>(at.blocks);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* part = partials + 3 * (static_cast<int64_t>(blockIdx.x) - at.block);
  pp = gg = pg = 0.f;
  for (int64_t k = threadIdx.x; k < at.blocks; k += kThreads) {
    pp += __ldcg(part + 3 * k);
    gg += __ldcg(part + 3 * k + 1);
    pg += __ldcg(part + 3 * k + 2);
  }
  block_sum3(pp, gg, pg);
  if (threadIdx.x == 0) {
    row[0] = pp;
    row[1] = gg;
    row[2] = inner ? pg : 0.f;
  }
}

// The max_norm of a tensor is read by every thread of its blocks while, when it is unset, the
// tensor's first block writes it: relaxed atomic accesses, so that this is not a data race. The
// other blocks read the unset value or the written one, and both lead to the same coefficients.
using AtomicFloat = cuda::atomic_ref<float, cuda::thread_scope_device>;

// Phase 2. Every block derives its tensor's coefficients from the stats on the device.
template <class Tr, bool SR>
__global__ void __launch_bounds__(kThreads, 2) apply_kernel(const int64_t* __restrict__ table,
                                                         float* __restrict__ max_norms, int64_t n,  // [n] or null
                                                         const float* __restrict__ stats,
                                                         const float* __restrict__ lr,
                                                         const float* __restrict__ found_inf,
                                                         const float* __restrict__ grad_scale,
                                                         const int64_t* __restrict__ seed, float p_bound,
                                                         int maximize, int prefactor) {
  using S = typename Tr::S;
  constexpr int kStep = kThreads * Tr::kVec;
  if (found_inf != nullptr && *found_inf != 0.f) return;
  const Slot at = slot_of(table, n);
  const bool has_p_bound = max_norms != nullptr;
  float* max_norm = has_p_bound ? max_norms + at.t : nullptr;
  const float* row = stats + 3 * static_cast<int64_t>(at.t);
  const float old = has_p_bound ? AtomicFloat(*max_norm).load(cuda::memory_order_relaxed) : 0.f;
  const Coef c = coefficients(row[0], row[1], row[2], *lr, grad_scale ? *grad_scale : 1.f, grad_scale != nullptr,
                              has_p_bound, p_bound, old, maximize, prefactor);
  if (has_p_bound && at.block == 0 && threadIdx.x == 0 && old < 0.f)
    AtomicFloat(*max_norm).store(c.max_norm, cuda::memory_order_relaxed);
  const uint32_t stream = SR ? sr_stream(*seed, at.t) : 0u;
  const int64_t start = at.block * kCudaChunk;
  const int64_t left = at.numel - start;
  const int len = static_cast<int>(left < kCudaChunk ? left : kCudaChunk);
  S* p = global_ptr<S>(at.p, start);
  const S* g = global_ptr<const S>(at.g, start);
  int vec_end = 0;
  if (aligned16(p) && aligned16(g)) {
    vec_end = len - len % Tr::kVec;
    int i = threadIdx.x * Tr::kVec;
    for (; i + (kStage - 1) * kStep < vec_end; i += kStage * kStep) {
      float pv[kStage][Tr::kVec], gv[kStage][Tr::kVec];
#pragma unroll
      for (int s = 0; s < kStage; ++s) {
        load_vec<Tr>(p + i + s * kStep, pv[s]);
        load_vec<Tr>(g + i + s * kStep, gv[s]);
      }
#pragma unroll
      for (int s = 0; s < kStage; ++s) {
        S out[Tr::kVec];
#pragma unroll
        for (int j = 0; j < Tr::kVec; ++j)
          out[j] = round_to<Tr, SR>(update(c, pv[s][j], gv[s][j]), start + i + s * kStep + j, stream);
        store_vec<Tr>(p + i + s * kStep, out);
      }
    }
    for (; i < vec_end; i += kStep) {
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

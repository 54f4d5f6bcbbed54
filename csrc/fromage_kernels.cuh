// Multi-tensor CUDA kernels of the two phases. Only CUDA headers: see fromage_cuda.h.
//
// A launch reads the group's tensors from a tensor table in device memory (tensor_table.h): one
// CUDA block per table block, so each phase is one launch whatever the number of tensors. Block b
// handles block b - first[t] of tensor t = owner[b].
#pragma once

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
// Elements of each operand a thread loads before it uses any, where p and g cannot be read as
// aligned vectors together: scalar loads, so more of them (16 loads in flight per thread).
constexpr int kScalarStage = 8;

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

// How a block's elements [0, len) are read: elements [head, vec_end) as 16-byte vectors, the others
// one by one. Vectors need p + head and g + head both 16-byte aligned: when p and g are misaligned by
// the same amount (views into buffers at the same offset) a head of fewer than kVec elements gets
// them there; otherwise there are no vectors.
struct Split {
  int head;
  int vec_end;
};
template <class Tr>
__device__ __forceinline__ Split split_of(const void* p, const void* g, int len) {
  const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(g);
  constexpr uintptr_t kSize = sizeof(typename Tr::S);
  if (((a ^ b) & 15u) != 0 || (a & (kSize - 1)) != 0) return Split{0, 0};
  const int to_aligned = static_cast<int>(((16u - (a & 15u)) & 15u) / kSize);
  const int head = to_aligned < len ? to_aligned : len;
  return Split{head, head + (len - head) / Tr::kVec * Tr::kVec};
}

// Visits the block's `len` elements of p and g, in fp32: op.vec(i, pv, gv) for the Tr::kVec elements
// from i, op.one(i, pf, gf) for one element (i counts from the block's first element). Each thread
// loads kStage vectors (or kScalarStage elements) of both operands before it hands any to `op`:
// an op that stores into p would otherwise wait for each load before the store after it (the
// compiler cannot move a load above a store through pointers that may alias). Every element is
// visited once, by one thread, in an order that depends only on len and the alignment.
template <class Tr, class P, class Op>
__device__ __forceinline__ void sweep(P* p, const typename Tr::S* g, int len, Op& op) {
  constexpr int kStep = kThreads * Tr::kVec;  // elements per vector pass of the whole block
  const Split split = split_of<Tr>(p, g, len);
  if (static_cast<int>(threadIdx.x) < split.head) op.one(threadIdx.x, Tr::to_f(p[threadIdx.x]), Tr::to_f(g[threadIdx.x]));
  int i = split.head + static_cast<int>(threadIdx.x) * Tr::kVec;
  for (; i + (kStage - 1) * kStep < split.vec_end; i += kStage * kStep) {
    float pv[kStage][Tr::kVec], gv[kStage][Tr::kVec];
#pragma unroll
    for (int s = 0; s < kStage; ++s) {
      load_vec<Tr>(p + i + s * kStep, pv[s]);
      load_vec<Tr>(g + i + s * kStep, gv[s]);
    }
#pragma unroll
    for (int s = 0; s < kStage; ++s) op.vec(i + s * kStep, pv[s], gv[s]);
  }
  for (; i < split.vec_end; i += kStep) {
    float pv[Tr::kVec], gv[Tr::kVec];
    load_vec<Tr>(p + i, pv);
    load_vec<Tr>(g + i, gv);
    op.vec(i, pv, gv);
  }
  int k = split.vec_end + static_cast<int>(threadIdx.x);
  for (; k + (kScalarStage - 1) * kThreads < len; k += kScalarStage * kThreads) {
    float pf[kScalarStage], gf[kScalarStage];
#pragma unroll
    for (int s = 0; s < kScalarStage; ++s) {
      pf[s] = Tr::to_f(p[k + s * kThreads]);
      gf[s] = Tr::to_f(g[k + s * kThreads]);
    }
#pragma unroll
    for (int s = 0; s < kScalarStage; ++s) op.one(k + s * kThreads, pf[s], gf[s]);
  }
  for (; k < len; k += kThreads) op.one(k, Tr::to_f(p[k]), Tr::to_f(g[k]));
}

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

// The sums of phase 1 over one thread's elements: a chain of fused multiply-adds each.
template <class Tr>
struct StatsOp {
  float pp = 0.f, gg = 0.f, pg = 0.f;
  __device__ __forceinline__ void one(int, float pf, float gf) {
    pp = fmaf(pf, pf, pp);
    gg = fmaf(gf, gf, gg);
    pg = fmaf(pf, gf, pg);
  }
  __device__ __forceinline__ void vec(int i, const float* pv, const float* gv) {
#pragma unroll
    for (int j = 0; j < Tr::kVec; ++j) one(i + j, pv[j], gv[j]);
  }
};

// Phase 1. Each block sums its elements in fp32. A tensor of one block writes its stats row
// directly; otherwise each block writes its partial sums and the last block of the tensor to
// finish (an integer counter per tensor, no float atomics) adds the tensor's partials in a fixed
// order and writes the row.
template <class Tr>
__global__ void __launch_bounds__(kThreads, 2) stats_kernel(const int64_t* __restrict__ table, int64_t n,
                                                         float* __restrict__ stats, float* __restrict__ partials,
                                                         unsigned* __restrict__ counters, int inner) {
  using S = typename Tr::S;
  const Slot at = slot_of(table, n);
  const int64_t start = at.block * kCudaChunk;
  const int64_t left = at.numel - start;
  const int len = static_cast<int>(left < kCudaChunk ? left : kCudaChunk);
  StatsOp<Tr> sums;
  sweep<Tr>(global_ptr<const S>(at.p, start), global_ptr<const S>(at.g, start), len, sums);
  float pp = sums.pp, gg = sums.gg, pg = sums.pg;
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

// The update of one block's elements, rounded to the storage format.
template <class Tr, bool SR>
struct ApplyOp {
  typename Tr::S* p;
  Coef c;
  int64_t start;    // the block's first element in its tensor (the stochastic rounding's index)
  uint32_t stream;  // the tensor's stochastic-rounding stream
  __device__ __forceinline__ void vec(int i, const float* pv, const float* gv) {
    typename Tr::S out[Tr::kVec];
#pragma unroll
    for (int j = 0; j < Tr::kVec; ++j) out[j] = round_to<Tr, SR>(update(c, pv[j], gv[j]), start + i + j, stream);
    store_vec<Tr>(p + i, out);
  }
  __device__ __forceinline__ void one(int i, float pf, float gf) {
    p[i] = round_to<Tr, SR>(update(c, pf, gf), start + i, stream);
  }
};

// A tensor's max_norm, read by every block of the tensor while, when it is unset, the tensor's
// first block writes it. One thread per block reads it, with an atomic (adding 0 to its bits
// changes nothing), and hands it to the others through shared memory; the write is an atomic
// exchange: no data race. The other blocks read the unset value or the written one, and both lead
// to the same coefficients. (Built-in atomics: <cuda/atomic> would double the kernels' compile time.)
__device__ __forceinline__ float read_max_norm(float* max_norm) {
  __shared__ float value;
  if (threadIdx.x == 0) value = __uint_as_float(atomicAdd(reinterpret_cast<unsigned*>(max_norm), 0u));
  __syncthreads();
  return value;
}

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
  if ((found_inf != nullptr && *found_inf != 0.f) || !usable_lr(*lr)) return;
  const Slot at = slot_of(table, n);
  const bool has_p_bound = max_norms != nullptr;
  float* max_norm = has_p_bound ? max_norms + at.t : nullptr;
  const float* row = stats + 3 * static_cast<int64_t>(at.t);
  const float old = has_p_bound ? read_max_norm(max_norm) : 0.f;
  const Coef c = coefficients(row[0], row[1], row[2], *lr, grad_scale ? *grad_scale : 1.f, grad_scale != nullptr,
                              has_p_bound, p_bound, old, maximize, prefactor);
  if (has_p_bound && at.block == 0 && threadIdx.x == 0 && old < 0.f)
    atomicExch(max_norm, c.max_norm);
  const int64_t start = at.block * kCudaChunk;
  const int64_t left = at.numel - start;
  const int len = static_cast<int>(left < kCudaChunk ? left : kCudaChunk);
  ApplyOp<Tr, SR> op{global_ptr<S>(at.p, start), c, start, SR ? sr_stream(*seed, at.t) : 0u};
  sweep<Tr>(op.p, global_ptr<const S>(at.g, start), len, op);
}

__global__ void round_bf16_kernel(const float* __restrict__ x, uint16_t* __restrict__ out, int64_t n,
                                  const int64_t* __restrict__ seed, int64_t tensor_index) {
  const uint32_t stream = sr_stream(*seed, tensor_index);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = bf16_bits_stochastic(__float_as_uint(x[i]), index_low(i), stream);
}

}  // namespace ff

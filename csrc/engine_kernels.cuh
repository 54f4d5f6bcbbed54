// The engine's CUDA kernel: one pass of any rule (rules.h) over a group of tensors in one launch,
// the rule's pass as a template functor (as apex's multi_tensor_apply takes its functors). Only
// CUDA headers: see engine_cuda.h.
//
// A launch reads the group's tensors from a tensor table in device memory (tensor_table.h): one
// CUDA block per table block, so a pass is one launch whatever the number of tensors. Block b
// handles block b - first[t] of tensor t = owner[b]: it derives the tensor's coefficients with the
// rule's __host__ __device__ function, visits its elements with the rule's body (written lists
// stored in place, rounded to their format), and reduces the pass's per-tensor sums: per-block
// partials, then the last block of a tensor adds them in a fixed order (an integer counter, no
// float atomics: deterministic); a one-block tensor writes its sums row directly.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "engine.h"
#include "engine_cuda.h"
#include "rules.h"
#include "tensor_table.h"

namespace ff {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// 16-byte vectors a thread loads (over all lists) before it uses any of them: without them in
// registers first, each store waits for the loads before it (the compiler cannot move a load above
// a store through pointers that may alias), and only 2-3 loads are in flight.
constexpr int kVectorsInFlight = 8;
// Elements a thread loads (over all lists) before it uses any, where the lists cannot be read as
// aligned vectors together: scalar loads, so more of them.
constexpr int kScalarsInFlight = 16;

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

template <int N, class F, int... I>
__device__ __forceinline__ void static_for_impl(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(std::integral_constant<int, k>) for k = 0 .. N-1, unrolled (the lists of a pass differ in type).
template <int N, class F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_impl<N>(f, std::make_integer_sequence<int, N>{});
}

// Whether a pass asks to stage half as many vectors and scalars (Pass::kStageHalf, optional): its
// body needs more registers than the engine's staging leaves it.
template <class Pass, class = void>
struct StagesHalf : std::false_type {};
template <class Pass>
struct StagesHalf<Pass, std::void_t<decltype(Pass::kStageHalf)>> : std::bool_constant<Pass::kStageHalf> {};

// What pass P of Rule is on parameters of format Tr: its lists' formats and how it is staged.
template <class Rule, int P, class Tr, bool SR = false>
struct PassOn {
  using Pass = typename Rule::template Pass<P>;
  static constexpr int L = Pass::kLists, W = Pass::kWrites, S = Pass::kSums;
  template <int K>
  using Fmt = std::conditional_t<Pass::param_list(K), Tr, F32>;
  // Elements per vector step: one 16-byte vector of the parameters (a float32 buffer beside bf16
  // parameters takes two).
  static constexpr int kVec = Tr::kVec;
  static constexpr int vectors_per_step() {
    int v = 0;
    for (int k = 0; k < L; ++k) v += Pass::param_list(k) ? 1 : kVec / F32::kVec;
    return v;
  }
  // Stochastic rounding's hash needs registers of its own: a pass of three or more lists stages half
  // as many vectors and scalars with it (no spills on sm_80 and sm_90), as does a pass that asks to.
  static constexpr bool kHalf = (SR && L >= 3) || StagesHalf<Pass>::value;
  static constexpr int kInFlight = kHalf ? kVectorsInFlight / 2 : kVectorsInFlight;
  static constexpr int kStage = kInFlight / vectors_per_step() > 0 ? kInFlight / vectors_per_step() : 1;
  static constexpr int kScalarsStaged = kHalf ? kScalarsInFlight / 2 : kScalarsInFlight;
  static constexpr int kScalarStage = kScalarsStaged / L > 0 ? kScalarsStaged / L : 1;
};

// Addresses read from the table are plain integers: promising that they point to global memory
// lets the compiler use global loads and stores instead of generic ones (slot_of makes sure they do).
template <class T>
__device__ __forceinline__ T* global_ptr(int64_t address, int64_t offset = 0) {
  T* ptr = reinterpret_cast<T*>(address) + offset;
  __builtin_assume(__isGlobal(ptr));
  return ptr;
}

// This block's place in the tensor table of L lists.
template <int L>
struct Slot {
  int32_t t;      // tensor (its position in the op's lists)
  int64_t block;  // block of that tensor
  int64_t blocks;
  int64_t numel;
  int64_t addr[L];
};

template <int L>
__device__ __forceinline__ Slot<L> slot_of(const int64_t* __restrict__ table, int64_t n) {
  Slot<L> s;
  s.t = reinterpret_cast<const int32_t*>(table + table_columns(L) * n)[blockIdx.x];
  s.block = static_cast<int64_t>(blockIdx.x) - table[col_first(L) * n + s.t];
  s.blocks = table[col_blocks(L) * n + s.t];
  s.numel = table[col_numel(L) * n + s.t];
#pragma unroll
  for (int k = 0; k < L; ++k) {
    s.addr[k] = table[k * n + s.t];
    // An empty tensor's address may be null, which is not a global address (global_ptr's promise
    // would be false: undefined behaviour). Its block reads nothing through it, so any global
    // address does: the table's.
    if (s.addr[k] == 0) s.addr[k] = reinterpret_cast<int64_t>(table);
  }
  return s;
}

// N elements (a multiple of F::kVec) from 16-byte aligned `ptr` into fp32.
template <class F, int N>
__device__ __forceinline__ void load_vec(const typename F::S* ptr, float* out) {
#pragma unroll
  for (int v = 0; v < N / F::kVec; ++v) {
    if constexpr (F::kVec == 4) {
      const float4 x = *reinterpret_cast<const float4*>(ptr + 4 * v);
      out[4 * v] = x.x;
      out[4 * v + 1] = x.y;
      out[4 * v + 2] = x.z;
      out[4 * v + 3] = x.w;
    } else {
      const uint4 x = *reinterpret_cast<const uint4*>(ptr + 8 * v);
      const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        out[8 * v + 2 * j] = F::to_f(static_cast<uint16_t>(w[j] & 0xFFFFu));
        out[8 * v + 2 * j + 1] = F::to_f(static_cast<uint16_t>(w[j] >> 16));
      }
    }
  }
}

// fp32 -> storage, stochastically for bf16 when SR (element `idx` of the tensor whose stream is `stream`).
template <class F, bool SR>
__device__ __forceinline__ typename F::S round_to(float x, int64_t idx, uint32_t stream) {
  if constexpr (SR && std::is_same_v<F, BF16>) {
    return bf16_bits_stochastic(__float_as_uint(x), index_low(idx), stream);
  } else {
    return F::from_f(x);
  }
}

// N fp32 values rounded to format F and stored as 16-byte vectors at aligned `ptr`; `idx` is the
// first value's element index in its tensor (stochastic rounding's counter).
template <class F, bool SR, int N>
__device__ __forceinline__ void store_vec(typename F::S* ptr, const float* x, int64_t idx, uint32_t stream) {
#pragma unroll
  for (int v = 0; v < N / F::kVec; ++v) {
    if constexpr (F::kVec == 4) {
      *reinterpret_cast<float4*>(ptr + 4 * v) = make_float4(x[4 * v], x[4 * v + 1], x[4 * v + 2], x[4 * v + 3]);
    } else {
      uint16_t o[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = round_to<F, SR>(x[8 * v + j], idx + 8 * v + j, stream);
      uint4 w;
      w.x = o[0] | (static_cast<uint32_t>(o[1]) << 16);
      w.y = o[2] | (static_cast<uint32_t>(o[3]) << 16);
      w.z = o[4] | (static_cast<uint32_t>(o[5]) << 16);
      w.w = o[6] | (static_cast<uint32_t>(o[7]) << 16);
      *reinterpret_cast<uint4*>(ptr + 8 * v) = w;
    }
  }
}

// How a block's elements [0, len) are read: elements [head, vec_end) as vectors, the others one by
// one. Vectors need every list's address + head 16-byte aligned: when the lists are misaligned by
// the same amount (views into buffers at the same offset) a head of fewer than kVec elements gets
// them there; otherwise there are no vectors.
struct Split {
  int head;
  int vec_end;
};
template <class On>
__device__ __forceinline__ Split split_of(const int64_t* addr, int64_t start, int len) {
  using F0 = typename On::template Fmt<0>;
  const auto a0 = static_cast<uint64_t>(addr[0]) + static_cast<uint64_t>(start) * sizeof(typename F0::S);
  if ((a0 & (sizeof(typename F0::S) - 1)) != 0) return Split{0, 0};
  const int to_aligned = static_cast<int>(((16u - (a0 & 15u)) & 15u) / sizeof(typename F0::S));
  const int head = to_aligned < len ? to_aligned : len;
  bool aligned = true;
  static_for<On::L>([&](auto kc) {
    constexpr int K = decltype(kc)::value;
    using S = typename On::template Fmt<K>::S;
    const uint64_t a = static_cast<uint64_t>(addr[K]) + static_cast<uint64_t>(start + head) * sizeof(S);
    aligned = aligned && (a & 15u) == 0;
  });
  if (!aligned) return Split{0, 0};
  return Split{head, head + (len - head) / On::kVec * On::kVec};
}

// Visits the block's `len` elements from element `start` of each list, in fp32: op.vec(i, v) for the
// On::kVec elements from i (v[k][j]: list k, element i + j), op.one(i, x) for one element (i counts
// from `start`). Each thread loads kStage vectors (or kScalarStage elements) of every list before it
// hands any to `op`: an op that stores would otherwise wait for each load before the store after it.
// Every element is visited once, by one thread, in an order that depends only on len and the alignment.
template <class On, class Op>
__device__ __forceinline__ void sweep(const int64_t* addr, int64_t start, int len, Op& op) {
  constexpr int L = On::L, V = On::kVec, kStage = On::kStage, kScalarStage = On::kScalarStage;
  constexpr int kStep = kThreads * V;  // elements per vector pass of the whole block
  auto element = [&](int i, float (&x)[L]) {
    static_for<L>([&](auto kc) {
      constexpr int K = decltype(kc)::value;
      using F = typename On::template Fmt<K>;
      x[K] = F::to_f(global_ptr<const typename F::S>(addr[K], start)[i]);
    });
  };
  const Split split = split_of<On>(addr, start, len);
  if (static_cast<int>(threadIdx.x) < split.head) {
    float x[L];
    element(threadIdx.x, x);
    op.one(threadIdx.x, x);
  }
  int i = split.head + static_cast<int>(threadIdx.x) * V;
  for (; i + (kStage - 1) * kStep < split.vec_end; i += kStage * kStep) {
    float v[kStage][L][V];
#pragma unroll
    for (int s = 0; s < kStage; ++s) {
      static_for<L>([&](auto kc) {
        constexpr int K = decltype(kc)::value;
        using F = typename On::template Fmt<K>;
        load_vec<F, V>(global_ptr<const typename F::S>(addr[K], start + i + s * kStep), v[s][K]);
      });
    }
#pragma unroll
    for (int s = 0; s < kStage; ++s) op.vec(i + s * kStep, v[s]);
  }
  for (; i < split.vec_end; i += kStep) {
    float v[L][V];
    static_for<L>([&](auto kc) {
      constexpr int K = decltype(kc)::value;
      using F = typename On::template Fmt<K>;
      load_vec<F, V>(global_ptr<const typename F::S>(addr[K], start + i), v[K]);
    });
    op.vec(i, v);
  }
  int k = split.vec_end + static_cast<int>(threadIdx.x);
  for (; k + (kScalarStage - 1) * kThreads < len; k += kScalarStage * kThreads) {
    float x[kScalarStage][L];
#pragma unroll
    for (int s = 0; s < kScalarStage; ++s) element(k + s * kThreads, x[s]);
#pragma unroll
    for (int s = 0; s < kScalarStage; ++s) op.one(k + s * kThreads, x[s]);
  }
  for (; k < len; k += kThreads) {
    float x[L];
    element(k, x);
    op.one(k, x);
  }
}

// The body of pass On over one thread's elements: written lists stored, sum terms accumulated.
template <class On, bool SR>
struct PassOp {
  using Pass = typename On::Pass;
  static constexpr int L = On::L, W = On::W, S = On::S, V = On::kVec;
  typename Pass::Coef c;
  const int64_t* addr;
  int64_t start;    // the block's first element in its tensor (the stochastic rounding's index)
  uint32_t stream;  // the tensor's stochastic-rounding stream
  Vals<float, S> acc;

  __device__ __forceinline__ void vec(int i, float (&v)[L][V]) {
    float out[W > 0 ? W : 1][V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      Vals<float, L> x;
#pragma unroll
      for (int k = 0; k < L; ++k) x[k] = v[k][j];
      Pass::body(c, x, acc);
#pragma unroll
      for (int k = 0; k < W; ++k) out[k][j] = x[k];
    }
    static_for<W>([&](auto kc) {
      constexpr int K = decltype(kc)::value;
      using F = typename On::template Fmt<K>;
      store_vec<F, SR, V>(global_ptr<typename F::S>(addr[K], start + i), out[K], start + i, stream);
    });
  }
  __device__ __forceinline__ void one(int i, float (&v)[L]) {
    Vals<float, L> x;
#pragma unroll
    for (int k = 0; k < L; ++k) x[k] = v[k];
    Pass::body(c, x, acc);
    static_for<W>([&](auto kc) {
      constexpr int K = decltype(kc)::value;
      using F = typename On::template Fmt<K>;
      global_ptr<typename F::S>(addr[K], start)[i] = round_to<F, SR>(x[K], start + i, stream);
    });
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum of S values over the block, in a fixed order (deterministic); the result is in thread 0.
template <int S>
__device__ __forceinline__ void block_sum(Vals<float, S>& a) {
  __shared__ float sh[S > 0 ? S : 1][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int s = 0; s < S; ++s) a[s] = warp_sum(a[s]);
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) sh[s][warp] = a[s];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) a[s] = warp_sum(lane < kWarps ? sh[s][lane] : 0.f);
  }
  __syncthreads();
}

// One pass of Rule over a group. A pass that writes does nothing when found_inf is non-zero.
template <class Rule, int P, class Tr, bool SR>
__global__ void __launch_bounds__(kThreads, 2) pass_kernel(const int64_t* __restrict__ table, int64_t n,
                                                        StepArgs args, float* __restrict__ sums,
                                                        float* __restrict__ partials,
                                                        unsigned* __restrict__ counters,
                                                        const float* __restrict__ found_inf) {
  using On = PassOn<Rule, P, Tr, SR>;
  using Pass = typename On::Pass;
  constexpr int L = On::L, S = On::S;
  if (On::W > 0 && ((found_inf != nullptr && *found_inf != 0.f) || !lr_usable<Rule>(args.hyper))) return;
  const Slot<L> at = slot_of<L>(table, n);
  // The tensor's per-tensor scalars, read once per block (see read_scalar in engine.h).
  __shared__ float block_scalars[kMaxScalars];
  StepArgs a = args;
  const int scalars = Rule::scalars(args.flags);
  if (scalars > 0) {
    if (threadIdx.x == 0) {
      for (int k = 0; k < scalars; ++k)
        block_scalars[k] = __uint_as_float(atomicAdd(reinterpret_cast<unsigned*>(args.scalars[k] + at.t), 0u));
    }
    __syncthreads();
    a.block_scalars = block_scalars;
  }
  PassOp<On, SR> op;
  op.c = Pass::coefficients(a, at.t);
  // The tensor's per-tensor state, written once.
  if (at.block == 0 && threadIdx.x == 0) Pass::store(a, at.t, op.c);
  op.addr = at.addr;
  op.start = at.block * kCudaChunk;
  op.stream = SR ? sr_stream(*args.seed, at.t) : 0u;
#pragma unroll
  for (int s = 0; s < S; ++s) op.acc[s] = 0.f;
  const int64_t left = at.numel - op.start;
  const int len = static_cast<int>(left < kCudaChunk ? left : kCudaChunk);
  sweep<On>(at.addr, op.start, len, op);
  if constexpr (S > 0) {
    Vals<float, S> acc = op.acc;
    block_sum<S>(acc);
    float* row = sums + S * static_cast<int64_t>(at.t);
    if (at.blocks == 1) {
      if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < S; ++s) row[s] = acc[s];
      }
      return;
    }
    __shared__ bool last;
    if (threadIdx.x == 0) {
      float* out = partials + S * static_cast<int64_t>(blockIdx.x);
#pragma unroll
      for (int s = 0; s < S; ++s) out[s] = acc[s];
      __threadfence();
      const unsigned done = atomicAdd(&counters[at.t], 1u);
      last = done + 1 == static_cast<unsigned>(at.blocks);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float* part = partials + S * (static_cast<int64_t>(blockIdx.x) - at.block);
#pragma unroll
    for (int s = 0; s < S; ++s) acc[s] = 0.f;
    for (int64_t k = threadIdx.x; k < at.blocks; k += kThreads) {
#pragma unroll
      for (int s = 0; s < S; ++s) acc[s] += __ldcg(part + S * k + s);
    }
    block_sum<S>(acc);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int s = 0; s < S; ++s) row[s] = acc[s];
    }
  }
}

__global__ void round_bf16_kernel(const float* __restrict__ x, uint16_t* __restrict__ out, int64_t n,
                                  const int64_t* __restrict__ seed, int64_t tensor_index) {
  const uint32_t stream = sr_stream(*seed, tensor_index);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = bf16_bits_stochastic(__float_as_uint(x[i]), index_low(i), stream);
}

}  // namespace ff

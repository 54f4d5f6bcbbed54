// The CPU kernels of the engine: one generic pass over all tensors of a group for any pass of any
// rule (rules.h), and the CPU implementations of the engine's ops (their schemas are defined once,
// in fromage_fused/engine/ops.py; this file registers implementations and its test ops only).
//
// A pass is one parallel loop over all tensors of a group, cut into fixed chunks (so the summation
// order, hence the result, does not depend on the thread count); the threads get contiguous runs of
// chunks holding equal numbers of elements. Per-tensor coefficients are computed on the host first
// (the rule's __host__ __device__ function) and its per-tensor state written after the loop. Sums
// are fp32: each chunk sums leaves of kLeaf elements in vector lanes, and the chunk partials of a
// tensor are combined pairwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "numerics.h"

namespace ff {

using Vec = at::vec::Vectorized<float>;

// The rules' bodies on vectors of floats, declared before rules.h so that their templates find them.
// at::vec's operators are plain vector arithmetic, not fused: this file is compiled with
// -ffp-contract=off. The sums' vector loops use fused multiply-adds (fmadd), their scalar tails not.
inline void fma_acc(Vec& acc, const Vec& a, const Vec& b) { acc = at::vec::fmadd(a, b, acc); }
inline Vec mul_rn(const Vec& a, const Vec& b) { return a * b; }
inline Vec add_rn(const Vec& a, const Vec& b) { return a + b; }
inline Vec sub_rn(const Vec& a, const Vec& b) { return a - b; }
inline Vec div_rn(const Vec& a, const Vec& b) { return a / b; }
inline Vec sqrt_rn(const Vec& a) { return a.sqrt(); }
inline Vec positive(const Vec& a) { return Vec::blendv(Vec(0.f), Vec(1.f), a > Vec(0.f)); }

}  // namespace ff

#include "engine_checks.h"
#include "rules.h"

namespace ff {
namespace {

constexpr int64_t kChunk = 32768;     // elements per work item (and per fp32 partial)
constexpr int64_t kLeaf = 1024;       // elements summed into fresh vector accumulators
constexpr int64_t kRoundBlock = 256;  // bf16 results rounded per block (two vectorisable loops)

// The element type of list K of a pass: the parameters' dtype T, or float32 for a buffer.
template <class Pass, int K, class T>
using ListT = std::conditional_t<Pass::param_list(K), T, float>;

// Load / store 2 * Vec::size() elements as two float vectors.
template <typename T>
inline void load2(const T* x, Vec& lo, Vec& hi) {
  auto [a, b] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(x));
  lo = a;
  hi = b;
}
template <>
inline void load2<float>(const float* x, Vec& lo, Vec& hi) {
  lo = Vec::loadu(x);
  hi = Vec::loadu(x + Vec::size());
}
template <typename T>
inline void store2(T* x, const Vec& lo, const Vec& hi) {
  at::vec::convert_from_float<T>(lo, hi).store(x);
}
template <>
inline void store2<float>(float* x, const Vec& lo, const Vec& hi) {
  lo.store(x);
  hi.store(x + Vec::size());
}

inline float pairwise_sum(float* x, int64_t n) {
  for (int64_t width = 1; width < n; width *= 2)
    for (int64_t i = 0; i + width < n; i += 2 * width) x[i] += x[i + width];
  return n ? x[0] : 0.f;
}

inline float hsum(const Vec& v) {
  float buf[Vec::size()];
  v.store(buf);
  return pairwise_sum(buf, Vec::size());
}

inline float to_float(float x) { return x; }
inline float to_float(at::Half x) { return static_cast<float>(x); }
inline float to_float(at::BFloat16 x) {
  const uint32_t w = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

template <class T, class Pass>
constexpr bool writes_bf16() {
  if constexpr (!std::is_same_v<T, at::BFloat16>) {
    return false;
  } else {
    bool any = false;
    for (int k = 0; k < Pass::kWrites; ++k) any = any || Pass::param_list(k);
    return any;
  }
}

// One chunk of n elements (list k's first element at ptr[k]) in vector loops; kSums partials to out.
template <class Pass, class T, int... K>
void chunk_vec(const typename Pass::Coef& c, void* const* ptr, int64_t n, float* out,
               std::integer_sequence<int, K...>) {
  constexpr int L = Pass::kLists, S = Pass::kSums, W = Pass::kWrites;
  constexpr int64_t kStep = 2 * Vec::size();
  const int64_t nvec = n - n % kStep;
  Vals<Vec, S> total;
  for (int s = 0; s < S; ++s) total[s] = Vec(0.f);
  for (int64_t i = 0; i < nvec;) {
    const int64_t end = std::min(nvec, i + kLeaf);
    Vals<Vec, S> a0, a1;
    for (int s = 0; s < S; ++s) a0[s] = a1[s] = Vec(0.f);
    for (; i < end; i += kStep) {
      Vals<Vec, L> lo, hi;
      (load2(static_cast<const ListT<Pass, K, T>*>(ptr[K]) + i, lo[K], hi[K]), ...);
      Pass::body(c, lo, a0);
      Pass::body(c, hi, a1);
      (
          [&] {
            if constexpr (K < W) store2(static_cast<ListT<Pass, K, T>*>(ptr[K]) + i, lo[K], hi[K]);
          }(),
          ...);
    }
    for (int s = 0; s < S; ++s) total[s] = total[s] + (a0[s] + a1[s]);
  }
  Vals<float, S> tail;
  for (int s = 0; s < S; ++s) tail[s] = 0.f;
  for (int64_t i = nvec; i < n; ++i) {
    Vals<float, L> x;
    ((x[K] = to_float(static_cast<const ListT<Pass, K, T>*>(ptr[K])[i])), ...);
    Pass::body(c, x, tail);
    (
        [&] {
          if constexpr (K < W) static_cast<ListT<Pass, K, T>*>(ptr[K])[i] = static_cast<ListT<Pass, K, T>>(x[K]);
        }(),
        ...);
  }
  for (int s = 0; s < S; ++s) out[s] = hsum(total[s]) + tail[s];
}

// Store m fp32 results of written list K: bf16 by the shared integer recipe (to nearest, or
// stochastically with `stream`; `index0` is the flat index of the first), others by a cast.
template <class Pass, class T, bool SR, int K>
void store_results(void* const* ptr, const float* results, int64_t base, int64_t m, int64_t index0, uint32_t stream) {
  using E = ListT<Pass, K, T>;
  E* out = static_cast<E*>(ptr[K]) + base;
  if constexpr (std::is_same_v<E, at::BFloat16>) {
    uint16_t* bits_out = reinterpret_cast<uint16_t*>(out);
    uint32_t bits[kRoundBlock];
    std::memcpy(bits, results, static_cast<size_t>(m) * 4);
    if constexpr (SR) {
      const uint32_t idx0 = index_low(index0 + base);
      for (int64_t i = 0; i < m; ++i) bits_out[i] = bf16_bits_stochastic(bits[i], idx0 + static_cast<uint32_t>(i), stream);
    } else {
      for (int64_t i = 0; i < m; ++i) bits_out[i] = bf16_bits_rne(bits[i]);
    }
  } else {
    for (int64_t i = 0; i < m; ++i) out[i] = static_cast<E>(results[i]);
  }
}

// One chunk of a pass that writes bf16 lists: the body in scalar fp32 over a small block, then each
// written list rounded by the shared recipe rather than at::vec's conversion, whose NaN differs.
// `index0` is the flat index of the chunk's first element (stochastic rounding's counter).
template <class Pass, class T, bool SR, int... K>
void chunk_rounded(const typename Pass::Coef& c, void* const* ptr, int64_t n, float* out, int64_t index0,
                   uint32_t stream, std::integer_sequence<int, K...>) {
  constexpr int L = Pass::kLists, S = Pass::kSums, W = Pass::kWrites;
  float results[W > 0 ? W : 1][kRoundBlock];
  Vals<float, S> acc;
  for (int s = 0; s < S; ++s) acc[s] = 0.f;
  for (int64_t base = 0; base < n; base += kRoundBlock) {
    const int64_t m = std::min(kRoundBlock, n - base);
    for (int64_t i = 0; i < m; ++i) {
      Vals<float, L> x;
      ((x[K] = to_float(static_cast<const ListT<Pass, K, T>*>(ptr[K])[base + i])), ...);
      Pass::body(c, x, acc);
      (
          [&] {
            if constexpr (K < W) results[K][i] = x[K];
          }(),
          ...);
    }
    (
        [&] {
          if constexpr (K < W) store_results<Pass, T, SR, K>(ptr, results[K], base, m, index0, stream);
        }(),
        ...);
  }
  for (int s = 0; s < S; ++s) out[s] = acc[s];
}

struct Item {
  int32_t tensor;
  int64_t begin;
  int64_t len;
};

// The chunks of all tensors in order; first[t] is tensor t's first item; offset[k] the number of
// elements before item k.
struct WorkList {
  std::vector<Item> items;
  std::vector<int64_t> first;
  std::vector<int64_t> offset;
  int64_t total = 0;

  WorkList(const at::Tensor* tensors, int64_t n) {
    first.reserve(static_cast<size_t>(n) + 1);
    for (int64_t t = 0; t < n; ++t) {
      first.push_back(static_cast<int64_t>(items.size()));
      const int64_t numel = tensors[t].numel();
      for (int64_t b = 0; b < numel; b += kChunk) {
        items.push_back({static_cast<int32_t>(t), b, std::min(kChunk, numel - b)});
        offset.push_back(total);
        total += items.back().len;
      }
    }
    first.push_back(static_cast<int64_t>(items.size()));
  }

  // Runs fn(item_index) over all items, in parallel with equal numbers of elements per thread.
  template <typename Fn>
  void run(const Fn& fn) const {
    const int64_t n_items = static_cast<int64_t>(items.size());
    if (n_items == 0) return;
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, total / kChunk));
    if (threads <= 1) {
      for (int64_t k = 0; k < n_items; ++k) fn(k);
      return;
    }
    at::parallel_for(0, threads, 1, [&](int64_t tb, int64_t te) {
      const auto lo = std::lower_bound(offset.begin(), offset.end(), tb * total / threads) - offset.begin();
      const auto hi = std::lower_bound(offset.begin(), offset.end(), te * total / threads) - offset.begin();
      for (int64_t k = lo; k < hi; ++k) fn(k);
    });
  }
};

// The tensor lists of one pass: list k's n tensors start at lists[k].
template <int L>
struct Lists {
  const at::Tensor* lists[L > 0 ? L : 1];
  int64_t n;
};

template <class Rule, int P, class T>
at::Tensor run_pass(const Lists<Rule::template Pass<P>::kLists>& in, const StepArgs& args, bool skip) {
  using Pass = typename Rule::template Pass<P>;
  constexpr int L = Pass::kLists, S = Pass::kSums;
  const int64_t n = in.n;
  const at::Tensor& first_tensor = in.lists[0][0];
  auto sums = at::zeros({n, S}, first_tensor.options().dtype(at::kFloat));
  if (skip || n == 0) return sums;
  std::vector<typename Pass::Coef> coef;
  coef.reserve(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) coef.push_back(Pass::coefficients(args, t));
  WorkList work(in.lists[0], n);
  std::vector<float> partial(work.items.size() * static_cast<size_t>(S > 0 ? S : 1));
  std::vector<uint32_t> streams;
  const bool sr = args.seed != nullptr && std::is_same_v<T, at::BFloat16>;
  if (sr)
    for (int64_t t = 0; t < n; ++t) streams.push_back(sr_stream(*args.seed, t));
  const auto seq = std::make_integer_sequence<int, L>();
  work.run([&](int64_t k) {
    const Item& it = work.items[static_cast<size_t>(k)];
    void* ptr[L];
    for (int l = 0; l < L; ++l) {
      const at::Tensor& tensor = in.lists[l][it.tensor];
      ptr[l] = static_cast<char*>(tensor.data_ptr()) + it.begin * static_cast<int64_t>(tensor.element_size());
    }
    float* out = partial.data() + k * S;
    const auto& c = coef[static_cast<size_t>(it.tensor)];
    if constexpr (writes_bf16<T, Pass>()) {
      if (sr)
        chunk_rounded<Pass, T, true>(c, ptr, it.len, out, it.begin, streams[static_cast<size_t>(it.tensor)], seq);
      else
        chunk_rounded<Pass, T, false>(c, ptr, it.len, out, it.begin, 0u, seq);
    } else {
      chunk_vec<Pass, T>(c, ptr, it.len, out, seq);
    }
  });
  for (int64_t t = 0; t < n; ++t) Pass::store(args, t, coef[static_cast<size_t>(t)]);
  if constexpr (S > 0) {
    float* o = sums.data_ptr<float>();
    std::vector<float> column;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t b = work.first[static_cast<size_t>(t)], e = work.first[static_cast<size_t>(t) + 1];
      for (int s = 0; s < S; ++s) {
        column.clear();
        for (int64_t k = b; k < e; ++k) column.push_back(partial[static_cast<size_t>(k * S + s)]);
        o[S * t + s] = pairwise_sum(column.data(), e - b);
      }
    }
  }
  return sums;
}

// fn(std::integral_constant<int, P>{}) for the kernel pass P of Rule numbered kernel_index.
template <class Rule, int P = 0, class Fn>
auto with_kernel_pass(int64_t kernel_index, const Fn& fn) {
  if constexpr (P + 1 < Rule::kPasses) {
    if (kernel_index != P) return with_kernel_pass<Rule, P + 1>(kernel_index, fn);
  } else {
    TORCH_CHECK(kernel_index == P, "fromage_fused: rule ", Rule::kName, " has ", Rule::kPasses,
                " passes, got pass ", kernel_index);
  }
  return fn(std::integral_constant<int, P>{});
}

// Kernel pass P of Rule over tensors [t0, t1) of lists that check_pass has accepted for n tensors:
// list k's tensors from writes / reads at k * n + t0, the input sums `sums` (rows from sums_row),
// the per-tensor scalars from entry t0; the pass by dtype. Nothing is copied or checked again.
template <class Rule, int P>
at::Tensor run_block(at::TensorList writes, at::TensorList reads, int64_t n, int64_t t0, int64_t t1,
                     const std::optional<at::Tensor>& sums, int64_t sums_row, const at::Tensor& hyper, int64_t flags,
                     at::TensorList scalars, const std::optional<at::Tensor>& globals,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& seed, at::ScalarType dtype) {
  using Pass = typename Rule::template Pass<P>;
  constexpr int L = Pass::kLists, W = Pass::kWrites;
  Lists<L> in;
  in.n = t1 - t0;
  for (int k = 0; k < L; ++k) in.lists[k] = (k < W ? writes.data() + k * n : reads.data() + (k - W) * n) + t0;
  const PassShape shape{in.n, dtype, hyper.device()};
  StepArgs args = step_args<Rule, P>(sums, hyper, flags, scalars, globals, grad_scale, seed, shape);
  if (args.sums != nullptr) args.sums += sums_row * Pass::kSumsIn;
  for (auto& scalar : args.scalars)
    if (scalar != nullptr) scalar += t0;
  // A pass that writes leaves everything as it was on found_inf, or where the rule's lr is not
  // usable (a tensor lr edited after construction; host tensors: no synchronisation).
  const bool skip = W > 0 && ((found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.f) ||
                              !lr_usable<Rule>(args.hyper));
  switch (dtype) {
    case at::kFloat: return run_pass<Rule, P, float>(in, args, skip);
    case at::kBFloat16: return run_pass<Rule, P, at::BFloat16>(in, args, skip);
    default: return run_pass<Rule, P, at::Half>(in, args, skip);
  }
}

// What the op received, checked (engine_checks.h); then the pass over all of it.
template <class Rule, int P>
at::Tensor dispatch_pass(at::TensorList writes, at::TensorList reads, const std::optional<at::Tensor>& sums,
                         const at::Tensor& hyper, int64_t flags, at::TensorList scalars,
                         const std::optional<at::Tensor>& globals, const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& seed) {
  const PassShape shape = check_pass<Rule, P>(writes, reads, sums, hyper, flags, scalars, globals, found_inf, grad_scale,
                                              seed, c10::DeviceType::CPU);
  if (shape.n == 0) return at::zeros({0, Rule::template Pass<P>::kSums}, hyper.options());
  return run_block<Rule, P>(writes, reads, shape.n, 0, shape.n, sums, 0, hyper, flags, scalars, globals, found_inf,
                            grad_scale, seed, shape.dtype);
}

at::Tensor pass_cpu(c10::string_view rule, int64_t index, at::TensorList writes, at::TensorList reads,
                    const std::optional<at::Tensor>& sums, const at::Tensor& hyper, int64_t flags,
                    at::TensorList scalars, const std::optional<at::Tensor>& globals,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& seed, int64_t /*backend*/) {
  const std::string_view name(rule.data(), rule.size());
#define FF_DISPATCH(rule_name, Functor)                                                                         \
  if (name == rule_name)                                                                                        \
    return with_kernel_pass<Functor>(Functor::kernel_pass(index, flags), [&](auto p) {                          \
      return dispatch_pass<Functor, decltype(p)::value>(writes, reads, sums, hyper, flags, scalars, globals,    \
                                                        found_inf, grad_scale, seed);                           \
    });
  FF_RULES(FF_DISPATCH)
#undef FF_DISPATCH
  TORCH_CHECK(false, "fromage_fused: the native kernels have no rule ", name);
}

// pass_pair for one rule: both passes checked whole first, then the blocks.
template <class Rule>
at::Tensor pair_blocks(int64_t index, at::TensorList writes, at::TensorList reads, at::TensorList writes_next,
                       at::TensorList reads_next, const std::optional<at::Tensor>& sums, const at::Tensor& hyper,
                       int64_t flags, at::TensorList scalars, const std::optional<at::Tensor>& globals,
                       const std::optional<at::Tensor>& globals_next, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& grad_scale, int64_t block_bytes) {
  const int first = Rule::kernel_pass(index, flags), second = Rule::kernel_pass(index + 1, flags);
  constexpr auto cpu = c10::DeviceType::CPU;
  // Both passes checked whole before the first block is touched: a bad argument changes nothing.
  struct Checked {
    int64_t lists, width;  // the first pass's lists and sums
    PassShape shape;
  };
  const Checked checked = with_kernel_pass<Rule>(first, [&](auto p) {
    using Pass = typename Rule::template Pass<decltype(p)::value>;
    return Checked{Pass::kLists, Pass::kSums,
                   check_pass<Rule, decltype(p)::value>(writes, reads, sums, hyper, flags, scalars, globals, found_inf,
                                                        grad_scale, std::nullopt, cpu)};
  });
  const int64_t n = checked.shape.n, lists = checked.lists, width = checked.width;
  const at::ScalarType dtype = checked.shape.dtype;
  const std::optional<at::Tensor> sums_shape = at::empty({n, width}, hyper.options());  // only its shape is checked
  const int64_t n_next = with_kernel_pass<Rule>(second, [&](auto p) {
    return check_pass<Rule, decltype(p)::value>(writes_next, reads_next, sums_shape, hyper, flags, scalars,
                                                globals_next, found_inf, grad_scale, std::nullopt, cpu)
        .n;
  });
  TORCH_CHECK(n_next == n, "fromage_fused: pass_pair: the first pass has ", n, " tensors per list, the second ",
              n_next);
  if (n == 0) return at::zeros({0, width}, hyper.options());
  std::vector<at::Tensor> parts;
  for (int64_t t0 = 0, t1 = 0; t0 < n; t0 = t1) {
    int64_t bytes = 0;
    while (t1 < n && (t1 == t0 || bytes < block_bytes)) {
      for (int64_t k = 0; k < lists; ++k) {
        const size_t w = writes.size(), i = static_cast<size_t>(k * n + t1);
        const at::Tensor& t = i < w ? writes[i] : reads[i - w];
        bytes += t.numel() * static_cast<int64_t>(t.element_size());
      }
      ++t1;
    }
    std::optional<at::Tensor> block_sums = with_kernel_pass<Rule>(first, [&](auto p) {
      return run_block<Rule, decltype(p)::value>(writes, reads, n, t0, t1, sums, t0, hyper, flags, scalars, globals,
                                                 found_inf, grad_scale, std::nullopt, dtype);
    });
    with_kernel_pass<Rule>(second, [&](auto p) {
      return run_block<Rule, decltype(p)::value>(writes_next, reads_next, n, t0, t1, block_sums, 0, hyper, flags,
                                                 scalars, globals_next, found_inf, grad_scale, std::nullopt, dtype);
    });
    parts.push_back(*std::move(block_sums));
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts);
}

// Passes `index` and `index + 1` of one group, tensor block by tensor block: the second pass of a
// block runs right after the first, while the block's tensors are still in cache. A block is the
// next tensors until the first pass's lists of them hold `block_bytes` (at least one tensor). Only for
// a second pass that reads nothing but each tensor's own sums of the first (the executor checks: no
// all-reduce, no combining, no sums of its own) and without stochastic rounding; every tensor's sums
// and results are bit for bit those of the two passes one after the other, as the chunks, their order
// of summation and the coefficients are each tensor's own. Returns the first pass's sums.
at::Tensor pass_pair_cpu(c10::string_view rule, int64_t index, at::TensorList writes, at::TensorList reads,
                         at::TensorList writes_next, at::TensorList reads_next, const std::optional<at::Tensor>& sums,
                         const at::Tensor& hyper, int64_t flags, at::TensorList scalars,
                         const std::optional<at::Tensor>& globals, const std::optional<at::Tensor>& globals_next,
                         const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_scale,
                         int64_t block_bytes) {
  const std::string_view name(rule.data(), rule.size());
#define FF_PAIR(rule_name, Functor)                                                                           \
  if (name == rule_name)                                                                                      \
    return pair_blocks<Functor>(index, writes, reads, writes_next, reads_next, sums, hyper, flags, scalars, \
                                globals, globals_next, found_inf, grad_scale, block_bytes);
  FF_RULES(FF_PAIR)
#undef FF_PAIR
  TORCH_CHECK(false, "fromage_fused: the native kernels have no rule ", name);
}

// Expose the element roundings used by the kernels, for bit-exact tests of the recipe.
at::Tensor round_bf16_stochastic_cpu(const at::Tensor& x, const at::Tensor& seed, int64_t tensor_index) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fromage_fused: round_bf16_stochastic takes float32");
  check_scalar("seed", seed, at::kLong, x.device());
  const auto src = x.contiguous();
  auto out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const uint32_t stream = sr_stream(seed.item<int64_t>(), tensor_index);
  const float* in = src.const_data_ptr<float>();
  auto* o = out.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < src.numel(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &in[i], sizeof bits);
    o[i] = at::BFloat16(bf16_bits_stochastic(bits, index_low(i), stream), at::BFloat16::from_bits());
  }
  return out;
}

at::Tensor round_bf16_nearest_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fromage_fused: round_bf16_nearest takes float32");
  const auto src = x.contiguous();
  auto out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const float* in = src.const_data_ptr<float>();
  auto* o = out.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < src.numel(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &in[i], sizeof bits);
    o[i] = at::BFloat16(bf16_bits_rne(bits), at::BFloat16::from_bits());
  }
  return out;
}

// pass_ writes its tensors through raw pointers, below autograd: like torch's own in-place ops (and
// fused optimizers), it bumps the version counters of what its schema says it mutates (the written
// lists and the per-tensor scalars), so that a backward that saved one of them before the step
// raises "modified by an inplace operation" instead of using new values. Registered for
// ADInplaceOrView, it serves every device's kernel. (Inference tensors have no version counter.)
void bump_version(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

at::Tensor pass_inplace_or_view(c10::string_view rule, int64_t index, at::TensorList writes, at::TensorList reads,
                                const std::optional<at::Tensor>& sums, const at::Tensor& hyper, int64_t flags,
                                at::TensorList scalars, const std::optional<at::Tensor>& globals,
                                const std::optional<at::Tensor>& found_inf,
                                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& seed,
                                int64_t backend) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fromage_fused::pass_", "")
                             .typed<decltype(pass_cpu)>();
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(rule, index, writes, reads, sums, hyper, flags, scalars, globals, found_inf, grad_scale, seed,
                  backend);
  }
  for (const auto& t : writes) bump_version(t);
  for (const auto& t : scalars) bump_version(t);
  return out;
}

at::Tensor pass_pair_inplace_or_view(c10::string_view rule, int64_t index, at::TensorList writes, at::TensorList reads,
                                     at::TensorList writes_next, at::TensorList reads_next,
                                     const std::optional<at::Tensor>& sums, const at::Tensor& hyper, int64_t flags,
                                     at::TensorList scalars, const std::optional<at::Tensor>& globals,
                                     const std::optional<at::Tensor>& globals_next,
                                     const std::optional<at::Tensor>& found_inf,
                                     const std::optional<at::Tensor>& grad_scale, int64_t block_bytes) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fromage_fused::pass_pair", "")
                             .typed<decltype(pass_pair_cpu)>();
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(rule, index, writes, reads, writes_next, reads_next, sums, hyper, flags, scalars, globals,
                  globals_next, found_inf, grad_scale, block_bytes);
  }
  for (const auto& t : writes) bump_version(t);
  for (const auto& t : writes_next) bump_version(t);
  for (const auto& t : scalars) bump_version(t);
  return out;
}

// How many threads at::parallel_for runs a body on (1 when the extension was built without
// OpenMP, whatever torch's thread count): lets a test check that the kernels use torch's threads.
int64_t parallel_width() {
  std::atomic<int64_t> bodies{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { ++bodies; });
  return bodies.load();
}

}  // namespace
}  // namespace ff

// The engine's ops pass_ and pass_pair are defined in fromage_fused/engine/ops.py; the test ops here.
TORCH_LIBRARY_FRAGMENT(fromage_fused, m) {
  m.def("round_bf16_stochastic(Tensor x, Tensor seed, int tensor_index) -> Tensor");
  m.def("round_bf16_nearest(Tensor x) -> Tensor");
  m.def("parallel_width() -> int", &ff::parallel_width);
}

TORCH_LIBRARY_IMPL(fromage_fused, ADInplaceOrView, m) {
  m.impl("pass_", &ff::pass_inplace_or_view);
  m.impl("pass_pair", &ff::pass_pair_inplace_or_view);
}

TORCH_LIBRARY_IMPL(fromage_fused, CPU, m) {
  m.impl("pass_", &ff::pass_cpu);
  m.impl("pass_pair", &ff::pass_pair_cpu);
  m.impl("round_bf16_stochastic", &ff::round_bf16_stochastic_cpu);
  m.impl("round_bf16_nearest", &ff::round_bf16_nearest_cpu);
}

// CPU kernels of the two-phase Fromage step and the definition of the ops (torch.library).
//
// Each phase is one parallel pass over all tensors of a group. The tensors are cut into fixed
// chunks (so the summation order, hence the result, does not depend on the thread count); the
// threads get contiguous runs of chunks holding equal numbers of elements. Sums are fp32: each
// chunk sums leaves of kLeaf elements in vector lanes, and the chunk partials of a tensor are
// combined pairwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "fromage_checks.h"
#include "fromage_common.h"

namespace ff {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 32768;  // elements per work item (and per fp32 partial)
constexpr int64_t kLeaf = 1024;    // elements summed into fresh vector accumulators

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

template <typename T>
void chunk_stats(const T* p, const T* g, int64_t n, bool inner, float* out) {
  constexpr int64_t K = 2 * Vec::size();
  const int64_t nvec = n - n % K;
  Vec tpp(0.f), tgg(0.f), tpg(0.f);
  for (int64_t i = 0; i < nvec;) {
    const int64_t end = std::min(nvec, i + kLeaf);
    Vec pp0(0.f), pp1(0.f), gg0(0.f), gg1(0.f), pg0(0.f), pg1(0.f);
    for (; i < end; i += K) {
      Vec p0, p1, g0, g1;
      load2(p + i, p0, p1);
      load2(g + i, g0, g1);
      pp0 = at::vec::fmadd(p0, p0, pp0);
      pp1 = at::vec::fmadd(p1, p1, pp1);
      gg0 = at::vec::fmadd(g0, g0, gg0);
      gg1 = at::vec::fmadd(g1, g1, gg1);
      if (inner) {
        pg0 = at::vec::fmadd(p0, g0, pg0);
        pg1 = at::vec::fmadd(p1, g1, pg1);
      }
    }
    tpp = tpp + (pp0 + pp1);
    tgg = tgg + (gg0 + gg1);
    tpg = tpg + (pg0 + pg1);
  }
  float spp = 0.f, sgg = 0.f, spg = 0.f;
  for (int64_t i = nvec; i < n; ++i) {
    const float pf = static_cast<float>(p[i]), gf = static_cast<float>(g[i]);
    spp += pf * pf;
    sgg += gf * gf;
    spg += pf * gf;
  }
  out[0] = hsum(tpp) + spp;
  out[1] = hsum(tgg) + sgg;
  out[2] = inner ? hsum(tpg) + spg : 0.f;
}

// fp32 and fp16: p <- round(round(cp * p) + round(cg * g)) (ff::update), vectorised. The
// operators of at::vec are plain vector arithmetic, not fused: this file is compiled with
// -ffp-contract=off.
template <typename T>
void chunk_apply(T* p, const T* g, int64_t n, const Coef& c) {
  constexpr int64_t K = 2 * Vec::size();
  const int64_t nvec = n - n % K;
  const Vec vcp(c.cp), vcg(c.cg);
  for (int64_t i = 0; i < nvec; i += K) {
    Vec p0, p1, g0, g1;
    load2(p + i, p0, p1);
    load2(g + i, g0, g1);
    store2(p + i, vcp * p0 + vcg * g0, vcp * p1 + vcg * g1);
  }
  for (int64_t i = nvec; i < n; ++i)
    p[i] = static_cast<T>(update(c, static_cast<float>(p[i]), static_cast<float>(g[i])));
}

// bf16: the same fp32 result, rounded by the shared integer recipe (to nearest, or stochastically
// with `stream`; `first` is the flat index of p[0]) rather than by at::vec's conversion, whose NaN
// differs. Two branch-free loops over a small block, so that the compiler vectorises both.
template <bool SR>
void chunk_apply_bf16(at::BFloat16* p, const at::BFloat16* g, int64_t n, const Coef& c, int64_t first,
                      uint32_t stream) {
  constexpr int64_t kBlock = 256;
  uint32_t bits[kBlock];
  for (int64_t base = 0; base < n; base += kBlock) {
    const int64_t m = std::min(kBlock, n - base);
    const uint16_t* pb = reinterpret_cast<const uint16_t*>(p + base);
    const uint16_t* gb = reinterpret_cast<const uint16_t*>(g + base);
    for (int64_t i = 0; i < m; ++i) {
      float pf, gf;
      const uint32_t pw = static_cast<uint32_t>(pb[i]) << 16, gw = static_cast<uint32_t>(gb[i]) << 16;
      std::memcpy(&pf, &pw, 4);
      std::memcpy(&gf, &gw, 4);
      const float r = update(c, pf, gf);
      std::memcpy(&bits[i], &r, 4);
    }
    uint16_t* out = reinterpret_cast<uint16_t*>(p + base);
    if constexpr (SR) {
      const uint32_t idx0 = index_low(first + base);
      for (int64_t i = 0; i < m; ++i) out[i] = bf16_bits_stochastic(bits[i], idx0 + static_cast<uint32_t>(i), stream);
    } else {
      for (int64_t i = 0; i < m; ++i) out[i] = bf16_bits_rne(bits[i]);
    }
  }
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

  explicit WorkList(at::TensorList tensors) {
    first.reserve(tensors.size() + 1);
    for (size_t t = 0; t < tensors.size(); ++t) {
      first.push_back(static_cast<int64_t>(items.size()));
      const int64_t n = tensors[t].numel();
      for (int64_t b = 0; b < n; b += kChunk) {
        items.push_back({static_cast<int32_t>(t), b, std::min(kChunk, n - b)});
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

template <typename T>
at::Tensor stats_impl(at::TensorList params, at::TensorList grads, bool inner) {
  const int64_t n = static_cast<int64_t>(params.size());
  auto out = at::zeros({n, 3}, params[0].options().dtype(at::kFloat));
  WorkList work(params);
  std::vector<float> partial(work.items.size() * 3);
  work.run([&](int64_t k) {
    const Item& it = work.items[k];
    const T* p = params[it.tensor].const_data_ptr<T>() + it.begin;
    const T* g = grads[it.tensor].const_data_ptr<T>() + it.begin;
    chunk_stats(p, g, it.len, inner, &partial[3 * k]);
  });
  float* o = out.data_ptr<float>();
  std::vector<float> column;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t b = work.first[t], e = work.first[t + 1];
    for (int c = 0; c < 3; ++c) {
      column.clear();
      for (int64_t k = b; k < e; ++k) column.push_back(partial[3 * k + c]);
      o[3 * t + c] = pairwise_sum(column.data(), e - b);
    }
  }
  return out;
}

at::Tensor stats_cpu(at::TensorList params, at::TensorList grads, bool inner) {
  check_lists(params, grads, c10::DeviceType::CPU);
  if (params.empty()) return at::zeros({0, 3}, at::kFloat);
  switch (params[0].scalar_type()) {
    case at::kFloat: return stats_impl<float>(params, grads, inner);
    case at::kBFloat16: return stats_impl<at::BFloat16>(params, grads, inner);
    default: return stats_impl<at::Half>(params, grads, inner);
  }
}

template <typename T>
void apply_impl(at::TensorList params, at::TensorList grads, const std::vector<Coef>& coef, const int64_t* seed) {
  WorkList work(params);
  std::vector<uint32_t> streams;
  if (seed != nullptr)
    for (size_t t = 0; t < params.size(); ++t) streams.push_back(sr_stream(*seed, static_cast<int64_t>(t)));
  work.run([&](int64_t k) {
    const Item& it = work.items[k];
    T* p = params[it.tensor].data_ptr<T>() + it.begin;
    const T* g = grads[it.tensor].const_data_ptr<T>() + it.begin;
    const Coef& c = coef[it.tensor];
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (seed != nullptr)
        chunk_apply_bf16<true>(p, g, it.len, c, it.begin, streams[it.tensor]);
      else
        chunk_apply_bf16<false>(p, g, it.len, c, it.begin, 0u);
    } else {
      chunk_apply(p, g, it.len, c);
    }
  });
}

void apply_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& stats, const at::Tensor& lr,
               const std::optional<at::Tensor>& max_norm, std::optional<double> p_bound, bool maximize,
               bool prefactor, const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& sr_seed) {
  check_apply(params, grads, stats, lr, max_norm, p_bound, found_inf, grad_scale, sr_seed, c10::DeviceType::CPU);
  if (params.empty()) return;
  if (found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.f) return;
  const int64_t n = static_cast<int64_t>(params.size());
  const float lr_v = *lr.const_data_ptr<float>();
  if (!usable_lr(lr_v)) return;
  const float scale = grad_scale.has_value() ? *grad_scale->const_data_ptr<float>() : 1.f;
  const float* s = stats.const_data_ptr<float>();
  const bool bounded = p_bound.has_value();
  float* mn = bounded ? max_norm->data_ptr<float>() : nullptr;
  std::vector<Coef> coef(n);
  for (int64_t t = 0; t < n; ++t) {
    const float old = bounded ? mn[t] : 0.f;
    coef[t] = coefficients(s[3 * t], s[3 * t + 1], s[3 * t + 2], lr_v, scale, grad_scale.has_value(), bounded,
                           bounded ? static_cast<float>(*p_bound) : 0.f, old, maximize, prefactor);
  }
  const bool sr = sr_seed.has_value() && params[0].scalar_type() == at::kBFloat16;
  const int64_t seed = sr ? *sr_seed->const_data_ptr<int64_t>() : 0;
  switch (params[0].scalar_type()) {
    case at::kFloat: apply_impl<float>(params, grads, coef, nullptr); break;
    case at::kBFloat16: apply_impl<at::BFloat16>(params, grads, coef, sr ? &seed : nullptr); break;
    default: apply_impl<at::Half>(params, grads, coef, nullptr); break;
  }
  if (bounded)
    for (int64_t t = 0; t < n; ++t) mn[t] = coef[t].max_norm;
}

// Expose the element roundings used by the apply kernels, for bit-exact tests of the recipe.
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

// apply_ writes its tensors through raw pointers, below autograd: like torch's own in-place ops
// (and fused optimizers), it bumps their version counters here, so that a backward that saved one
// of them before the step raises "modified by an inplace operation" instead of using new values.
// Registered for ADInplaceOrView, it serves every device's kernel. (Inference tensors have no
// version counter.)
void bump_version(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

void apply_inplace_or_view(at::TensorList params, at::TensorList grads, const at::Tensor& stats, const at::Tensor& lr,
                           const std::optional<at::Tensor>& max_norm, std::optional<double> p_bound, bool maximize,
                           bool prefactor, const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& sr_seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fromage_fused::apply_", "")
                             .typed<decltype(apply_cpu)>();
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(params, grads, stats, lr, max_norm, p_bound, maximize, prefactor, found_inf, grad_scale, sr_seed);
  }
  for (const auto& p : params) bump_version(p);
  if (max_norm.has_value()) bump_version(*max_norm);
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

TORCH_LIBRARY(fromage_fused, m) {
  m.def("stats(Tensor[] params, Tensor[] grads, bool inner) -> Tensor");
  m.def(
      "apply_(Tensor(a!)[] params, Tensor[] grads, Tensor stats, Tensor lr, Tensor(b!)? max_norm, float? p_bound, "
      "bool maximize, bool prefactor, Tensor? found_inf, Tensor? grad_scale, Tensor? sr_seed) -> ()");
  m.def("round_bf16_stochastic(Tensor x, Tensor seed, int tensor_index) -> Tensor");
  m.def("round_bf16_nearest(Tensor x) -> Tensor");
  m.def("parallel_width() -> int", &ff::parallel_width);
}

TORCH_LIBRARY_IMPL(fromage_fused, ADInplaceOrView, m) {
  m.impl("apply_", &ff::apply_inplace_or_view);
}

TORCH_LIBRARY_IMPL(fromage_fused, CPU, m) {
  m.impl("stats", &ff::stats_cpu);
  m.impl("apply_", &ff::apply_cpu);
  m.impl("round_bf16_stochastic", &ff::round_bf16_stochastic_cpu);
  m.impl("round_bf16_nearest", &ff::round_bf16_nearest_cpu);
}

// torch glue of the CUDA kernels: validation, workspace from torch's allocator, the current stream
// under a device guard, and the CUDA registrations of the ops defined in fromage_cpu.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "fromage_checks.h"
#include "fromage_cuda.h"

namespace ff {
namespace {

DType dtype_of(at::ScalarType t) {
  return t == at::kFloat ? DType::F32 : (t == at::kBFloat16 ? DType::BF16 : DType::F16);
}

std::vector<TensorRef> refs(at::TensorList params, at::TensorList grads, at::TensorList max_norms) {
  std::vector<TensorRef> out(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    out[i].p = params[i].data_ptr();
    out[i].g = grads[i].data_ptr();
    out[i].max_norm = max_norms.empty() ? nullptr : max_norms[i].data_ptr<float>();
    out[i].numel = params[i].numel();
  }
  return out;
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "fromage_fused: CUDA ", what, " launch failed: ", cuda_error_string(err));
}

at::Tensor stats_cuda(at::TensorList params, at::TensorList grads, bool inner) {
  check_lists(params, grads, c10::DeviceType::CUDA);
  if (params.empty()) return at::zeros({0, 3}, at::kFloat);
  c10::cuda::CUDAGuard guard(params[0].device());
  const int64_t n = static_cast<int64_t>(params.size());
  const auto r = refs(params, grads, {});
  const auto opts = params[0].options().dtype(at::kFloat);
  auto stats = at::empty({n, 3}, opts);
  auto partials = at::empty({3 * cuda_total_chunks(r.data(), n)}, opts);
  auto counters = at::zeros({n}, opts.dtype(at::kInt));
  check_launch(cuda_stats(r.data(), n, dtype_of(params[0].scalar_type()), inner, stats.data_ptr<float>(),
                          partials.data_ptr<float>(), reinterpret_cast<unsigned*>(counters.data_ptr<int32_t>()),
                          c10::cuda::getCurrentCUDAStream().stream()),
               "stats");
  return stats;
}

void apply_cuda(at::TensorList params, at::TensorList grads, const at::Tensor& stats, const at::Tensor& lr,
                at::TensorList max_norms, std::optional<double> p_bound, bool maximize, bool prefactor,
                const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& sr_seed) {
  check_apply(params, grads, stats, lr, max_norms, p_bound, found_inf, grad_scale, sr_seed, c10::DeviceType::CUDA);
  if (params.empty()) return;
  c10::cuda::CUDAGuard guard(params[0].device());
  const int64_t n = static_cast<int64_t>(params.size());
  const auto r = refs(params, grads, p_bound.has_value() ? max_norms : at::TensorList());
  const bool sr = sr_seed.has_value() && params[0].scalar_type() == at::kBFloat16;
  check_launch(cuda_apply(r.data(), n, dtype_of(params[0].scalar_type()), stats.const_data_ptr<float>(),
                          lr.const_data_ptr<float>(), found_inf ? found_inf->const_data_ptr<float>() : nullptr,
                          grad_scale ? grad_scale->const_data_ptr<float>() : nullptr,
                          sr ? sr_seed->const_data_ptr<int64_t>() : nullptr, p_bound.has_value(),
                          static_cast<float>(p_bound.value_or(0.0)), maximize, prefactor,
                          c10::cuda::getCurrentCUDAStream().stream()),
               "apply");
}

at::Tensor round_bf16_stochastic_cuda(const at::Tensor& x, const at::Tensor& seed, int64_t tensor_index) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fromage_fused: round_bf16_stochastic takes float32");
  check_scalar("seed", seed, at::kLong, x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const auto src = x.contiguous();
  auto out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  check_launch(cuda_round_bf16_stochastic(src.const_data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()),
                                          src.numel(), seed.const_data_ptr<int64_t>(), tensor_index,
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "round_bf16_stochastic");
  return out;
}

}  // namespace
}  // namespace ff

TORCH_LIBRARY_IMPL(fromage_fused, CUDA, m) {
  m.impl("stats", &ff::stats_cuda);
  m.impl("apply_", &ff::apply_cuda);
  m.impl("round_bf16_stochastic", &ff::round_bf16_stochastic_cuda);
}

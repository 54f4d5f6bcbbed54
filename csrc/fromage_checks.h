// Argument validation shared by the CPU and CUDA implementations of the ops: everything is checked
// before any tensor is written, so a rejected call changes nothing.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace ff {

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_scalar(const char* what, const at::Tensor& t, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1, "fromage_fused: ", what, " must have one element, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fromage_fused: ", what, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, "fromage_fused: ", what, " is on ", t.device(), " but the tensors are on ", device);
}

inline void check_lists(at::TensorList params, at::TensorList grads, c10::DeviceType type) {
  TORCH_CHECK(params.size() == grads.size(), "fromage_fused: got ", params.size(), " parameters but ", grads.size(),
              " gradients");
  if (params.empty()) return;
  const auto dtype = params[0].scalar_type();
  const auto device = params[0].device();
  TORCH_CHECK(supported_dtype(dtype), "fromage_fused native kernels take float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(device.type() == type, "fromage_fused: this kernel takes ", type, " tensors, got ", device);
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    const auto& g = grads[i];
    TORCH_CHECK(p.scalar_type() == dtype && g.scalar_type() == dtype, "fromage_fused: tensor ", i, " is ",
                p.scalar_type(), "/", g.scalar_type(), " but the group is ", dtype);
    TORCH_CHECK(p.device() == device && g.device() == device, "fromage_fused: tensor ", i, " is on ", p.device(), "/",
                g.device(), " but the group is on ", device);
    TORCH_CHECK(p.numel() == g.numel(), "fromage_fused: parameter ", i, " has ", p.numel(), " elements, its gradient ",
                g.numel());
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous(), "fromage_fused: tensor ", i,
                " is not contiguous; the native kernels take contiguous tensors");
  }
}

inline void check_apply(at::TensorList params, at::TensorList grads, const at::Tensor& stats, const at::Tensor& lr,
                        const std::optional<at::Tensor>& max_norm, std::optional<double> p_bound,
                        const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& sr_seed, c10::DeviceType type) {
  check_lists(params, grads, type);
  if (params.empty()) return;
  const auto device = params[0].device();
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == 3, "fromage_fused: stats must be [", n,
              ", 3], got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.device() == device && stats.is_contiguous(),
              "fromage_fused: stats must be a contiguous float32 tensor on ", device);
  check_scalar("lr", lr, at::kFloat, device);
  TORCH_CHECK(max_norm.has_value() || !p_bound.has_value(), "fromage_fused: p_bound is set: pass the max_norm tensor");
  if (max_norm.has_value()) {
    const auto& m = *max_norm;
    TORCH_CHECK(m.dim() == 1 && m.size(0) == n, "fromage_fused: max_norm must be [", n, "], got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.device() == device && m.is_contiguous(),
                "fromage_fused: max_norm must be a contiguous float32 tensor on ", device);
  }
  if (found_inf.has_value()) check_scalar("found_inf", *found_inf, at::kFloat, device);
  if (grad_scale.has_value()) check_scalar("grad_scale", *grad_scale, at::kFloat, device);
  if (sr_seed.has_value()) check_scalar("sr_seed", *sr_seed, at::kLong, device);
}

}  // namespace ff

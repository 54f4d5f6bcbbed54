// Argument validation of the engine's ops, shared by the CPU and CUDA implementations: everything is
// checked before any tensor is written, so a rejected call changes nothing. Generic over the rule
// (its pass says how many lists, written lists, sums, scalars and global values it takes).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "engine.h"

namespace ff {

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_scalar(const char* what, const at::Tensor& t, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1, "fromage_fused: ", what, " must have one element, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fromage_fused: ", what, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, "fromage_fused: ", what, " is on ", t.device(), " but the tensors are on ", device);
}

inline void check_vector(const char* what, const at::Tensor& t, int64_t n, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "fromage_fused: ", what, " must be [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device() == device && t.is_contiguous(), "fromage_fused: ", what,
              " must be a contiguous float32 tensor on ", device);
}

struct PassShape {
  int64_t n;             // tensors per list
  at::ScalarType dtype;  // the parameters'
  at::Device device;
};

// The lists of pass P: kLists lists of n tensors, the written ones in `writes`, the others in `reads`.
template <class Rule, int P>
PassShape check_lists(at::TensorList writes, at::TensorList reads, c10::DeviceType type) {
  using Pass = typename Rule::template Pass<P>;
  constexpr int L = Pass::kLists, W = Pass::kWrites;
  const int64_t n = W > 0 ? static_cast<int64_t>(writes.size()) / W : static_cast<int64_t>(reads.size()) / (L - W);
  TORCH_CHECK(static_cast<int64_t>(writes.size()) == W * n && static_cast<int64_t>(reads.size()) == (L - W) * n,
              "fromage_fused: pass ", P, " of ", Rule::kName, " takes ", W, " written and ", L - W,
              " read lists of equal length, got ", writes.size(), " and ", reads.size(), " tensors");
  auto tensor = [&](int k, int64_t t) -> const at::Tensor& {
    return k < W ? writes[static_cast<size_t>(k * n + t)] : reads[static_cast<size_t>((k - W) * n + t)];
  };
  if (n == 0) return PassShape{0, at::kFloat, at::Device(type)};
  int param = 0;
  while (!Pass::param_list(param)) ++param;
  const auto dtype = tensor(param, 0).scalar_type();
  const auto device = tensor(param, 0).device();
  TORCH_CHECK(supported_dtype(dtype), "fromage_fused native kernels take float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(device.type() == type, "fromage_fused: this kernel takes ", type, " tensors, got ", device);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t numel = tensor(0, t).numel();
    for (int k = 0; k < L; ++k) {
      const at::Tensor& x = tensor(k, t);
      const auto want = Pass::param_list(k) ? dtype : at::kFloat;
      TORCH_CHECK(x.scalar_type() == want, "fromage_fused: tensor ", t, " of list ", k, " is ", x.scalar_type(),
                  " but the group is ", dtype, Pass::param_list(k) ? "" : " (buffers: float32)");
      TORCH_CHECK(x.device() == device, "fromage_fused: tensor ", t, " of list ", k, " is on ", x.device(),
                  " but the group is on ", device);
      TORCH_CHECK(x.numel() == numel, "fromage_fused: tensor ", t, " has ", numel, " elements in list 0 but ",
                  x.numel(), " in list ", k);
      TORCH_CHECK(x.is_contiguous(), "fromage_fused: tensor ", t, " of list ", k,
                  " is not contiguous; the native kernels take contiguous tensors");
    }
  }
  return PassShape{n, dtype, device};
}

// Everything else a pass takes, against the lists' shape.
template <class Rule, int P>
PassShape check_pass(at::TensorList writes, at::TensorList reads, const std::optional<at::Tensor>& sums,
                     const at::Tensor& hyper, int64_t flags, at::TensorList scalars,
                     const std::optional<at::Tensor>& globals, const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& seed,
                     c10::DeviceType type) {
  using Pass = typename Rule::template Pass<P>;
  const PassShape shape = check_lists<Rule, P>(writes, reads, type);
  const int64_t n = shape.n;
  if (n == 0) return shape;
  const auto& device = shape.device;
  if (Pass::kSumsIn > 0) {
    TORCH_CHECK(sums.has_value(), "fromage_fused: pass ", P, " of ", Rule::kName, " reads the previous pass's stats");
    const auto& s = *sums;
    TORCH_CHECK(s.dim() == 2 && s.size(0) == n && s.size(1) == Pass::kSumsIn, "fromage_fused: stats must be [", n,
                ", ", Pass::kSumsIn, "], got ", s.sizes());
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.device() == device && s.is_contiguous(),
                "fromage_fused: stats must be a contiguous float32 tensor on ", device);
  }
  TORCH_CHECK(hyper.dim() == 1 && hyper.numel() >= Rule::kHyper && hyper.scalar_type() == at::kFloat &&
                  hyper.device() == device && hyper.is_contiguous(),
              "fromage_fused: hyper (the packed hyper-parameters; lr must be among them) must be a contiguous "
              "float32 tensor of ", Rule::kHyper, " values on ", device, ", got ", hyper.scalar_type(), " ",
              hyper.sizes(), " on ", hyper.device());
  const int64_t want = Rule::scalars(flags);
  TORCH_CHECK(static_cast<int64_t>(scalars.size()) == want, "fromage_fused: these options of ", Rule::kName, " need ",
              want, " per-tensor state tensors (", Rule::kScalarNames[0], "...), got ", scalars.size(),
              want > 0 ? ": pass the " : "", want > 0 ? Rule::kScalarNames[0] : "", want > 0 ? " tensor" : "");
  for (int64_t j = 0; j < want; ++j) check_vector(Rule::kScalarNames[j], scalars[static_cast<size_t>(j)], n, device);
  if (Pass::kGlobals > 0) {
    TORCH_CHECK(globals.has_value() && globals->numel() >= Pass::kGlobals && globals->scalar_type() == at::kFloat &&
                    globals->device() == device && globals->is_contiguous(),
                "fromage_fused: pass ", P, " of ", Rule::kName, " reads ", Pass::kGlobals,
                " global float32 values on ", device);
  }
  if (found_inf.has_value()) check_scalar("found_inf", *found_inf, at::kFloat, device);
  if (grad_scale.has_value()) check_scalar("grad_scale", *grad_scale, at::kFloat, device);
  if (seed.has_value()) check_scalar("sr_seed", *seed, at::kLong, device);
  return shape;
}

// The arguments every tensor's coefficients read, as pointers (host or device memory).
template <class Rule, int P>
StepArgs step_args(const std::optional<at::Tensor>& sums, const at::Tensor& hyper, int64_t flags,
                   at::TensorList scalars, const std::optional<at::Tensor>& globals,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& seed,
                   const PassShape& shape) {
  using Pass = typename Rule::template Pass<P>;
  StepArgs a;
  a.hyper = hyper.const_data_ptr<float>();
  a.flags = flags;
  a.sums = Pass::kSumsIn > 0 ? sums->const_data_ptr<float>() : nullptr;
  a.globals = Pass::kGlobals > 0 ? globals->const_data_ptr<float>() : nullptr;
  a.grad_scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  const bool bf16 = shape.dtype == at::kBFloat16;
  a.seed = seed.has_value() && bf16 ? seed->const_data_ptr<int64_t>() : nullptr;
  for (size_t j = 0; j < scalars.size() && j < static_cast<size_t>(kMaxScalars); ++j)
    a.scalars[j] = scalars[j].data_ptr<float>();
  a.n = shape.n;
  return a;
}

}  // namespace ff

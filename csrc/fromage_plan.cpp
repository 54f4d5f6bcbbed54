// Per-step revalidation of the optimizer's step plan (fromage_fused/_grad_check.py) in one pass.
//
// A PlanRecord is made when a plan is built, from the stepped parameters (in plan order) and the
// others of one list; grads() returns the stepped parameters' gradients in plan order, and whether
// everything still matches: the others still have no gradient; each stepped parameter has the same
// address, shape, strides, dtype, device and contiguity, and a gradient that is strided, of its dtype,
// device and shape, as contiguous as it was, and lazily negated or conjugated exactly when it was.
// Host metadata only; the tensors are held as Python holds them (autograd metadata included), so
// .grad() reads what p.grad would.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace ff {
namespace {

int64_t data_address(const at::Tensor& t) {
  return t.has_storage() ? reinterpret_cast<int64_t>(t.const_data_ptr()) : 0;
}

// dtype | device type << 8 | (device index + 1) << 16 | contiguous << 32 | gradient contiguous << 33
// | gradient lazily negated << 34 | gradient lazily conjugated << 35
int64_t metadata(const at::Tensor& p, const at::Tensor& g) {
  const auto device = p.device();
  return static_cast<int64_t>(p.scalar_type()) | (static_cast<int64_t>(device.type()) << 8) |
         (static_cast<int64_t>(device.index() + 1) << 16) | (static_cast<int64_t>(p.is_contiguous()) << 32) |
         (static_cast<int64_t>(g.is_contiguous()) << 33) | (static_cast<int64_t>(g.is_neg()) << 34) |
         (static_cast<int64_t>(g.is_conj()) << 35);
}

// The parameters of one list (one param group) as the plan was built for them. It holds the tensors
// themselves, so a step passes no list in: the caller checks that its list still holds the same
// objects (an identity test per entry), this checks everything else and returns the gradients.
struct PlanRecord : torch::CustomClassHolder {
  std::vector<at::Tensor> params;  // the stepped parameters, in plan order
  std::vector<at::Tensor> absent;  // the others: they must still have no gradient
  std::vector<int64_t> address, meta;
  std::vector<std::vector<int64_t>> sizes, strides;

  PlanRecord(std::vector<at::Tensor> stepped, std::vector<at::Tensor> without) :
      params(std::move(stepped)), absent(std::move(without)) {
    for (const auto& p : params) {
      const at::Tensor& g = p.grad();
      TORCH_CHECK(g.defined() && g.layout() == at::kStrided, "fromage_fused: PlanRecord: a stepped parameter has no strided gradient");
      address.push_back(data_address(p));
      meta.push_back(metadata(p, g));
      sizes.push_back(p.sizes().vec());
      strides.push_back(p.strides().vec());
    }
  }

  // The gradients of the stepped parameters in plan order, and whether everything still matches.
  std::tuple<std::vector<at::Tensor>, bool> grads() const {
    std::vector<at::Tensor> out;
    for (const auto& p : absent)
      if (p.grad().defined()) return {std::move(out), false};
    out.reserve(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& p = params[i];
      const at::Tensor& g = p.grad();
      if (!g.defined() || g.layout() != at::kStrided || data_address(p) != address[i] || metadata(p, g) != meta[i] ||
          p.sizes() != at::IntArrayRef(sizes[i]) || p.strides() != at::IntArrayRef(strides[i]) ||
          g.scalar_type() != p.scalar_type() || g.device() != p.device() || g.sizes() != p.sizes())
        return {std::vector<at::Tensor>(), false};
      out.push_back(g);
    }
    return {std::move(out), true};
  }
};

}  // namespace
}  // namespace ff

TORCH_LIBRARY_FRAGMENT(fromage_fused, m) {
  m.class_<ff::PlanRecord>("PlanRecord")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("grads", &ff::PlanRecord::grads);
}

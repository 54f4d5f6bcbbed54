// The CUDA path's names for the Fromage rule's coefficients and update (rule_fromage.h holds them):
// kept until the CUDA kernels take the rule as a functor like the CPU ones.
#pragma once

#include "numerics.h"
#include "rule_fromage.h"

namespace ff {

using Coef = FromageRule::Coef;

FF_HD Coef coefficients(float s_pp, float s_gg, float s_pg, float lr, float grad_scale, bool has_grad_scale,
                        bool has_p_bound, float p_bound, float max_norm, bool maximize, bool prefactor) {
  return FromageRule::coefficients(s_pp, s_gg, s_pg, lr, grad_scale, has_grad_scale, has_p_bound, p_bound, max_norm,
                                   maximize, prefactor);
}

FF_HD float update(const Coef& c, float p, float g) { return FromageRule::update(c, p, g); }

}  // namespace ff

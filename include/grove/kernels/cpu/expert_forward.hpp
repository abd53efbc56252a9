#pragma once

#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "grove/error.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/swiglu.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/plan/batch_shapes.hpp"
#include "grove/kernels/cpu/swiglu_batch.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE
namespace cpu {

/// The plain CPU forward of the experts of a plan, kept as the baseline the fused pass
/// (cpu_runner) is measured and tested against, and the path for fp64: each expert and each
/// adjugate processes its rows of the plan as one batch with Eigen products (gather, gate/up
/// product, SwiGLU, down product, weighted scatter-add), one after the other on the calling
/// thread (detail::for_each_plain_item). Summation order is fixed (experts by index, then
/// adjugates; tokens ascending), not the canonical one of plan/combine.hpp: a baseline, compared
/// with tolerances. Eigen vectorises only for the instruction sets the translation unit is
/// compiled for.
template <class Scalar>
void forward_experts_simple(const weights_view<Scalar>& weights, const routing_plan<Scalar>& plan,
                            std::type_identity_t<const_rows_ref<Scalar>> x,
                            std::type_identity_t<rows_ref<Scalar>> y) {
  const layer_dims& d = weights.dims();
  detail::require_batch_shapes(d, plan, x.rows(), x.cols(), "input x");
  detail::require_batch_shapes(d, plan, y.rows(), y.cols(), "output y");
  y.setZero();
  detail::swiglu_batch_scratch<Scalar> scratch;
  std::vector<dispatch_row<Scalar>> pick_rows;
  detail::for_each_plain_item<Scalar>(plan, nullptr, pick_rows, [&](const detail::plain_item<Scalar>& item) {
    if (!item.rows.empty()) detail::swiglu_batch_forward<Scalar>(item.of(weights), item.rows, x, scratch, y);
  });
}

}  // namespace cpu
GROVE_END_NAMESPACE

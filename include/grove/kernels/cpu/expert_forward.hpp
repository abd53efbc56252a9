#pragma once

#include <span>
#include <string>
#include <type_traits>

#include "grove/error.hpp"
#include "grove/experts/bf16_weights.hpp"
#include "grove/experts/layer_weights.hpp"
#include "grove/experts/swiglu.hpp"
#include "grove/experts/tensor_types.hpp"
#include "grove/kernels/cpu/batch_shapes.hpp"
#include "grove/kernels/cpu/expert_engine.hpp"
#include "grove/kernels/cpu/swiglu_batch.hpp"
#include "grove/router/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE
namespace cpu {

/// The plain version of forward_experts, kept as the baseline the fast path is measured and
/// tested against: each expert and each adjugate processes its rows of the plan as one batch
/// with Eigen products (gather, gate/up product, SwiGLU, down product, weighted scatter-add),
/// one after the other on the calling thread. Summation order is fixed (experts by index, then
/// adjugates; tokens ascending). Eigen vectorises only for the instruction sets the translation
/// unit is compiled for.
template <class Scalar>
void forward_experts_simple(const weights_view<Scalar>& weights, const routing_plan<Scalar>& plan,
                            std::type_identity_t<const_rows_ref<Scalar>> x,
                            std::type_identity_t<rows_ref<Scalar>> y) {
  const layer_dims& d = weights.dims();
  detail::require_batch_shapes(d, plan, x.rows(), x.cols(), "input x");
  detail::require_batch_shapes(d, plan, y.rows(), y.cols(), "output y");
  y.setZero();
  detail::swiglu_batch_scratch<Scalar> scratch;
  auto run = [&](const swiglu_weights<const Scalar>& mlp, std::span<const dispatch_row<Scalar>> rows) {
    if (!rows.empty()) detail::swiglu_batch_forward<Scalar>(mlp, rows, x, scratch, y);
  };
  for (index e = 0; e < d.experts; ++e) run(weights.expert(e), plan.rows_of_expert(e));
  for (index j = 0; j < d.groups; ++j) run(weights.adjugate(j), plan.rows_of_adjugate(j));
}

/// Runs the routed experts and the activated adjugates of a plan on the CPU and writes
/// y = Σ_s w_s E_{e_s}(x) + λ Σ_j c_j A_j(x) (docs/math.md, step 6). Adjugates come from the
/// plan's deduplicated rows, so each is evaluated once per token.
///
/// For float this is the fast path (docs/performance.md): default_engine()'s fused pass over
/// routed experts and adjugates, SIMD kernels chosen at run time, all threads, bitwise
/// identical results for any thread count. Other scalar types run forward_experts_simple.
template <class Scalar>
void forward_experts(const weights_view<Scalar>& weights, const routing_plan<Scalar>& plan,
                     std::type_identity_t<const_rows_ref<Scalar>> x,
                     std::type_identity_t<rows_ref<Scalar>> y) {
  if constexpr (std::is_same_v<Scalar, float>)
    default_engine().forward(weights, plan, x, y);
  else
    forward_experts_simple(weights, plan, x, y);
}

/// The same with BF16 weights (grove::bf16_weights::view()): weights stay bf16 in memory,
/// products accumulate in fp32 (vdpbf16ps where the CPU has AVX512_BF16).
inline void forward_experts(const weights_view<bf16>& weights, const routing_plan<float>& plan,
                            const_rows_ref<float> x, rows_ref<float> y) {
  default_engine().forward(weights, plan, x, y);
}

}  // namespace cpu
GROVE_END_NAMESPACE

#pragma once

#include "grove/config/layer_dims.hpp"
#include "grove/error.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/plan/batch_shapes.hpp"
#include "grove/plan/saved_activations.hpp"
#include "grove/plan/routing_plan.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// True when the memory of two row blocks of `cols` columns overlaps.
template <class Scalar>
bool blocks_overlap(const Scalar* a, index a_rows, index a_stride, const Scalar* b, index b_rows, index b_stride,
                    index cols) {
  if (a_rows == 0 || b_rows == 0 || cols == 0) return false;
  const Scalar* a_end = a + (a_rows - 1) * a_stride + cols;
  const Scalar* b_end = b + (b_rows - 1) * b_stride + cols;
  return a < b_end && b < a_end;
}

/// The checks every CPU expert backward makes before touching memory (the engine's and the
/// plain one): x, dy and dx are [T, H]; the gradient buffers have the layer's dims; the saved
/// activations (nullptr: none, recompute) belong to this plan and layer; and dx has its own
/// memory (both backwards read x and dy while they write dx).
template <class Scalar>
void require_backward_inputs(const layer_dims& d, const routing_plan<Scalar>& plan, const_rows_ref<Scalar> x,
                             const_rows_ref<Scalar> dy, const rows_ref<Scalar>& dx, const layer_dims& grads_dims,
                             const saved_activations<Scalar>* saved) {
  require_batch_shapes(d, plan, x.rows(), x.cols(), "input x");
  require_batch_shapes(d, plan, dy.rows(), dy.cols(), "output gradient dy");
  require_batch_shapes(d, plan, dx.rows(), dx.cols(), "input gradient dx");
  require(grads_dims == d, "grove: the gradient buffers have other dimensions than the layer");
  require(saved == nullptr || saved->matches(plan, d),
          "grove: the saved activations were kept for another routing plan (or layer) than the one given to backward");
  require(!blocks_overlap(dx.data(), dx.rows(), dx.outerStride(), x.data(), x.rows(), x.outerStride(), d.hidden) &&
              !blocks_overlap(dx.data(), dx.rows(), dx.outerStride(), dy.data(), dy.rows(), dy.outerStride(),
                              d.hidden),
          "grove: backward's input gradient dx shares memory with x or dy; give it its own buffer");
}

}  // namespace detail
GROVE_END_NAMESPACE

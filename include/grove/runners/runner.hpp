#pragma once

#include <string>
#include <type_traits>

#include "grove/formats/format_traits.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/plan/pass_requests.hpp"
#include "grove/plan/routing_plan.hpp"
#include "grove/plan/saved_activations.hpp"

GROVE_BEGIN_NAMESPACE

/// How a routing plan is executed: the one seam between the layer's logic (routing, the plan,
/// the combine's order) and the hardware that runs the experts (docs/runners.md). In the manner
/// of a ggml backend, a runner is a small table of what every backend must do: the experts'
/// forward, optionally keeping what backward needs, and their backward, each on a plan.
///
/// grove::cpu_runner is the CPU's (it owns its thread pool and workspace). Layers and the
/// training functions take a runner explicitly, as Eigen expressions take `.device(d)`;
/// default_runner() is a visible, replaceable convenience. Many layers share one runner.
///
/// The public functions are not virtual; a backend implements the run_* members.
class runner {
 public:
  runner() = default;
  runner(const runner&) = delete;
  runner& operator=(const runner&) = delete;
  virtual ~runner() = default;

  /// What this runner is, for logs: "cpu (avx512, 2 threads)".
  [[nodiscard]] virtual std::string name() const = 0;

  /// The experts' forward of one batch (see expert_forward).
  template <class Weight>
  void forward(const expert_forward<Weight>& request) {
    if constexpr (is_block_format<Weight>)
      run_block_forward(request);
    else
      run_forward(request);
  }
  /// y = Σ_s w_s E_{e_s}(x) + λ Σ_j c_j A_j(x) over `plan` (docs/math.md, step 6).
  template <class Weight>
  void forward(const weights_view<Weight>& weights, const routing_plan<activation_t<Weight>>& plan,
               std::type_identity_t<const_rows_ref<activation_t<Weight>>> x,
               std::type_identity_t<rows_ref<activation_t<Weight>>> y) {
    forward(expert_forward<Weight>{weights, plan, x, y});
  }
  /// The forward up to the combine: writes p(t, g) for every group row of `plan` into
  /// `partials` [plan.group_row_count(), H]; combine_partials (plan/combine.hpp) then gives y, bit
  /// for bit forward()'s. For partials that travel to another process before they are summed.
  template <class Weight>
  void forward_partials(const weights_view<Weight>& weights, const routing_plan<activation_t<Weight>>& plan,
                        std::type_identity_t<const_rows_ref<activation_t<Weight>>> x,
                        std::type_identity_t<rows_ref<activation_t<Weight>>> partials) {
    forward(expert_forward<Weight>{weights, plan, x, partials, nullptr, forward_output::group_partials});
  }
  /// The training forward: forward() that also keeps the SwiGLU pre-activations for backward.
  /// y is bit-identical to forward()'s.
  template <class Scalar>
  void forward_saving(const std::type_identity_t<weights_view<Scalar>>& weights, const routing_plan<Scalar>& plan,
                      std::type_identity_t<const_rows_ref<Scalar>> x, std::type_identity_t<rows_ref<Scalar>> y,
                      saved_activations<Scalar>& saved) {
    run_forward(expert_forward<Scalar>{weights, plan, x, y, &saved});
  }

  /// The experts' backward of one batch (see expert_backward).
  template <class Scalar>
  void backward(const expert_backward<Scalar>& request) {
    run_backward(request);
  }
  template <class Scalar>
  void backward(const std::type_identity_t<weights_view<Scalar>>& weights, const routing_plan<Scalar>& plan,
                std::type_identity_t<const_rows_ref<Scalar>> x, std::type_identity_t<const_rows_ref<Scalar>> dy,
                const std::type_identity_t<saved_activations<Scalar>>* saved,
                const std::type_identity_t<weights_span<Scalar>>& grads,
                std::type_identity_t<rows_ref<Scalar>> dx, row_matrix<Scalar>& dw) {
    run_backward(expert_backward<Scalar>{weights, plan, x, dy, saved, grads, dx, dw});
  }

 protected:
  // What a backend implements. fp32 and BF16 weights run on fp32 activations, fp64 weights on
  // fp64 (the precision of the finite-difference tests).
  virtual void run_forward(const expert_forward<float>& request) = 0;
  virtual void run_forward(const expert_forward<bf16>& request) = 0;
  virtual void run_forward(const expert_forward<double>& request) = 0;
  virtual void run_backward(const expert_backward<float>& request) = 0;
  virtual void run_backward(const expert_backward<double>& request) = 0;
  // The block formats (q8, q4; forward only). A backend that runs them overrides these; the
  // default refuses, so a runner written before them still compiles and says what it lacks.
  virtual void run_block_forward(const expert_forward<q8_block>&) { refuse("q8"); }
  virtual void run_block_forward(const expert_forward<q4_block>&) { refuse("q4"); }

 private:
  [[noreturn]] void refuse(const char* format) const {
    throw error("grove: the runner '" + name() + "' does not run " + format + " weights (grove::cpu_runner does)");
  }
};

GROVE_END_NAMESPACE

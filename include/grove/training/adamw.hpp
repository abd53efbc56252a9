#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "grove/error.hpp"
#include "grove/weights/layer_parameters.hpp"

GROVE_BEGIN_NAMESPACE

/// AdamW hyper-parameters (Loshchilov & Hutter, decoupled weight decay), PyTorch's defaults
/// except weight_decay, whose PyTorch default is 0.01 as well.
struct adamw_options {
  double learning_rate = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double epsilon = 1e-8;
  double weight_decay = 0.01;
};

/// AdamW over one flat vector of parameters, in place, as torch.optim.AdamW computes it:
///   θ ← θ (1 − lr·wd);  m ← β₁ m + (1 − β₁) g;  v ← β₂ v + (1 − β₂) g²;
///   θ ← θ − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε).
/// The moments m and v are kept in Scalar. One optimizer serves one vector: the first step
/// fixes its length. For a Grove layer pass layer_parameters (values() only: the selection
/// bias is a buffer moved by load balancing, never by the optimizer).
template <class Scalar>
class adamw {
 public:
  explicit adamw(const adamw_options& options = {}) : options_(options) { validate(); }

  [[nodiscard]] const adamw_options& options() const { return options_; }
  /// For schedules: the learning rate of the next steps.
  void set_learning_rate(double rate) {
    options_.learning_rate = rate;
    validate();
  }
  [[nodiscard]] std::int64_t steps() const { return steps_; }

  void step(std::span<Scalar> values, std::span<const Scalar> gradients) {
    detail::require(values.size() == gradients.size(), "grove: adamw: " + std::to_string(values.size()) +
                                                           " parameters but " + std::to_string(gradients.size()) +
                                                           " gradients");
    if (steps_ == 0) {
      m_.assign(values.size(), Scalar(0));
      v_.assign(values.size(), Scalar(0));
    }
    detail::require(values.size() == m_.size(), "grove: adamw: this optimizer holds state for " +
                                                    std::to_string(m_.size()) + " parameters, not " +
                                                    std::to_string(values.size()));
    ++steps_;
    const adamw_options& o = options_;
    const double t = double(steps_);
    const auto decay = static_cast<Scalar>(1.0 - o.learning_rate * o.weight_decay);
    const auto b1 = static_cast<Scalar>(o.beta1), b2 = static_cast<Scalar>(o.beta2);
    const auto step_size = static_cast<Scalar>(o.learning_rate / (1.0 - std::pow(o.beta1, t)));
    const auto correction2 = static_cast<Scalar>(std::sqrt(1.0 - std::pow(o.beta2, t)));
    const auto eps = static_cast<Scalar>(o.epsilon);
    for (std::size_t i = 0; i < values.size(); ++i) {
      const Scalar g = gradients[i];
      m_[i] = b1 * m_[i] + (Scalar(1) - b1) * g;
      v_[i] = b2 * v_[i] + (Scalar(1) - b2) * g * g;
      values[i] = values[i] * decay - step_size * m_[i] / (std::sqrt(v_[i]) / correction2 + eps);
    }
  }

  /// One step over a layer's trainable weights with its gradients (same dims); bias untouched.
  void step(layer_parameters<Scalar>& parameters, const layer_parameters<Scalar>& gradients) {
    detail::require(parameters.dims() == gradients.dims(),
                    "grove: adamw: the gradients have other layer dimensions than the parameters");
    step(parameters.values(), gradients.values());
  }

  /// The state, for saving a run: the first and second moments (empty before the first step).
  [[nodiscard]] std::span<const Scalar> first_moment() const { return m_; }
  [[nodiscard]] std::span<const Scalar> second_moment() const { return v_; }

  /// Continues a saved run: `steps` taken, with these moments (of the length of the vector the
  /// optimizer serves). The next step is step steps + 1, as if the run had never stopped.
  void restore(std::int64_t steps, std::span<const Scalar> first, std::span<const Scalar> second) {
    detail::require(steps >= 0 && first.size() == second.size() && (steps > 0 || first.empty()),
                    "grove: adamw restore wants steps >= 0 and two moments of one length (empty at step 0), got ",
                    steps, " steps and moments of ", first.size(), " and ", second.size(), " values");
    steps_ = steps;
    m_.assign(first.begin(), first.end());
    v_.assign(second.begin(), second.end());
  }

  /// Forget the moments and the step count (the next step starts afresh).
  void reset() {
    steps_ = 0;
    m_.clear();
    v_.clear();
  }

 private:
  void validate() const {
    const adamw_options& o = options_;
    detail::require(std::isfinite(o.learning_rate) && o.learning_rate >= 0.0,
                    "grove: adamw learning_rate must be finite and >= 0, got " + std::to_string(o.learning_rate));
    detail::require(o.beta1 >= 0.0 && o.beta1 < 1.0,
                    "grove: adamw beta1 must lie in [0, 1), got " + std::to_string(o.beta1));
    detail::require(o.beta2 >= 0.0 && o.beta2 < 1.0,
                    "grove: adamw beta2 must lie in [0, 1), got " + std::to_string(o.beta2));
    detail::require(o.epsilon > 0.0, "grove: adamw epsilon must be > 0, got " + std::to_string(o.epsilon));
    detail::require(std::isfinite(o.weight_decay) && o.weight_decay >= 0.0,
                    "grove: adamw weight_decay must be finite and >= 0, got " + std::to_string(o.weight_decay));
  }

  adamw_options options_;
  std::int64_t steps_ = 0;
  std::vector<Scalar> m_, v_;
};

GROVE_END_NAMESPACE

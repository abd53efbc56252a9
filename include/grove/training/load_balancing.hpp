#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "grove/error.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/layer/activation_stats.hpp"
#include "grove/plan/routing_plan.hpp"
#include "grove/router/top_k.hpp"
#include "grove/training/router_backward.hpp"

GROVE_BEGIN_NAMESPACE

// ---------------------------------------------------------------------------------------------
// Expert load (docs/training.md, "Load balancing")
// ---------------------------------------------------------------------------------------------

/// Per-expert pick counts summed over any number of batches (micro-batches of one step, or
/// steps between bias updates). A plan contributes plan.expert_load(e), the same numbers
/// activation_stats::expert_load holds.
class expert_load_counter {
 public:
  explicit expert_load_counter(index experts) : counts_(static_cast<std::size_t>(experts), 0) {
    detail::require(experts > 0, "grove: expert_load_counter needs E > 0, got " + std::to_string(experts));
  }

  template <class Scalar>
  void add(const routing_plan<Scalar>& plan) {
    require_experts(plan.experts);
    for (index e = 0; e < plan.experts; ++e) counts_[static_cast<std::size_t>(e)] += plan.expert_load(e);
  }
  void add(const activation_stats& stats) { add(std::span<const index>(stats.expert_load)); }
  void add(std::span<const index> counts) {
    require_experts(static_cast<index>(counts.size()));
    for (std::size_t e = 0; e < counts.size(); ++e) counts_[e] += counts[e];
  }

  [[nodiscard]] index experts() const { return static_cast<index>(counts_.size()); }
  [[nodiscard]] std::span<const index> counts() const { return counts_; }
  /// Σ_e counts: T·k summed over the batches added.
  [[nodiscard]] index total() const { return std::accumulate(counts_.begin(), counts_.end(), index(0)); }
  /// F_e = counts_e / total (all zero when nothing was added).
  [[nodiscard]] std::vector<double> fractions() const {
    std::vector<double> f(counts_.size(), 0.0);
    const index n = total();
    if (n > 0)
      for (std::size_t e = 0; e < f.size(); ++e) f[e] = double(counts_[e]) / double(n);
    return f;
  }
  void reset() { std::fill(counts_.begin(), counts_.end(), index(0)); }

 private:
  void require_experts(index e) const {
    detail::require(e == experts(), "grove: expert_load_counter counts " + std::to_string(experts()) +
                                        " experts but was given loads of " + std::to_string(e));
  }
  std::vector<index> counts_;
};

/// How uneven a load is, for monitoring. With L_e the counts and L̄ their mean:
/// `max_over_mean` = max_e L_e / L̄ (1 when balanced, E when one expert takes everything) and
/// `coefficient_of_variation` = std_e(L_e) / L̄ (0 when balanced).
struct load_spread {
  double max_over_mean = 0.0;
  double coefficient_of_variation = 0.0;
  index min = 0;
  index max = 0;
};

[[nodiscard]] inline load_spread measure_load_spread(std::span<const index> counts) {
  load_spread s;
  if (counts.empty()) return s;
  const auto [lo, hi] = std::minmax_element(counts.begin(), counts.end());
  s.min = *lo;
  s.max = *hi;
  const double n = double(counts.size());
  const double mean = double(std::accumulate(counts.begin(), counts.end(), index(0))) / n;
  if (mean <= 0.0) return s;
  double var = 0.0;
  for (index c : counts) var += (double(c) - mean) * (double(c) - mean);
  s.max_over_mean = double(s.max) / mean;
  s.coefficient_of_variation = std::sqrt(var / n) / mean;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Auxiliary-loss-free bias update (docs/math.md, "Load balancing")
// ---------------------------------------------------------------------------------------------

enum class bias_update_rule {
  normalized,  ///< b ← b − α (F − Q) / ‖F − Q‖₂  (the Grove paper's rule)
  sign,        ///< b ← b − α · sign(F − Q)        (DeepSeek-V3 style)
};

struct bias_update_options {
  double rate = 0.001;  ///< α
  bias_update_rule rule = bias_update_rule::normalized;
};

/// Updates the selection bias from the per-expert pick counts of the batches since the last
/// update: F_e = counts_e / Σ counts, Q_e = 1/E. Overloaded experts get a lower bias, so the
/// next batches pick them less; the weights and their gradients are not involved.
/// Returns false, changing nothing, when F == Q exactly (perfect balance: the normalized rule
/// would divide by zero) or when there are no picks. F − Q is formed in integers,
/// E·counts_e − Σ counts, so "exactly balanced" is decided without rounding.
template <class Scalar>
bool update_selection_bias(std::span<Scalar> bias, std::span<const index> counts, const bias_update_options& options) {
  detail::require(bias.size() == counts.size(), "grove: the selection bias has " + std::to_string(bias.size()) +
                                                    " entries but the load counts " + std::to_string(counts.size()));
  detail::require(std::isfinite(options.rate) && options.rate >= 0.0,
                  "grove: the bias update rate α must be finite and >= 0, got " + std::to_string(options.rate));
  const auto experts = static_cast<index>(counts.size());
  const index total = std::accumulate(counts.begin(), counts.end(), index(0));
  if (experts == 0 || total == 0) return false;
  std::vector<double> excess(counts.size());  // ∝ F − Q, exact integers
  double norm2 = 0.0;
  for (std::size_t e = 0; e < counts.size(); ++e) {
    excess[e] = double(experts * counts[e] - total);
    norm2 += excess[e] * excess[e];
  }
  if (norm2 == 0.0) return false;
  const double norm = std::sqrt(norm2);
  for (std::size_t e = 0; e < counts.size(); ++e) {
    const double step =
        options.rule == bias_update_rule::normalized ? excess[e] / norm : double((excess[e] > 0) - (excess[e] < 0));
    bias[e] = static_cast<Scalar>(double(bias[e]) - options.rate * step);
  }
  return true;
}

template <class Scalar>
bool update_selection_bias(std::span<Scalar> bias, const expert_load_counter& load,
                           const bias_update_options& options) {
  return update_selection_bias(bias, load.counts(), options);
}

/// One plan's loads; for several micro-batches per update use an expert_load_counter.
template <class Scalar>
bool update_selection_bias(std::span<Scalar> bias, const routing_plan<Scalar>& plan,
                           const bias_update_options& options) {
  expert_load_counter load(plan.experts);
  load.add(plan);
  return update_selection_bias(bias, load.counts(), options);
}

// ---------------------------------------------------------------------------------------------
// Switch-style auxiliary loss (what the released load_balancing_loss_func computes)
// ---------------------------------------------------------------------------------------------

/// L_aux = E · Σ_e f_e · P_e over N rows of router logits l [N, E] (one layer's batch, or
/// several layers' logits stacked, as the released code concatenates them), where
///   P_e = (1/N) Σ_t softmax(l_t)_e  and  f_e = Σ_s (1/N)·#{t : pick s of t is e} = picks_e / N,
/// the per-slot token fractions summed over the k slots exactly as the released function does
/// (`mean(one_hot(topk), dim=0)` then a sum over slots and experts); perfectly even routing
/// gives L_aux = k. Picks are the top-k of softmax(l), i.e. of l, ties to the lower index —
/// the selection bias plays no part here, as in the released function.
/// If `dlogits` is given, `coefficient · ∂L_aux/∂l` is ADDED to it: the gradient flows through
/// P only (f is a count), ∂L_aux/∂p_te = E·f_e/N, then through the full softmax. Returns L_aux.
template <class Scalar>
double load_balancing_loss(std::type_identity_t<const_rows_ref<Scalar>> logits, index top_k, double coefficient = 1.0,
                           row_matrix<Scalar>* dlogits = nullptr) {
  const index n = logits.rows();
  const index experts = logits.cols();
  detail::require(top_k >= 1 && top_k <= experts, "grove: load_balancing_loss needs 1 <= k <= E = " +
                                                      std::to_string(experts) + ", got k = " + std::to_string(top_k));
  if (dlogits)
    detail::require(dlogits->rows() == n && dlogits->cols() == experts,
                    "grove: load_balancing_loss: dlogits must be [" + std::to_string(n) + ", " +
                        std::to_string(experts) + "], got [" + std::to_string(dlogits->rows()) + ", " +
                        std::to_string(dlogits->cols()) + "]");
  if (n == 0) return 0.0;
  std::vector<double> picks(static_cast<std::size_t>(experts), 0.0), mean_prob(static_cast<std::size_t>(experts), 0.0);
  std::vector<double> probs(static_cast<std::size_t>(n * experts));
  std::vector<std::int32_t> ids(static_cast<std::size_t>(top_k));
  std::vector<Scalar> scores(static_cast<std::size_t>(top_k));
  row_matrix<Scalar> row(1, experts);
  for (index t = 0; t < n; ++t) {
    row = logits.row(t);
    detail::select_top_k<Scalar>(row.data(), nullptr, experts, top_k, ids.data(), scores.data(), t);
    for (std::int32_t e : ids) picks[static_cast<std::size_t>(e)] += 1.0;
    double top = double(row(0, 0));
    for (index e = 1; e < experts; ++e) top = std::max(top, double(row(0, e)));
    double sum = 0.0;
    double* p = &probs[static_cast<std::size_t>(t * experts)];
    for (index e = 0; e < experts; ++e) sum += (p[e] = std::exp(double(row(0, e)) - top));
    for (index e = 0; e < experts; ++e) {
      p[e] /= sum;
      mean_prob[static_cast<std::size_t>(e)] += p[e];
    }
  }
  double loss = 0.0;
  for (index e = 0; e < experts; ++e) {
    mean_prob[static_cast<std::size_t>(e)] /= double(n);
    loss += picks[static_cast<std::size_t>(e)] / double(n) * mean_prob[static_cast<std::size_t>(e)];
  }
  loss *= double(experts);
  if (dlogits) {
    // a_e = coefficient · ∂L/∂p_te = coefficient · E · f_e / N, the same for every token.
    std::vector<double> a(static_cast<std::size_t>(experts));
    for (index e = 0; e < experts; ++e)
      a[static_cast<std::size_t>(e)] =
          coefficient * double(experts) * picks[static_cast<std::size_t>(e)] / (double(n) * double(n));
    for (index t = 0; t < n; ++t) {
      const double* p = &probs[static_cast<std::size_t>(t * experts)];
      double mean = 0.0;
      for (index e = 0; e < experts; ++e) mean += p[e] * a[static_cast<std::size_t>(e)];
      for (index e = 0; e < experts; ++e)
        (*dlogits)(t, e) += static_cast<Scalar>(p[e] * (a[static_cast<std::size_t>(e)] - mean));
    }
  }
  return loss;
}

/// The auxiliary loss of one layer's batch, from the plan's logits, with `coefficient` times
/// its gradient added into the router gradient of `grads` and into `dx` (docs/training.md).
/// Returns L_aux (unscaled). Call it beside backward() for the same plan.
template <class Scalar>
double add_load_balancing_loss(const std::type_identity_t<weights_view<Scalar>>& weights,
                               const routing_plan<Scalar>& plan, std::type_identity_t<const_rows_ref<Scalar>> x,
                               double coefficient, const std::type_identity_t<weights_span<Scalar>>& grads,
                               std::type_identity_t<rows_ref<Scalar>> dx) {
  row_matrix<Scalar> dl = row_matrix<Scalar>::Zero(plan.tokens, plan.experts);
  const double loss = load_balancing_loss<Scalar>(plan.logits, plan.top_k, coefficient, &dl);
  router_backward<Scalar>(weights, x, dl, grads, dx);
  return loss;
}

GROVE_END_NAMESPACE

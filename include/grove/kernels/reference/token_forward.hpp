#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "grove/error.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/router/route.hpp"

GROVE_BEGIN_NAMESPACE
namespace reference {

/// The layer computed the plainest way: one token at a time, every dot product a loop, sums in
/// double, straight from docs/math.md, sharing no code with the routing plan or the kernels.
/// It is slow on purpose. options.adjugates says how adjugates enter (plan/dispatch.hpp). The demo checks the real path against it on a sample, and the
/// benchmarks use it as the naive baseline.
template <class Scalar>
row_matrix<Scalar> forward(const weights_view<Scalar>& weights, const routing_options& options,
                           std::type_identity_t<const_rows_ref<Scalar>> x) {
  const layer_dims& d = weights.dims();
  const index H = d.hidden, E = d.experts, k = options.top_k;
  detail::require(x.cols() == H, "grove: reference::forward: x has " + std::to_string(x.cols()) +
                                     " columns, expected H = " + std::to_string(H));
  detail::require(k >= 1 && k <= E, "grove: reference::forward: k must lie in [1, E]");
  const Scalar* bias = weights.bias();
  const bool use_bias = bias && std::any_of(bias, bias + E, [](Scalar b) { return b != 0; });

  auto dot = [H](const Scalar* row, const std::vector<double>& v) {
    double s = 0;
    for (index c = 0; c < H; ++c) s += double(row[c]) * v[static_cast<std::size_t>(c)];
    return s;
  };
  auto add_mlp = [&](const swiglu_weights<const Scalar>& mlp, const std::vector<double>& in, double scale,
                     std::vector<double>& out) {
    const index inter = mlp.gate.rows();
    std::vector<double> h(static_cast<std::size_t>(inter));
    for (index i = 0; i < inter; ++i) {
      const double g = dot(mlp.gate.data() + i * H, in), u = dot(mlp.up.data() + i * H, in);
      h[static_cast<std::size_t>(i)] = g / (1.0 + std::exp(-g)) * u;
    }
    for (index r = 0; r < H; ++r) {
      double o = 0;
      for (index i = 0; i < inter; ++i) o += double(mlp.down(r, i)) * h[static_cast<std::size_t>(i)];
      out[static_cast<std::size_t>(r)] += scale * o;
    }
  };

  row_matrix<Scalar> y(x.rows(), H);
  std::vector<double> in(static_cast<std::size_t>(H)), out(static_cast<std::size_t>(H));
  std::vector<double> logits(static_cast<std::size_t>(E)), score(static_cast<std::size_t>(E)),
      group_weight(static_cast<std::size_t>(d.groups));
  std::vector<index> order(static_cast<std::size_t>(E));
  for (index t = 0; t < x.rows(); ++t) {
    for (index c = 0; c < H; ++c) in[static_cast<std::size_t>(c)] = double(x(t, c));
    for (index e = 0; e < E; ++e) {
      const double l = dot(weights.router().data() + e * H, in);
      logits[static_cast<std::size_t>(e)] = l;
      score[static_cast<std::size_t>(e)] = use_bias ? 1.0 / (1.0 + std::exp(-l)) + double(bias[e]) : l;
    }
    std::iota(order.begin(), order.end(), index(0));
    std::stable_sort(order.begin(), order.end(), [&](index a, index b) {
      return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)];
    });
    double top = logits[static_cast<std::size_t>(order[0])], sum = 0;
    for (index s = 0; s < k; ++s) top = std::max(top, logits[static_cast<std::size_t>(order[static_cast<std::size_t>(s)])]);
    for (index s = 0; s < k; ++s) sum += std::exp(logits[static_cast<std::size_t>(order[static_cast<std::size_t>(s)])] - top);
    std::fill(out.begin(), out.end(), 0.0);
    std::fill(group_weight.begin(), group_weight.end(), 0.0);
    for (index s = 0; s < k; ++s) {
      const index e = order[static_cast<std::size_t>(s)];
      const double w = std::exp(logits[static_cast<std::size_t>(e)] - top) / sum;
      add_mlp(weights.expert(e), in, w, out);
      group_weight[static_cast<std::size_t>(e / d.group_size())] += w;
      if (options.adjugates == adjugate_mode::once_per_pick)
        add_mlp(weights.adjugate(e / d.group_size()), in, options.scale * w, out);
    }
    if (options.adjugates == adjugate_mode::once_per_token)
      for (index j = 0; j < d.groups; ++j)
        if (group_weight[static_cast<std::size_t>(j)] > 0)
          add_mlp(weights.adjugate(j), in, options.scale * group_weight[static_cast<std::size_t>(j)], out);
    for (index c = 0; c < H; ++c) y(t, c) = static_cast<Scalar>(out[static_cast<std::size_t>(c)]);
  }
  return y;
}

}  // namespace reference
GROVE_END_NAMESPACE

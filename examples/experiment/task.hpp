#pragma once

// The experiments' task and model sizes (docs/training.md, "Experiment"): shared by
// grove_experiment (one process, three runs) and grove_experiment_ep (the Grove run under
// mpirun with expert parallelism, docs/distributed.md).

#include <grove/training.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace experiment {

using grove::index;
using matrix = grove::row_matrix<float>;

// ---- the task: every input belongs to one of C Zipf-distributed clusters, whose own linear map
//      gives its target


struct task {
  index input = 16, output = 16, clusters = 32, families = 8;
  double zipf = 1.0, noise = 0.35;
  matrix centers;            // [C, D_in]
  std::vector<matrix> maps;  // C maps [D_out, D_in]: family part + cluster part
  std::vector<double> cdf;   // cluster sampling

  explicit task(std::uint64_t seed) {
    grove::detail::normal_generator g(seed);
    centers.resize(clusters, input);
    for (index i = 0; i < centers.size(); ++i) centers.data()[i] = float(g.normal());
    std::vector<matrix> family(static_cast<std::size_t>(families), matrix(output, input));
    const double s = 1.0 / std::sqrt(double(input));
    for (auto& f : family)
      for (index i = 0; i < f.size(); ++i) f.data()[i] = float(s * g.normal());
    for (index c = 0; c < clusters; ++c) {
      matrix m = family[static_cast<std::size_t>(c % families)];
      for (index i = 0; i < m.size(); ++i) m.data()[i] += float(0.7 * s * g.normal());
      maps.push_back(m);
    }
    double total = 0;
    for (index c = 0; c < clusters; ++c) cdf.push_back(total += std::pow(double(c + 1), -zipf));
    for (double& v : cdf) v /= total;
  }

  /// T samples: inputs u [T, D_in], targets y [T, D_out], cluster ids.
  void sample(index tokens, grove::detail::normal_generator& g, matrix& u, matrix& y, std::vector<int>& ids) const {
    u.resize(tokens, input);
    y.resize(tokens, output);
    ids.resize(static_cast<std::size_t>(tokens));
    for (index t = 0; t < tokens; ++t) {
      const double r = g.uniform();
      const auto c = static_cast<index>(std::lower_bound(cdf.begin(), cdf.end(), r) - cdf.begin());
      const index cc = std::min(c, clusters - 1);
      ids[static_cast<std::size_t>(t)] = int(cc);
      for (index i = 0; i < input; ++i) u(t, i) = centers(cc, i) + float(noise * g.normal());
      y.row(t) = u.row(t) * maps[static_cast<std::size_t>(cc)].transpose();
    }
  }
};

// ---- the model's sizes and training settings

struct hyper {
  index hidden = 64, experts = 32, groups = 8, top_k = 4, expert_inter = 32, adjugate_inter = 16;
  double lambda = 0.2;  // <= G / E = 0.25
  index layers = 2;
  double learning_rate = 3e-3, warmup = 20, weight_decay = 0.01;
  double bias_rate = 0.005;
  double norm_eps = 1e-6;
};

/// The projections' first values, w_in [H, D_in] then w_out [D_out, H], N(0, 1/fan_in) drawn
/// from `seed` (both experiments draw the same).
inline std::vector<float> initial_dense(const hyper& h, index d_in, index d_out, std::uint64_t seed) {
  grove::detail::normal_generator g(seed);
  std::vector<float> dense(static_cast<std::size_t>(h.hidden * d_in + d_out * h.hidden));
  for (std::size_t i = 0; i < dense.size(); ++i) {
    const bool first = i < static_cast<std::size_t>(h.hidden * d_in);
    dense[i] = float(g.normal() / std::sqrt(double(first ? d_in : h.hidden)));
  }
  return dense;
}

/// The experiments' AdamW: β₂ = 0.99, the given weight decay.
inline grove::adamw<float> adam(double weight_decay) {
  grove::adamw_options o;
  o.beta2 = 0.99;
  o.weight_decay = weight_decay;
  return grove::adamw<float>(o);
}

/// The learning rate of `step`: a linear warm-up to hp.learning_rate.
inline double learning_rate(const hyper& h, int step) {
  return h.learning_rate * std::min(1.0, double(step + 1) / h.warmup);
}

}  // namespace experiment

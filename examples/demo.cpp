// grove demo: a Grove MoE layer of GroveMoE-Inst's shape with random weights, one batch through
// it, and what happened: configuration, activated parameters, adjugate work saved, speed, and a
// check against the plain per-token reference.
#include <grove/grove.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>

int main(int argc, char** argv) try {
  const grove::index tokens = argc > 1 ? std::atoi(argv[1]) : 128;
  if (tokens < 1) throw grove::error("grove_demo: the token count must be positive");
  const grove::layer_dims dims = grove::grove_moe_inst_dims;
  using config = grove::grove_moe_inst_config<float>;

  std::printf("grove %s demo: one Grove MoE layer of GroveMoE-Inst's shape, random weights (seed 2508)\n\n",
              GROVE_VERSION_STRING);
  std::printf("  hidden H = %td, experts E = %td in G = %td groups of %td, top-k = %d, lambda = %.2f\n", dims.hidden,
              dims.experts, dims.groups, dims.group_size(), config::top_k_at_compile_time, 0.05);
  std::printf("  expert intermediate I = %td, adjugate intermediate Ia = %td\n", dims.expert_intermediate,
              dims.adjugate_intermediate);
  std::printf("  parameters: %.1f M in all\n", double(grove::total_parameters(dims)) / 1e6);

  auto start = std::chrono::steady_clock::now();
  grove::layer layer(config(dims), grove::layer_parameters<float>::random(dims, 2508, 0.02));
  auto seconds_since = [](auto t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  std::printf("  built in %.1f s\n\n", seconds_since(start));

  grove::row_matrix<float> x(tokens, dims.hidden);
  grove::detail::normal_generator gen(7);
  for (grove::index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(gen.normal());

  // Warm up once, then keep the best of three timed runs.
  auto result = layer.forward(x, {.routing = true, .statistics = true});
  double best = 1e30;
  for (int run = 0; run < 3; ++run) {
    start = std::chrono::steady_clock::now();
    result = layer.forward(x, {.routing = true, .statistics = true});
    best = std::min(best, seconds_since(start));
  }
  const grove::activation_stats& s = *result.statistics;
  std::printf("batch of %td tokens:\n", tokens);
  std::printf("  distinct groups per token: min %td, mean %.2f, max %td (bounds %td..%td)\n", s.min_groups,
              s.mean_groups, s.max_groups, (config::top_k_at_compile_time + dims.group_size() - 1) / dims.group_size(),
              std::min<grove::index>(config::top_k_at_compile_time, dims.groups));
  std::printf("  activated parameters per token: %.3f M .. %.3f M (mean %.3f M)\n",
              double(s.min_activated_parameters) / 1e6, double(s.max_activated_parameters) / 1e6,
              s.mean_activated_parameters / 1e6);
  std::printf("  adjugate evaluations: %td, once per pick would be %td: %td saved (%.1f%%)\n", s.adjugate_evaluations,
              s.once_per_pick_evaluations, s.adjugate_evaluations_saved(), 100.0 * s.adjugate_saved_fraction());
  std::printf("  forward: %.1f ms, %.0f tokens/s (best of 3, CPU)\n\n", best * 1e3, double(tokens) / best);

  // The plain per-token reference on a sample of the batch.
  const grove::index sample = std::min<grove::index>(tokens, 4);
  const grove::row_matrix<float> expected = grove::reference::forward(
      layer.weights(), grove::routing_options{layer.config().top_k(), layer.config().scale()}, x.topRows(sample));
  const double difference = (result.y.topRows(sample) - expected).cwiseAbs().maxCoeff();
  const double magnitude = expected.cwiseAbs().maxCoeff();
  const bool matches = difference <= 1e-4 * std::max(1.0, magnitude);
  std::printf("check against the plain scalar reference on %td tokens: max |difference| %.2e (outputs up to %.2e): %s\n",
              sample, difference, magnitude, matches ? "matches" : "MISMATCH");
  return matches ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}

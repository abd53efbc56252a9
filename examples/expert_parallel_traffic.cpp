// What expert parallelism sends, per token and per layer (docs/distributed.md, "What travels"):
// grove's group-aligned exchange (a token goes once to each rank that owns one of its groups, and
// one partial per (token, group) comes back) against a generic expert-level exchange without
// deduplication (one row out and one back per pick, what an expert-parallel layer that knows
// nothing of groups sends). Counted from real routing plans of the released sizes, on random
// routing and on routing skewed by a selection bias; only bytes that leave a rank are counted.
//
//   grove_expert_parallel_traffic [TOKENS]      (default 4096)
#include <grove/grove.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

struct traffic {
  double group_aligned = 0;  // bytes out and back, all ranks
  double expert_level = 0;
  double remote_ranks = 0;   // (token, remote owning rank) pairs
  double remote_groups = 0;  // (token, remote group) pairs
};

// Bytes of one layer's forward on P ranks, tokens homed in contiguous blocks in rank order. The
// sizes are those of grove::expert_parallel_layer's messages: an fp32 row of H values, 16 bytes
// per pick (token, slot, expert, weight); the generic exchange sends a row and 8 bytes (expert,
// weight) per pick and gets a row back.
traffic count(const grove::routing_plan<float>& plan, const grove::group_placement& placement, grove::index hidden) {
  traffic out;
  const double row = 4.0 * static_cast<double>(hidden);
  const int P = placement.ranks();
  std::vector<int> picks_on(static_cast<std::size_t>(P));
  std::vector<char> group_seen(static_cast<std::size_t>(placement.groups()));
  for (grove::index t = 0; t < plan.tokens; ++t) {
    const int home = static_cast<int>(t * P / plan.tokens);
    std::fill(picks_on.begin(), picks_on.end(), 0);
    std::fill(group_seen.begin(), group_seen.end(), 0);
    for (grove::index s = 0; s < plan.top_k; ++s) {
      const grove::index g = plan.topk_ids(t, s) / plan.group_size;
      const int owner = placement.owner_of(g);
      if (owner == home) continue;
      ++picks_on[static_cast<std::size_t>(owner)];
      out.expert_level += 2 * row + 8;
      if (!group_seen[static_cast<std::size_t>(g)]) {
        group_seen[static_cast<std::size_t>(g)] = 1;
        out.remote_groups += 1;
        out.group_aligned += row;  // the partial p(t, g) back
      }
    }
    for (int q = 0; q < P; ++q) {
      if (picks_on[static_cast<std::size_t>(q)] == 0) continue;
      out.remote_ranks += 1;
      out.group_aligned += row + 16.0 * picks_on[static_cast<std::size_t>(q)];
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const grove::index tokens = argc > 1 ? std::atol(argv[1]) : 4096;
  if (tokens <= 0) {
    std::fprintf(stderr, "usage: %s [TOKENS > 0]\n", argv[0]);
    return 2;
  }
  // GroveMoE-Inst: H = 2048, E = 128, G = 64, k = 8. Only the router is needed to route.
  const grove::layer_dims dims{.hidden = 2048, .experts = 128, .groups = 64,
                               .expert_intermediate = 768, .adjugate_intermediate = 128};
  const grove::index k = 8;
  std::mt19937_64 rng(20250811);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> router(static_cast<std::size_t>(dims.experts * dims.hidden));
  const float router_scale = 1.0f / std::sqrt(static_cast<float>(dims.hidden));
  for (float& w : router) w = normal(rng) * router_scale;
  grove::row_matrix<float> x(tokens, dims.hidden);
  for (grove::index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);

  // Skewed: a bias that favours the first 8 groups' 16 experts, as an unbalanced router would.
  std::vector<float> uniform_bias(static_cast<std::size_t>(dims.experts), 0.0f), skewed_bias = uniform_bias;
  for (grove::index e = 0; e < 16; ++e) skewed_bias[static_cast<std::size_t>(e)] = 0.15f;

  std::printf("bytes per token of one layer's forward that leave a rank (H = %lld, E = %lld, G = %lld, k = %lld, "
              "%lld tokens, fp32 rows)\n\n",
              static_cast<long long>(dims.hidden), static_cast<long long>(dims.experts),
              static_cast<long long>(dims.groups), static_cast<long long>(k), static_cast<long long>(tokens));
  std::printf("| routing | hot share | P | placement | remote ranks/token | remote groups/token | group-aligned KiB/token "
              "| expert-level KiB/token | ratio | busiest rank's picks / mean |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (const bool skewed : {false, true}) {
    grove::weights_view<float> weights(dims);
    weights.set_router(router.data());
    weights.set_bias(skewed ? skewed_bias.data() : uniform_bias.data());
    const grove::routing_plan<float> plan = grove::route(weights, {k, 0.05}, x);
    const grove::activation_stats stats = grove::compute_activation_stats(plan, dims);
    grove::index hot = 0;
    for (grove::index e = 0; e < 16; ++e) hot += stats.expert_load[static_cast<std::size_t>(e)];
    const double hot_share = static_cast<double>(hot) / static_cast<double>(tokens * k);
    for (const int P : {2, 4, 8}) {
      for (const bool by_load : {false, true}) {
        const grove::group_placement placement = by_load
                                                     ? grove::group_placement::by_load(stats.expert_load, dims.groups, P)
                                                     : grove::group_placement::balanced(dims.groups, P);
        const traffic t = count(plan, placement, dims.hidden);
        const double per_token = 1.0 / static_cast<double>(tokens);
        const std::vector<grove::index> loads = placement.rank_loads(stats.expert_load);
        const double busiest = static_cast<double>(*std::max_element(loads.begin(), loads.end())) /
                               (static_cast<double>(tokens * k) / static_cast<double>(P));
        std::printf("| %s | %.2f | %d | %s | %.2f | %.2f | %.1f | %.1f | %.2f | %.2f |\n", skewed ? "skewed" : "random",
                    hot_share, P, by_load ? "by load" : "balanced", t.remote_ranks * per_token,
                    t.remote_groups * per_token, t.group_aligned * per_token / 1024.0,
                    t.expert_level * per_token / 1024.0, t.group_aligned / t.expert_level, busiest);
      }
    }
  }
  std::printf("\n(hot share: the picks that go to the 16 experts of groups 0-7; 1/8 under uniform routing)\n");
  return 0;
}

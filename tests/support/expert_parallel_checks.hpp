// Checks of grove::expert_parallel_layer on any communicator, against the single-process layer
// on the ranks' batches concatenated in rank order. test_distributed runs them on one process
// (solo_communicator), tests/mpi/ under mpirun on P = 1 … 4 ranks. Every check is collective:
// all ranks run it, and none uses REQUIRE (a rank that left a check early would leave the others
// waiting in the next exchange).
#pragma once

#include <doctest/doctest.h>

#include "test_support.hpp"

#include <grove/grove.hpp>
#include <grove/training.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace grove_test::ep {

using Index = grove::index;
using config_t = grove::dynamic_config<float>;
using layer_t = grove::expert_parallel_layer<config_t>;

struct shape {
  grove::layer_dims dims;
  Index top_k;
  double scale;
};

/// Shapes whose G is not divisible by 2, 3 or 4 (7, 5), and one of the released group size 2
/// with a wider hidden size (G = 6: divisible by 2 and 3, not by 4).
inline std::vector<shape> shapes() {
  return {
      {grove::layer_dims{24, 14, 7, 20, 8}, 4, 0.05},
      {grove::layer_dims{16, 10, 5, 12, 6}, 3, 0.5},
      {grove::layer_dims{40, 12, 6, 16, 8}, 8, 0.05},
  };
}

/// Rank r's token count: uneven, and rank 1 has none.
inline Index tokens_of(int rank) {
  static const Index counts[] = {6, 0, 11, 4, 9};
  return counts[rank % 5];
}
inline Index first_token_of(int rank) {
  Index first = 0;
  for (int r = 0; r < rank; ++r) first += tokens_of(r);
  return first;
}

inline grove::layer_parameters<float> parameters(const grove::layer_dims& d, std::uint64_t seed, bool with_bias) {
  auto params = grove::layer_parameters<float>::random(d, seed, 0.3);
  if (with_bias)
    for (Index e = 0; e < d.experts; ++e)
      params.bias()[static_cast<std::size_t>(e)] = 0.02f * static_cast<float>((e * 5) % 7) - 0.05f;
  return params;
}

/// The ranks' batches concatenated in rank order, the single-process layer's input.
inline grove::row_matrix<float> all_tokens(int ranks, Index hidden, std::uint64_t seed) {
  return random_matrix<float>(first_token_of(ranks), hidden, seed);
}

inline grove::row_matrix<float> rows_of_rank(const grove::row_matrix<float>& all, int rank) {
  return all.middleRows(first_token_of(rank), tokens_of(rank));
}

inline std::shared_ptr<grove::cpu_runner> runner_with(int threads) {
  grove::cpu_runner_options options;
  options.threads = threads;
  return std::make_shared<grove::cpu_runner>(options);
}

/// How a check places the groups: balanced by count, or by the load of the test's own batch.
enum class placing { balanced, by_load };

/// The placement of `mode` for P ranks; by_load from the picks per expert of the whole batch X
/// (the same on every rank, as every rank has X).
inline grove::group_placement placement_for(placing mode, const grove::layer_parameters<float>& params,
                                            const shape& s, const grove::row_matrix<float>& X, int P) {
  if (mode == placing::balanced) return grove::group_placement::balanced(s.dims.groups, P);
  const grove::routing_plan<float> plan = grove::route(params.view(), {s.top_k, s.scale}, X);
  const grove::activation_stats stats = grove::compute_activation_stats(plan, s.dims);
  return grove::group_placement::by_load(stats.expert_load, s.dims.groups, P);
}

/// What this rank sends in a forward and a backward, by the formulas of docs/distributed.md,
/// from the single-process plan of the whole batch.
struct expected_traffic {
  std::size_t forward_request = 0, forward_reply = 0, backward_request = 0, backward_reply = 0;
  Index tokens_sent = 0;
};
inline expected_traffic traffic_of(const grove::routing_plan<float>& plan, const grove::group_placement& placement,
                                   int P, int rank, Index hidden) {
  expected_traffic out;
  const std::size_t row = 4 * static_cast<std::size_t>(hidden);
  out.forward_request = 16 * static_cast<std::size_t>(P);  // a (tokens, picks) header per rank
  std::size_t own_picks = 0;                               // picks of this rank's groups, all tokens
  for (Index t = 0; t < plan.tokens; ++t) {
    const bool home = t >= first_token_of(rank) && t < first_token_of(rank) + tokens_of(rank);
    std::vector<Index> picks_on(static_cast<std::size_t>(P), 0);
    std::vector<Index> groups;
    for (Index s = 0; s < plan.top_k; ++s) {
      const Index g = plan.topk_ids(t, s) / plan.group_size;
      ++picks_on[static_cast<std::size_t>(placement.owner_of(g))];
      if (placement.owner_of(g) == rank) {
        if (std::find(groups.begin(), groups.end(), g) == groups.end()) groups.push_back(g);
        ++own_picks;
      }
    }
    out.forward_reply += row * groups.size();
    if (!home) continue;
    for (int q = 0; q < P; ++q) {
      if (picks_on[static_cast<std::size_t>(q)] == 0) continue;
      ++out.tokens_sent;
      out.forward_request += row + 16 * static_cast<std::size_t>(picks_on[static_cast<std::size_t>(q)]);
      out.backward_request += row;
    }
  }
  // Back go g's share of dx for each (token, group) row, and a 4-byte dw for each pick.
  out.backward_reply = out.forward_reply + 4 * own_picks;
  return out;
}

/// Forward on every rank equals the single-process forward's rows of that rank, bit for bit.
inline void check_forward(grove::communicator& comm, const shape& s, int threads, bool with_bias,
                          placing mode = placing::balanced) {
  const int P = comm.size(), rank = comm.rank();
  CAPTURE(P);
  CAPTURE(rank);
  CAPTURE(threads);
  const auto params = parameters(s.dims, 11, with_bias);
  const config_t config(s.dims, s.top_k, s.scale);
  const auto X = all_tokens(P, s.dims.hidden, 12);

  const grove::layer<config_t> single(config, params.view(), runner_with(1));
  const grove::row_matrix<float> want = rows_of_rank(single.forward(X), rank);

  const auto placement = placement_for(mode, params, s, X, P);
  CAPTURE(placement.describe());
  layer_t layer(comm, placement, config, params.view().only_groups(placement.groups_of(rank)), runner_with(threads));
  const grove::row_matrix<float> x = rows_of_rank(X, rank);
  const grove::row_matrix<float> y = layer.forward(x);
  CHECK(same_bits(y, want));
  const expected_traffic traffic =
      traffic_of(grove::route(params.view(), {s.top_k, s.scale}, X), placement, P, rank, s.dims.hidden);
  CHECK(layer.last_traffic().request_bytes == traffic.forward_request);
  CHECK(layer.last_traffic().reply_bytes == traffic.forward_reply);
  CHECK(layer.last_traffic().tokens_sent == traffic.tokens_sent);
  // A second call reuses nothing it should not: the same bits again.
  CHECK(same_bits(layer.forward(x), want));
}

/// Backward on every rank: dx of its tokens, the gradients of the tensors it holds (its groups'
/// experts and adjugates, the router) equal the single-process ones, bit for bit; the other
/// groups' gradients stay untouched (zero).
inline void check_backward(grove::communicator& comm, const shape& s, bool keep_activations,
                           placing mode = placing::balanced) {
  const int P = comm.size(), rank = comm.rank();
  CAPTURE(P);
  CAPTURE(rank);
  CAPTURE(keep_activations);
  const auto params = parameters(s.dims, 21, true);
  const config_t config(s.dims, s.top_k, s.scale);
  const auto X = all_tokens(P, s.dims.hidden, 22);
  const auto DY = all_tokens(P, s.dims.hidden, 23);

  auto reference_runner = runner_with(1);
  const grove::routing_plan<float> plan = grove::route(params.view(), {s.top_k, s.scale}, X);
  // dx is added to: both start from one value, as a residual connection's gradient would.
  grove::row_matrix<float> DX = all_tokens(P, s.dims.hidden, 24);
  grove::layer_parameters<float> want(s.dims);
  grove::backward<float>(*reference_runner, params.view(), plan, X, DY, want.span(), DX);

  const auto placement = placement_for(mode, params, s, X, P);
  CAPTURE(placement.describe());
  layer_t layer(comm, placement, config, params.view().only_groups(placement.groups_of(rank)), runner_with(1));
  const grove::row_matrix<float> x = rows_of_rank(X, rank), dy = rows_of_rank(DY, rank);
  const auto forward = layer.forward_for_training(x, keep_activations);
  CHECK(same_bits(forward.y, rows_of_rank(grove::layer<config_t>(config, params.view(), runner_with(1)).forward(X), rank)));
  grove::layer_parameters<float> grads(s.dims);
  grove::row_matrix<float> dx = rows_of_rank(all_tokens(P, s.dims.hidden, 24), rank);
  layer.backward(forward, x, dy, grads.span(), dx);
  CHECK(same_bits(dx, rows_of_rank(DX, rank)));
  const expected_traffic traffic = traffic_of(plan, placement, P, rank, s.dims.hidden);
  CHECK(layer.last_traffic().request_bytes == traffic.backward_request);
  CHECK(layer.last_traffic().reply_bytes == traffic.backward_reply);

  const Index group_size = s.dims.group_size();
  std::vector<const float*> got_tensors, want_tensors;
  std::vector<grove::tensor_info> infos;
  grads.view().for_each_tensor([&](const grove::tensor_info& info, const float* const& p) {
    infos.push_back(info);
    got_tensors.push_back(p);
  });
  want.view().for_each_tensor(
      [&](const grove::tensor_info&, const float* const& p) { want_tensors.push_back(p); });
  for (std::size_t i = 0; i < infos.size(); ++i) {
    const grove::tensor_info& info = infos[i];
    if (info.role == grove::tensor_role::selection_bias) continue;
    const bool expert = info.role == grove::tensor_role::expert_gate || info.role == grove::tensor_role::expert_up ||
                        info.role == grove::tensor_role::expert_down;
    const bool adjugate = info.role == grove::tensor_role::adjugate_gate ||
                          info.role == grove::tensor_role::adjugate_up || info.role == grove::tensor_role::adjugate_down;
    const Index group = expert ? info.owner / group_size : adjugate ? info.owner : -1;
    const bool held = group < 0 || placement.owner_of(group) == rank;
    CAPTURE(info.name);
    const auto n = static_cast<std::size_t>(info.size());
    const std::span<const float> got(got_tensors[i], n);
    if (held) {
      CHECK(same_bits(got, std::span<const float>(want_tensors[i], n)));
    } else {
      const std::vector<float> zeros(n, 0.0f);
      CHECK(same_bits(got, std::span<const float>(zeros)));
    }
  }
}

/// One rank's x of the wrong width ends the call on every rank with an error that names it; the
/// next call works.
inline void check_wrong_width(grove::communicator& comm) {
  const int P = comm.size(), rank = comm.rank();
  const shape s = shapes()[0];
  const auto params = parameters(s.dims, 31, false);
  const config_t config(s.dims, s.top_k, s.scale);
  const auto placement = grove::group_placement::balanced(s.dims.groups, P);
  layer_t layer(comm, placement, config, params.view().only_groups(placement.groups_of(rank)), runner_with(1));
  const int bad = P - 1;
  const auto x = random_matrix<float>(3, rank == bad ? s.dims.hidden + 1 : s.dims.hidden, 32);
  const std::string expected = "grove: expert-parallel forward failed on rank " + std::to_string(bad) +
                               ": grove: input x has " + std::to_string(s.dims.hidden + 1) + " columns, expected H = " +
                               std::to_string(s.dims.hidden);
  CHECK_THROWS_WITH_AS((void)layer.forward(x), expected.c_str(), grove::error);

  const auto X = all_tokens(P, s.dims.hidden, 33);
  const grove::layer<config_t> single(config, params.view(), runner_with(1));
  CHECK(same_bits(layer.forward(rows_of_rank(X, rank)), rows_of_rank(single.forward(X), rank)));

  // dy of the wrong height in backward, on rank 0.
  const auto forward = layer.forward_for_training(rows_of_rank(X, rank));
  grove::layer_parameters<float> grads(s.dims);
  grove::row_matrix<float> dx = grove::row_matrix<float>::Zero(tokens_of(rank), s.dims.hidden);
  const auto dy = random_matrix<float>(tokens_of(rank) + (rank == 0 ? 1 : 0), s.dims.hidden, 34);
  CHECK_THROWS_WITH_AS(layer.backward(forward, rows_of_rank(X, rank), dy, grads.span(), dx),
                       doctest::Contains("grove: expert-parallel backward failed on rank 0: grove: output gradient dy is ["),
                       grove::error);
}

/// A rank whose weights lack a tensor of one of its groups is refused when the layer is built, on
/// every rank, with the tensor's name and the rank.
inline void check_missing_tensor(grove::communicator& comm) {
  const int P = comm.size(), rank = comm.rank();
  const shape s = shapes()[0];
  const auto params = parameters(s.dims, 35, false);
  const config_t config(s.dims, s.top_k, s.scale);
  const auto placement = grove::group_placement::balanced(s.dims.groups, P);
  const int bad = P - 1;
  const Index last_group = placement.end_group(bad) - 1;
  auto weights = params.view().only_groups(placement.groups_of(rank));
  if (rank == bad) weights.set_adjugate(last_group, nullptr, nullptr, nullptr);
  const std::string expected = "grove: expert-parallel layer setup failed on rank " + std::to_string(bad) +
                               ": grove: missing tensor 'chunk_experts." + std::to_string(last_group) +
                               ".gate_proj.weight' in layer weights";
  CHECK_THROWS_WITH_AS(layer_t(comm, placement, config, weights, runner_with(1)), expected.c_str(), grove::error);
}

}  // namespace grove_test::ep

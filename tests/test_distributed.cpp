// Expert parallelism without MPI: group placements, and the expert-parallel layer on one process
// (solo_communicator) against the single-process layer, bit for bit. The same checks run under
// mpirun on 1 to 4 ranks in tests/mpi/.
#include <doctest/doctest.h>

#include "support/expert_parallel_checks.hpp"

#include <grove/grove.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

TEST_SUITE("distributed") {
  TEST_CASE("a balanced placement gives contiguous groups, the first G mod P ranks one more") {
    const auto p = grove::group_placement::balanced(7, 3);
    CHECK(p.ranks() == 3);
    CHECK(p.groups() == 7);
    CHECK(p.groups_of(0) == std::vector<grove::index>{0, 1, 2});
    CHECK(p.groups_of(1) == std::vector<grove::index>{3, 4});
    CHECK(p.groups_of(2) == std::vector<grove::index>{5, 6});
    const int owners[] = {0, 0, 0, 1, 1, 2, 2};
    for (grove::index j = 0; j < 7; ++j) CHECK(p.owner_of(j) == owners[j]);
    CHECK(p.describe() == "0-2 | 3-4 | 5-6");
    CHECK(grove::group_placement::balanced(4, 4).describe() == "0 | 1 | 2 | 3");
  }

  TEST_CASE("placements that would split or leave out a group are refused") {
    CHECK_THROWS_WITH_AS((void)grove::group_placement::balanced(3, 4),
                         "grove: group placement: P = 4 ranks need G >= P groups (G = 3); a group never splits "
                         "across ranks",
                         grove::error);
    CHECK_THROWS_WITH_AS((void)grove::group_placement::balanced(3, 0),
                         "grove: group placement: the rank count P = 0 must be at least 1", grove::error);
    const std::vector<grove::index> counts{2, 0, 1};
    CHECK_THROWS_WITH_AS((void)grove::group_placement(counts),
                         "grove: group placement: rank 1 would hold 0 groups; every rank holds one at least",
                         grove::error);
  }

  TEST_CASE("the placement by load has the smallest largest rank load of every contiguous placement") {
    // Every contiguous placement of G groups on P ranks, by brute force: the reference.
    const auto smallest_largest = [](const std::vector<grove::index>& group_load, int P) {
      const auto G = static_cast<grove::index>(group_load.size());
      grove::index best = -1;
      std::vector<grove::index> cuts;  // rank r's first group, r = 1 … P-1
      const auto search = [&](auto&& self, grove::index from, int rank, grove::index worst) -> void {
        if (rank == P - 1) {
          grove::index last = 0;
          for (grove::index j = from; j < G; ++j) last += group_load[static_cast<std::size_t>(j)];
          const grove::index w = std::max(worst, last);
          if (best < 0 || w < best) best = w;
          return;
        }
        grove::index load = 0;
        for (grove::index end = from + 1; end + (P - 1 - rank) <= G; ++end) {
          load += group_load[static_cast<std::size_t>(end - 1)];
          self(self, end, rank + 1, std::max(worst, load));
        }
      };
      search(search, 0, 0, 0);
      return best;
    };
    std::uint64_t state = 12345;
    const auto next = [&] {
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      return static_cast<grove::index>((state >> 33) % 50);
    };
    for (const grove::index group_size : {1, 2, 3}) {
      for (const grove::index G : {1, 2, 5, 7, 9}) {
        for (int P = 1; P <= G && P <= 5; ++P) {
          std::vector<grove::index> expert_load(static_cast<std::size_t>(G * group_size));
          for (auto& load : expert_load) load = next();
          if (G > 2) expert_load[static_cast<std::size_t>(group_size)] += 400;  // one hot group
          std::vector<grove::index> group_load(static_cast<std::size_t>(G), 0);
          for (grove::index e = 0; e < G * group_size; ++e)
            group_load[static_cast<std::size_t>(e / group_size)] += expert_load[static_cast<std::size_t>(e)];
          CAPTURE(group_size);
          CAPTURE(G);
          CAPTURE(P);
          const auto placement = grove::group_placement::by_load(expert_load, G, P);
          CAPTURE(placement.describe());
          CHECK(placement.ranks() == P);
          CHECK(placement.groups() == G);
          const auto loads = placement.rank_loads(expert_load);
          CHECK(*std::max_element(loads.begin(), loads.end()) == smallest_largest(group_load, P));
          grove::index total = 0;
          for (const auto load : loads) total += load;
          CHECK(total == std::accumulate(expert_load.begin(), expert_load.end(), grove::index{0}));
        }
      }
    }
    // A hot group alone on a rank, its cold neighbours together.
    const std::vector<grove::index> skewed{1, 1, 90, 1, 1, 1};
    CHECK(grove::group_placement::by_load(skewed, 6, 3).describe() == "0-1 | 2 | 3-5");
    // Equal loads: the ties go to the earlier ranks.
    const std::vector<grove::index> flat(7, 3);
    CHECK(grove::group_placement::by_load(flat, 7, 3).describe() == "0-2 | 3-4 | 5-6");
  }

  TEST_CASE("a placement by load refuses loads that do not fit the layer") {
    const std::vector<grove::index> five(5, 1);
    CHECK_THROWS_WITH_AS((void)grove::group_placement::by_load(five, 2, 2),
                         "grove: group placement by load: 5 expert loads cannot form G = 2 groups of equal size",
                         grove::error);
    const std::vector<grove::index> negative{1, -2, 3, 4};
    CHECK_THROWS_WITH_AS((void)grove::group_placement::by_load(negative, 2, 2),
                         "grove: group placement by load: expert 1 has the negative load -2", grove::error);
    const std::vector<grove::index> four(4, 1);
    CHECK_THROWS_AS((void)grove::group_placement::by_load(four, 2, 3), grove::error);
    CHECK_THROWS_AS((void)grove::group_placement::balanced(2, 2).rank_loads(five), grove::error);
  }

  TEST_CASE("on one process the expert-parallel layer is the single-process layer, bit for bit") {
    grove::solo_communicator comm;
    for (const auto& s : grove_test::ep::shapes()) {
      grove_test::ep::check_forward(comm, s, 1, false);
      grove_test::ep::check_forward(comm, s, 2, true);
      grove_test::ep::check_backward(comm, s, true);
      grove_test::ep::check_backward(comm, s, false);
    }
  }

  TEST_CASE("bad input to the expert-parallel layer names the rank") {
    grove::solo_communicator comm;
    grove_test::ep::check_wrong_width(comm);
    grove_test::ep::check_missing_tensor(comm);
    const auto s = grove_test::ep::shapes()[0];
    const auto params = grove_test::ep::parameters(s.dims, 1, false);
    const grove_test::ep::config_t config(s.dims, s.top_k, s.scale);
    CHECK_THROWS_WITH_AS(grove_test::ep::layer_t(comm, grove::group_placement::balanced(s.dims.groups, 2), config,
                                                 params.view()),
                         "grove: expert-parallel layer setup failed on rank 0: grove: the placement is for 2 ranks "
                         "but the communicator has 1",
                         grove::error);
  }
}

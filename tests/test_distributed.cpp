// Expert parallelism without MPI: group placements, and the expert-parallel layer on one process
// (solo_communicator) against the single-process layer, bit for bit. The same checks run under
// mpirun on 1 to 4 ranks in tests/mpi/.
#include <doctest/doctest.h>

#include "support/expert_parallel_checks.hpp"

#include <grove/grove.hpp>

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

// Expert parallelism over MPI, under mpirun on P = 1 … 4 ranks (tests/mpi/CMakeLists.txt): every
// rank's forward and backward equal the single-process layer's on the ranks' batches concatenated
// in rank order, bit for bit, on shapes whose G is not divisible by P; errors on one rank end the
// call on all of them, naming it.
#include <doctest/doctest.h>

#include "support/expert_parallel_checks.hpp"

#include <grove/mpi.hpp>

#include <string>

TEST_SUITE("mpi") {
  TEST_CASE("forward and backward on P ranks are the single-process layer's, bit for bit") {
    grove::mpi_communicator comm;
    for (const auto& s : grove_test::ep::shapes()) {
      if (s.dims.groups < comm.size()) continue;
      grove_test::ep::check_forward(comm, s, 1, false);
      grove_test::ep::check_forward(comm, s, 2, true);
      grove_test::ep::check_backward(comm, s, true);
      grove_test::ep::check_backward(comm, s, false);
      grove_test::ep::check_forward(comm, s, 2, true, grove_test::ep::placing::by_load);
      grove_test::ep::check_backward(comm, s, true, grove_test::ep::placing::by_load);
    }
  }

  TEST_CASE("an error on one rank ends the call on every rank, naming it; the next call works") {
    grove::mpi_communicator comm;
    grove_test::ep::check_wrong_width(comm);
  }

  TEST_CASE("a rank that lacks a tensor of its groups is refused at setup, naming both") {
    grove::mpi_communicator comm;
    grove_test::ep::check_missing_tensor(comm);
  }

  TEST_CASE("ranks that disagree on the layer are refused at setup") {
    grove::mpi_communicator comm;
    const auto s = grove_test::ep::shapes()[0];
    const auto params = grove_test::ep::parameters(s.dims, 1, false);
    const int P = comm.size(), rank = comm.rank();
    const auto placement = grove::group_placement::balanced(s.dims.groups, P);
    // The last rank asks for one pick more.
    const grove_test::ep::config_t config(s.dims, s.top_k + (rank == P - 1 && P > 1 ? 1 : 0), s.scale);
    if (P == 1) return;
    const std::string expected = "grove: expert-parallel layer setup failed on rank " + std::to_string(P - 1) +
                                 ": this rank's layer is ";
    CHECK_THROWS_WITH_AS(
        grove_test::ep::layer_t(comm, placement, config, params.view().only_groups(placement.groups_of(rank))),
        doctest::Contains(expected.c_str()), grove::error);
  }

  TEST_CASE("the communicator's exchanges deliver every block to its rank") {
    grove::mpi_communicator comm;
    const int P = comm.size(), rank = comm.rank();
    CHECK(comm.name() == "mpi (" + std::to_string(P) + (P == 1 ? " rank)" : " ranks)"));
    // Rank r sends q + 1 bytes of value 16 r + q to rank q.
    std::vector<std::byte> send;
    std::vector<std::size_t> counts;
    for (int q = 0; q < P; ++q) {
      counts.push_back(static_cast<std::size_t>(q) + 1);
      for (int i = 0; i <= q; ++i) send.push_back(static_cast<std::byte>(16 * rank + q));
    }
    std::vector<std::byte> recv;
    std::vector<std::size_t> recv_counts;
    comm.all_to_all_v(send, counts, recv, recv_counts);
    std::vector<std::byte> want;
    for (int p = 0; p < P; ++p)
      for (int i = 0; i <= rank; ++i) want.push_back(static_cast<std::byte>(16 * p + rank));
    CHECK(recv == want);
    CHECK(recv_counts == std::vector<std::size_t>(static_cast<std::size_t>(P), static_cast<std::size_t>(rank) + 1));
    const std::vector<int> ranks = grove::gather_in_rank_order(comm, std::span<const int>(&rank, 1));
    std::vector<int> want_ranks;
    for (int p = 0; p < P; ++p) want_ranks.push_back(p);
    CHECK(ranks == want_ranks);
    // Counts that do not cover the buffer: refused on every rank, nobody waits.
    const std::vector<std::size_t> short_counts(static_cast<std::size_t>(P), 0);
    const auto bad = rank == 0 ? std::span<const std::size_t>(short_counts) : std::span<const std::size_t>(counts);
    CHECK_THROWS_AS(comm.all_to_all_v(send, bad, recv, recv_counts), grove::error);
  }
}

#pragma once

// grove's communicator over MPI (target grove::mpi; docs/distributed.md). Only the C API is used,
// and only collectives whose result does not depend on a summation order: all-to-all-v,
// all-gather(-v), and an integer max for agreeing on a message-size failure.

#include <mpi.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "grove/distributed/communicator.hpp"
#include "grove/error.hpp"

GROVE_BEGIN_NAMESPACE

/// A communicator over an MPI communicator (MPI_COMM_WORLD by default). It works on its own
/// duplicate of `comm`, so that grove's messages never meet the caller's, and that duplicate
/// returns MPI errors instead of aborting: they become grove::error. MPI must be initialised
/// (MPI_Init) before and finalised after every mpi_communicator's life.
class mpi_communicator final : public communicator {
 public:
  explicit mpi_communicator(MPI_Comm comm = MPI_COMM_WORLD) {
    int initialised = 0, finalised = 0;
    MPI_Initialized(&initialised);
    MPI_Finalized(&finalised);
    detail::require(initialised != 0 && finalised == 0,
                    "grove: mpi_communicator needs MPI initialised (MPI_Init) and not yet finalised");
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~mpi_communicator() override {
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (!finalised) MPI_Comm_free(&comm_);
  }

  [[nodiscard]] int rank() const override { return rank_; }
  [[nodiscard]] int size() const override { return size_; }
  [[nodiscard]] std::string name() const override {
    return "mpi (" + std::to_string(size_) + (size_ == 1 ? " rank)" : " ranks)");
  }
  [[nodiscard]] MPI_Comm handle() const { return comm_; }

  /// How many ranks of this communicator share this rank's node (shared memory): a program
  /// divides the node's cores by it to give each rank its share. Collective.
  [[nodiscard]] int ranks_on_this_node() const {
    MPI_Comm node = MPI_COMM_NULL;
    check(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node), "MPI_Comm_split_type");
    int count = 1;
    MPI_Comm_size(node, &count);
    MPI_Comm_free(&node);
    return count;
  }

  void all_to_all_v(std::span<const std::byte> send, std::span<const std::size_t> send_counts,
                    std::vector<std::byte>& recv, std::vector<std::size_t>& recv_counts) override {
    const auto P = static_cast<std::size_t>(size_);
    // A bad call here is a bug in the caller, on this rank only: agree before any rank waits.
    std::size_t total = 0;
    for (const std::size_t n : send_counts) total += n;
    agree_local(send_counts.size() == P && total == send.size(),
                "grove: all_to_all_v: the send counts do not cover the send buffer");

    std::vector<std::uint64_t> out(send_counts.begin(), send_counts.end()), in(P);
    check(MPI_Alltoall(out.data(), 1, MPI_UINT64_T, in.data(), 1, MPI_UINT64_T, comm_), "MPI_Alltoall");
    recv_counts.assign(in.begin(), in.end());
    std::vector<int> sc, sd, rc, rd;
    const bool fits = to_ints(send_counts, sc, sd) && to_ints(recv_counts, rc, rd);
    agree_local(fits, "grove: all_to_all_v: a message or a rank's total exceeds MPI's int counts (2 GiB)");
    recv.resize(static_cast<std::size_t>(rd.empty() ? 0 : rd.back()) + (rc.empty() ? 0 : static_cast<std::size_t>(rc.back())));
    std::byte dummy{};
    check(MPI_Alltoallv(send.empty() ? &dummy : send.data(), sc.data(), sd.data(), MPI_BYTE,
                        recv.empty() ? &dummy : recv.data(), rc.data(), rd.data(), MPI_BYTE, comm_),
          "MPI_Alltoallv");
  }

  void all_gather_v(std::span<const std::byte> send, std::vector<std::byte>& recv,
                    std::vector<std::size_t>& counts) override {
    const auto P = static_cast<std::size_t>(size_);
    const std::uint64_t own = send.size();
    std::vector<std::uint64_t> all(P);
    check(MPI_Allgather(&own, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, comm_), "MPI_Allgather");
    counts.assign(all.begin(), all.end());
    std::vector<int> rc, rd;
    agree_local(to_ints(counts, rc, rd), "grove: all_gather_v: the gathered bytes exceed MPI's int counts (2 GiB)");
    recv.resize(static_cast<std::size_t>(rd.back()) + static_cast<std::size_t>(rc.back()));
    std::byte dummy{};
    check(MPI_Allgatherv(send.empty() ? &dummy : send.data(), static_cast<int>(own), MPI_BYTE,
                         recv.empty() ? &dummy : recv.data(), rc.data(), rd.data(), MPI_BYTE, comm_),
          "MPI_Allgatherv");
  }

 private:
  /// Counts and displacements as MPI's ints; false when they do not fit.
  static bool to_ints(std::span<const std::size_t> counts, std::vector<int>& c, std::vector<int>& d) {
    c.clear();
    d.clear();
    std::size_t at = 0;
    bool fits = true;
    for (const std::size_t n : counts) {
      fits = fits && n <= static_cast<std::size_t>(INT_MAX) && at <= static_cast<std::size_t>(INT_MAX);
      c.push_back(fits ? static_cast<int>(n) : 0);
      d.push_back(fits ? static_cast<int>(at) : 0);
      at += n;
    }
    return fits && at <= static_cast<std::size_t>(INT_MAX);
  }

  /// Throws on every rank when `ok` is false on any (an integer max: exact in any order).
  void agree_local(bool ok, const char* message) {
    int failed = ok ? 0 : 1, any = 0;
    check(MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, comm_), "MPI_Allreduce");
    if (any != 0) throw error(failed ? std::string(message) : std::string(message) + " (on another rank)");
  }

  static void check(int code, const char* call) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw error(std::string("grove: ") + call + " failed: " + std::string(text, static_cast<std::size_t>(length)));
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

GROVE_END_NAMESPACE

#pragma once

// What expert parallelism needs from a message-passing library, and nothing more
// (docs/distributed.md): an all-to-all of variable-sized byte blocks, an all-gather of them, and
// agreement on errors. MPI implements it (grove/mpi/mpi_communicator.hpp); NCCL could, for the
// CUDA runner. Float reductions are not part of it on purpose: MPI_Allreduce may sum in an order
// that changes with the process count and the message size, so grove gathers the terms and sums
// them itself in rank order (gather_in_rank_order below).
//
// Eigen-free and MPI-free: the core never needs MPI.

#include <cstddef>
#include <cstring>
#include <exception>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "grove/error.hpp"
#include "grove/version.hpp"

GROVE_BEGIN_NAMESPACE

/// A group of P processes (ranks 0 … P-1) that run one expert-parallel layer together. Every
/// call is collective: every rank makes it, in the same order, or none does. A call that fails
/// on one rank fails on all of them (the implementation's job), so that no rank waits forever.
class communicator {
 public:
  communicator() = default;
  communicator(const communicator&) = delete;
  communicator& operator=(const communicator&) = delete;
  virtual ~communicator() = default;

  [[nodiscard]] virtual int rank() const = 0;
  [[nodiscard]] virtual int size() const = 0;
  /// What this is, for logs: "mpi (4 ranks)".
  [[nodiscard]] virtual std::string name() const = 0;

  /// Each rank sends block q of `send` (send_counts[q] bytes, blocks back to back in rank
  /// order) to rank q, and receives rank p's block for it as block p of `recv` (recv_counts[p]
  /// bytes). send_counts has size() entries; recv and recv_counts are resized.
  virtual void all_to_all_v(std::span<const std::byte> send, std::span<const std::size_t> send_counts,
                            std::vector<std::byte>& recv, std::vector<std::size_t>& recv_counts) = 0;

  /// Every rank's `send`, on every rank, in rank order: block p of `recv` (counts[p] bytes) is
  /// rank p's.
  virtual void all_gather_v(std::span<const std::byte> send, std::vector<std::byte>& recv,
                            std::vector<std::size_t>& counts) = 0;

  /// Agreement on errors: every rank passes what went wrong on it since the last collective
  /// call (empty: nothing). When any rank failed, every rank throws one grove::error that lists
  /// the failed ranks and their messages, in rank order, after `context`:
  ///   "grove: expert-parallel forward failed on rank 1: grove: x has 7 columns, expected H = 16"
  void agree(std::string_view context, std::string_view failure) {
    const std::string own(failure);
    std::vector<std::byte> all;
    std::vector<std::size_t> counts;
    all_gather_v(std::as_bytes(std::span<const char>(own.data(), own.size())), all, counts);
    std::string message;
    std::size_t at = 0;
    for (std::size_t p = 0; p < counts.size(); ++p) {
      if (counts[p] != 0) {
        message += message.empty() ? "grove: " + std::string(context) + " failed on rank " : "; on rank ";
        message += std::to_string(p) + ": ";
        message.append(reinterpret_cast<const char*>(all.data()) + at, counts[p]);
      }
      at += counts[p];
    }
    if (!message.empty()) throw error(message);
  }

  /// Runs `local` (work that involves no other rank), catching what it throws, then agrees:
  /// either every rank goes on or every rank throws. Every step of an expert-parallel call
  /// between two exchanges runs through here, so an error on one rank (bad input, a failed
  /// allocation) never leaves the others waiting in the next exchange.
  template <class Local>
  void step(std::string_view context, Local&& local) {
    std::string failure;
    try {
      local();
    } catch (const std::bad_alloc&) {
      failure = "out of memory";
    } catch (const std::exception& e) {
      failure = e.what();
      if (failure.empty()) failure = "an exception without a message";
    }
    agree(context, failure);
  }
};

/// The communicator of one process alone: P = 1, every exchange a copy. For expert-parallel
/// code run without MPI, and for tests.
class solo_communicator final : public communicator {
 public:
  [[nodiscard]] int rank() const override { return 0; }
  [[nodiscard]] int size() const override { return 1; }
  [[nodiscard]] std::string name() const override { return "solo (1 rank)"; }
  void all_to_all_v(std::span<const std::byte> send, std::span<const std::size_t> send_counts,
                    std::vector<std::byte>& recv, std::vector<std::size_t>& recv_counts) override {
    detail::require(send_counts.size() == 1 && send_counts[0] == send.size(),
                    "grove: all_to_all_v: the send counts do not cover the send buffer");
    recv.assign(send.begin(), send.end());
    recv_counts.assign(1, send.size());
  }
  void all_gather_v(std::span<const std::byte> send, std::vector<std::byte>& recv,
                    std::vector<std::size_t>& counts) override {
    recv.assign(send.begin(), send.end());
    counts.assign(1, send.size());
  }
};

namespace detail {

/// Byte blocks of trivially copyable values, written and read back by memcpy (a received
/// buffer is not aligned for T).
template <class T>
void append_values(std::vector<std::byte>& out, std::span<const T> values) {
  static_assert(std::is_trivially_copyable_v<T>, "only trivially copyable values travel as bytes");
  const std::size_t at = out.size();
  out.resize(at + values.size_bytes());
  if (!values.empty()) std::memcpy(out.data() + at, values.data(), values.size_bytes());
}
template <class T>
void append_value(std::vector<std::byte>& out, const T& value) {
  append_values(out, std::span<const T>(&value, 1));
}

/// Reads values back from a received block, refusing to read past its end (a peer that sent
/// less than it announced is a bug, not a crash).
class byte_reader {
 public:
  explicit byte_reader(std::span<const std::byte> block) : block_(block) {}
  template <class T>
  void read(std::span<T> out) {
    static_assert(std::is_trivially_copyable_v<T>, "only trivially copyable values travel as bytes");
    require(out.size_bytes() <= block_.size() - at_, "grove: a received message is shorter than its header says (",
            block_.size(), " bytes)");
    if (!out.empty()) std::memcpy(out.data(), block_.data() + at_, out.size_bytes());
    at_ += out.size_bytes();
  }
  template <class T>
  T read() {
    T value;
    read(std::span<T>(&value, 1));
    return value;
  }
  [[nodiscard]] bool done() const { return at_ == block_.size(); }

 private:
  std::span<const std::byte> block_;
  std::size_t at_ = 0;
};

}  // namespace detail

/// Every rank's values, concatenated in rank order, on every rank (all_gather_v of typed
/// values). What grove reduces across ranks it gathers with this and sums itself, in a fixed
/// order, so that the sum is the same bits for every process count.
template <class T>
std::vector<T> gather_in_rank_order(communicator& comm, std::span<const T> values) {
  std::vector<std::byte> bytes;
  std::vector<std::size_t> counts;
  comm.all_gather_v(std::as_bytes(values), bytes, counts);
  detail::require(bytes.size() % sizeof(T) == 0, "grove: gather_in_rank_order: ", bytes.size(),
                  " bytes received are not whole values of ", sizeof(T), " bytes");
  std::vector<T> out(bytes.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

GROVE_END_NAMESPACE

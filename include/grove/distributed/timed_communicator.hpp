#pragma once

// A communicator that times another one (docs/distributed.md, "Speed"): every exchange goes to
// the wrapped communicator, and the wall-clock seconds spent in them add up, so that a program
// can tell how much of an expert-parallel call was communication. A rank that waits for a slower
// rank waits inside an exchange, so that time counts as communication too.

#include <chrono>
#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "grove/distributed/communicator.hpp"
#include "grove/version.hpp"

GROVE_BEGIN_NAMESPACE

class timed_communicator final : public communicator {
 public:
  /// `inner` must outlive this communicator.
  explicit timed_communicator(communicator& inner) : inner_(&inner) {}

  [[nodiscard]] int rank() const override { return inner_->rank(); }
  [[nodiscard]] int size() const override { return inner_->size(); }
  [[nodiscard]] std::string name() const override { return "timed " + inner_->name(); }

  void all_to_all_v(std::span<const std::byte> send, std::span<const std::size_t> send_counts,
                    std::vector<std::byte>& recv, std::vector<std::size_t>& recv_counts) override {
    const auto start = clock::now();
    inner_->all_to_all_v(send, send_counts, recv, recv_counts);
    add(start);
  }
  void all_gather_v(std::span<const std::byte> send, std::vector<std::byte>& recv,
                    std::vector<std::size_t>& counts) override {
    const auto start = clock::now();
    inner_->all_gather_v(send, recv, counts);
    add(start);
  }

  /// Seconds spent in exchanges (agreement on errors included) since the last reset.
  [[nodiscard]] double seconds() const { return seconds_; }
  /// Exchanges made since the last reset.
  [[nodiscard]] std::size_t exchanges() const { return exchanges_; }
  void reset() {
    seconds_ = 0;
    exchanges_ = 0;
  }

 private:
  using clock = std::chrono::steady_clock;
  void add(clock::time_point start) {
    seconds_ += std::chrono::duration<double>(clock::now() - start).count();
    ++exchanges_;
  }

  communicator* inner_;
  double seconds_ = 0;
  std::size_t exchanges_ = 0;
};

GROVE_END_NAMESPACE

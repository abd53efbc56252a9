#pragma once

// `mpirun -np P grove run …` (docs/cli.md, "Under mpirun"): `grove run` as one rank of an
// expert-parallel layer (grove/distributed/expert_parallel.hpp), with the one-process contract.
//   - Rank 0 reads IN and writes OUT; the other ranks read only their share of the checkpoint.
//   - The tokens of x (and dy) are split into contiguous, nearly equal blocks in rank order (the
//     first T mod P ranks get one more), each rank routes its block, and the groups are placed
//     with group_placement::balanced.
//   - The results come back to rank 0 in rank order, which writes the same OUT bytes as
//     `grove run` in one process: the layer is bit for bit the single-process one.
//   - Without --threads each rank runs the node's hardware threads divided by the ranks on it.
//   - An error on any rank ends the command on every rank (exit 1); rank 0 prints it, naming the
//     rank.

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include <grove/mpi.hpp>

#include "cli_support.hpp"

namespace grove_cli {

/// Whether an MPI launcher started this process (Open MPI's mpirun, MPICH's Hydra, or any
/// PMIx launcher). Only then does `grove` initialise MPI: a plain `grove run` never touches it.
inline bool launched_by_mpi() {
  for (const char* variable : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(variable) != nullptr) return true;
  return false;
}

/// MPI_Init and MPI_Finalize around the tool's work when an MPI launcher started it; otherwise
/// one process of rank 0.
class mpi_session {
 public:
  mpi_session(int& argc, char**& argv) : active_(launched_by_mpi()) {
    if (!active_) return;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }
  mpi_session(const mpi_session&) = delete;
  mpi_session& operator=(const mpi_session&) = delete;
  ~mpi_session() {
    if (active_) MPI_Finalize();
  }
  [[nodiscard]] int rank() const { return rank_; }
  [[nodiscard]] int size() const { return size_; }

 private:
  bool active_;
  int rank_ = 0;
  int size_ = 1;
};

namespace ep {

/// Rank 0's rows [T, cols], block q to rank q (grove::first_row_of_rank); the other ranks pass
/// nothing.
/// Collective; returns this rank's block.
inline matrix scatter_rows(grove::communicator& comm, const matrix& on_root, index cols) {
  const int P = comm.size();
  std::vector<std::size_t> send_counts(static_cast<std::size_t>(P), 0);
  if (comm.rank() == 0) {
    for (int q = 0; q < P; ++q)
      send_counts[static_cast<std::size_t>(q)] = static_cast<std::size_t>(
          (grove::first_row_of_rank(on_root.rows(), P, q + 1) - grove::first_row_of_rank(on_root.rows(), P, q)) * cols) *
          sizeof(float);
  }
  const std::span<const float> values =
      comm.rank() == 0 ? std::span<const float>(on_root.data(), static_cast<std::size_t>(on_root.size()))
                       : std::span<const float>();
  std::vector<std::byte> received;
  std::vector<std::size_t> received_counts;
  comm.all_to_all_v(std::as_bytes(values), send_counts, received, received_counts);
  matrix mine(static_cast<index>(received.size() / sizeof(float)) / cols, cols);
  if (!received.empty()) std::memcpy(mine.data(), received.data(), received.size());
  return mine;
}

/// The whole layer's gradients from every rank's shard: each rank's groups from that rank, the
/// router (replicated, the same bits on every rank) from rank 0. Collective.
inline grove::layer_parameters<float> gather_gradients(grove::communicator& comm,
                                                       const grove::group_placement& placement,
                                                       const grove::layer_parameters<float>& mine) {
  const grove::layer_dims& dims = mine.dims();
  const std::vector<float> all = grove::gather_in_rank_order(comm, mine.values());
  grove::layer_parameters<float> whole(dims);
  std::vector<float*> destination;
  whole.span().for_each_tensor([&](const grove::tensor_info&, float* const& p) { destination.push_back(p); });
  std::size_t at = 0;
  for (int q = 0; q < placement.ranks(); ++q) {
    grove::layer_parameters<float> part = grove::layer_parameters<float>::shard(dims, placement.groups_of(q));
    grove::detail::require(at + part.values().size() <= all.size(), "grove: rank ", q, " sent too few gradients");
    std::copy_n(all.begin() + static_cast<std::ptrdiff_t>(at), part.values().size(), part.values().begin());
    at += part.values().size();
    std::size_t tensor = 0;
    part.view().for_each_tensor([&](const grove::tensor_info& info, const float* const& p) {
      float* to = destination[tensor++];
      const bool copy = p != nullptr && info.role != grove::tensor_role::selection_bias &&
                        (info.role != grove::tensor_role::router || q == 0);
      if (copy) std::copy_n(p, info.size(), to);
    });
  }
  grove::detail::require(at == all.size(), "grove: the ranks sent more gradients than the layer has");
  return whole;
}

/// This rank's part of the run: its groups' tensors, the expert-parallel layer, and the results
/// of every rank gathered in rank order.
template <class Format>
run_results run_rank(grove::mpi_communicator& comm, const run_options& o, const run_setup& s,
                     const io::checkpoint& weights, const grove::group_placement& placement, int threads,
                     const matrix& x, const std::optional<matrix>& dy) {
  const index H = s.dims.hidden;
  std::optional<grove::layer_parameters<Format>> shard;
  std::shared_ptr<grove::cpu_runner> runner;
  comm.step("grove run: loading this rank's groups", [&] {
    shard.emplace(io::load_layer<Format>(weights, o.prefix, placement.groups_of(comm.rank())));
    runner = make_runner(o, threads);
  });
  // The layer owns the shard: a BF16 view could not carry the fp32 selection bias.
  grove::expert_parallel_layer<cli_config_in<Format>> layer(comm, placement,
                                                            cli_config_in<Format>(s.dims, s.top_k, s.scale),
                                                            std::move(*shard), runner);
  grove::expert_parallel_forward<float> forward;
  std::optional<grove::layer_parameters<float>> gradients;
  matrix dx;
  if constexpr (std::is_same_v<Format, float>) {
    if (dy) {
      forward = layer.forward_for_training(x);
      comm.step("grove run: backward buffers", [&] {
        gradients.emplace(grove::layer_parameters<float>::shard(s.dims, placement.groups_of(comm.rank())));
        dx = matrix::Zero(x.rows(), H);
      });
      layer.backward(forward, x, *dy, gradients->span(), dx);
    } else {
      layer.forward(x, forward);
    }
  } else {
    layer.forward(x, forward);
  }
  run_results r;
  r.y = grove::gather_rows_in_rank_order<float>(comm, forward.y);
  r.routing.logits = grove::gather_rows_in_rank_order<float>(comm, forward.plan.logits);
  r.routing.topk_ids = grove::gather_rows_in_rank_order<std::int32_t>(comm, forward.plan.topk_ids);
  r.routing.topk_weights = grove::gather_rows_in_rank_order<float>(comm, forward.plan.topk_weights);
  r.routing.tokens = r.y.rows();
  if (gradients)
    r.gradients = backward_outputs{grove::gather_rows_in_rank_order<float>(comm, dx),
                                   gather_gradients(comm, placement, *gradients)};
  return r;
}

}  // namespace ep

/// `grove run` on every rank of MPI_COMM_WORLD (P > 1). Returns the exit code; throws the
/// agreed grove::error (the same on every rank) when any rank failed.
inline int run_expert_parallel(const run_options& o) {
  grove::mpi_communicator comm;
  const int P = comm.size(), rank = comm.rank();
  const int on_node = comm.ranks_on_this_node();
  const int threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / std::max(1, on_node));

  // 1. Every rank: the layer's sizes from the checkpoint's headers; rank 0 reads x (and dy).
  std::optional<io::checkpoint> weights;
  std::optional<io::safetensors_reader> in;
  std::optional<grove::group_placement> placement;
  run_setup s;
  matrix x_all;
  std::optional<matrix> dy_all;
  comm.step("grove run", [&] {
    weights.emplace(o.weights);
    s = prepare_run(o, *weights, /*warn=*/rank == 0);
    placement.emplace(grove::group_placement::balanced(s.dims.groups, P));  // needs P <= G
    if (rank != 0) return;
    in.emplace(o.input);
    x_all = read_rows(*in, "x", s.dims.hidden);
    if (o.backward) dy_all = read_dy(*in, x_all, s.dims.hidden);
  });

  // 2. Each rank's block of tokens, then the layer.
  const matrix x = ep::scatter_rows(comm, x_all, s.dims.hidden);
  std::optional<matrix> dy;
  if (o.backward) dy = ep::scatter_rows(comm, dy_all ? *dy_all : matrix(), s.dims.hidden);
  const run_results r = with_cli_format(s.dtype, [&]<class Format>() {
    return ep::run_rank<Format>(comm, o, s, *weights, *placement, threads, x, dy);
  });

  // 3. Rank 0 checks and writes OUT; every rank learns whether that worked.
  comm.step("grove run", [&] {
    if (rank == 0) write_run_output(o, r, x_all, *in, s.top_k, s.scale);
  });
  if (rank == 0) print_wrote(o, r, s.routing, s.top_k, s.scale);
  return 0;
}

/// Any other command under mpirun: rank 0 runs it, and every rank exits as rank 0 does.
template <class Command>
int run_on_rank_zero(Command&& command) {
  grove::mpi_communicator comm;
  int code = 0;
  comm.step("grove", [&] {
    if (comm.rank() == 0) code = command();
  });
  const std::vector<int> codes = grove::gather_in_rank_order(comm, std::span<const int>(&code, 1));
  return codes.front();
}

}  // namespace grove_cli

// Expert parallelism under mpirun on one machine (docs/distributed.md, "Speed"), at GroveMoE-Inst's
// shape (H = 2048, E = 128, G = 64, k = 8, I = 768, Ia = 128), fp32, one thread per rank:
//
//   expert_parallel/T:<T>   grove::expert_parallel_layer::forward of T tokens per rank: routing,
//                           the three exchanges and the local experts; counters comm_share (the
//                           share of the time inside exchanges, waits included) and sent_KiB
//                           (bytes this rank sent per call)
//   local_experts/T:<T>     the same rank's local experts on the rows it received in that forward,
//                           with no exchange: the baseline, in the same run, that the exchange
//                           adds to
//   training_step/T:<T>     forward_for_training + backward (activations kept)
//
//   mpirun -np 2 --bind-to core build/bench/bench_expert_parallel [--benchmark_repetitions=3]
//
// Every rank runs every case the same fixed number of iterations (the calls are collective,
// so Google Benchmark must not choose an iteration count per rank); rank 0 reports, and the
// times are rank 0's. Each rank holds its own groups' weights only (a shard). The program has
// its own main instead of BENCHMARK_MAIN(), because MPI_Init must come first.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <benchmark/benchmark.h>

#include <mpi.h>

#include <grove/grove.hpp>
#include <grove/mpi.hpp>
#include <grove/training.hpp>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>
#include <memory>
#include <optional>
#include <string>

namespace {

using grove::index;
using matrix = grove::row_matrix<float>;
using config_t = grove::dynamic_config<float>;

constexpr grove::layer_dims dims = grove::grove_moe_inst_dims;
constexpr index top_k = 8;
constexpr double lambda = 0.05;

/// A layer on every rank of MPI_COMM_WORLD, its communicator timed.
struct setup {
  grove::mpi_communicator mpi;
  grove::timed_communicator comm{mpi};
  grove::group_placement placement = grove::group_placement::balanced(dims.groups, mpi.size());
  std::optional<grove::expert_parallel_layer<config_t>> layer;

  setup() {
    // Random weights of this rank's groups: a whole layer would not fit many ranks' memory.
    const std::vector<index> mine = placement.groups_of(mpi.rank());
    auto full = grove::layer_parameters<float>::shard(dims, mine);
    grove::detail::normal_generator gen(17);
    for (float& v : full.values()) v = static_cast<float>(0.02 * gen.normal());
    grove::cpu_runner_options options;
    options.threads = 1;
    layer.emplace(comm, placement, config_t(dims, top_k, lambda), std::move(full),
                  std::make_shared<grove::cpu_runner>(options));
  }
};

setup& the_setup() {
  static setup s;
  return s;
}

matrix tokens_of_this_rank(index T, int rank) {
  matrix x(T, dims.hidden);
  grove::detail::normal_generator gen(1000 + static_cast<std::uint64_t>(rank));
  for (index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(gen.normal());
  return x;
}

void expert_parallel(benchmark::State& state) {
  setup& s = the_setup();
  const matrix x = tokens_of_this_rank(state.range(0), s.mpi.rank());
  grove::expert_parallel_forward<float> f;
  s.layer->forward(x, f);  // warm: buffers, pages
  s.comm.reset();
  double seconds = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    s.layer->forward(x, f);
    benchmark::DoNotOptimize(f.y.data());
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  state.counters["comm_share"] = s.comm.seconds() / seconds;
  const auto& t = s.layer->last_traffic();
  state.counters["sent_KiB"] = static_cast<double>(t.request_bytes + t.reply_bytes) / 1024.0;
}

void local_experts(benchmark::State& state) {
  setup& s = the_setup();
  const matrix x = tokens_of_this_rank(state.range(0), s.mpi.rank());
  grove::expert_parallel_forward<float> f;
  s.layer->forward(x, f);  // the rows this rank received, and their plan
  matrix y(f.local_x.rows(), dims.hidden);
  const auto& local = s.layer->local_layer();
  for (auto _ : state) {
    local.forward(f.local_plan, f.local_x, y);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["rows"] = static_cast<double>(f.local_x.rows());
}

void training_step(benchmark::State& state) {
  setup& s = the_setup();
  const matrix x = tokens_of_this_rank(state.range(0), s.mpi.rank());
  const matrix dy = tokens_of_this_rank(state.range(0), s.mpi.rank() + 100);
  auto grads = grove::layer_parameters<float>::shard(dims, s.placement.groups_of(s.mpi.rank()));
  matrix dx = matrix::Zero(x.rows(), dims.hidden);
  s.comm.reset();
  double seconds = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    const auto f = s.layer->forward_for_training(x);
    s.layer->backward(f, x, dy, grads.span(), dx);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  state.counters["comm_share"] = s.comm.seconds() / seconds;
}

// Fixed iterations: every rank makes the same collective calls.
BENCHMARK(expert_parallel)->ArgName("T")->Arg(1)->Arg(16)->Arg(128)->Arg(512)->Iterations(20)->Unit(benchmark::kMillisecond);
BENCHMARK(local_experts)->ArgName("T")->Arg(1)->Arg(16)->Arg(128)->Arg(512)->Iterations(20)->Unit(benchmark::kMillisecond);
BENCHMARK(training_step)->ArgName("T")->Arg(16)->Arg(128)->Iterations(5)->Unit(benchmark::kMillisecond);

/// Reports nothing: the ranks other than 0.
class silent_reporter final : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  // Only rank 0 writes --benchmark_out: the other ranks drop the flag.
  std::vector<char*> args(argv, argv + argc);
  if (rank != 0)
    std::erase_if(args, [](const char* a) { return std::strncmp(a, "--benchmark_out", 15) == 0; });
  int count = static_cast<int>(args.size());
  benchmark::Initialize(&count, args.data());
  if (rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    silent_reporter silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}

// Runners (grove/runners/): the seam between a layer and what executes its plans. A layer runs
// on the runner it is given, a user's runner can stand in for the CPU one, two runners run at
// once from two threads with the same bits as alone, and the steady state allocates nothing.
//
// This file replaces the global operator new to count heap allocations; it is also built with
// ThreadSanitizer as test_runners_tsan (tests/CMakeLists.txt, GROVE_TSAN_TEST).
#include <doctest/doctest.h>

#include "support/test_support.hpp"

#include <grove/grove.hpp>
#include <grove/kernels/reference/token_forward.hpp>
#include <grove/training.hpp>

#include <atomic>
#include <barrier>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

// ---- heap allocation counting ------------------------------------------------------------------
// The replacements below pair malloc with free by design; g++ 12 reads the replaced operators'
// own bodies as a new/free mismatch.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
namespace {

using grove_test::same_bits;
std::atomic<long> allocations_seen{0};
}  // namespace

void* operator new(std::size_t size) {
  allocations_seen.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return operator new(size); }
void* operator new(std::size_t size, std::align_val_t align) {
  allocations_seen.fetch_add(1, std::memory_order_relaxed);
  const auto a = static_cast<std::size_t>(align);
  if (void* p = std::aligned_alloc(a, (size + a - 1) / a * a)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size, std::align_val_t align) { return operator new(size, align); }
// The nothrow forms too, so that every allocation is counted and freed by the replacements below
// (std::stable_sort's buffer uses them; a mix with the sanitizers' own operators is a mismatch).
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  allocations_seen.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(size == 0 ? 1 : size);
}
void* operator new[](std::size_t size, const std::nothrow_t& tag) noexcept { return operator new(size, tag); }
void* operator new(std::size_t size, std::align_val_t align, const std::nothrow_t&) noexcept {
  allocations_seen.fetch_add(1, std::memory_order_relaxed);
  const auto a = static_cast<std::size_t>(align);
  return std::aligned_alloc(a, (size + a - 1) / a * a);
}
void* operator new[](std::size_t size, std::align_val_t align, const std::nothrow_t& tag) noexcept {
  return operator new(size, align, tag);
}
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

using Index = grove::index;  // not `index`: POSIX has one too
using grove::layer_dims;
using grove::row_matrix;
using config = grove::dynamic_config<float>;

/// Heap allocations (operator new, which Eigen's and the standard containers' allocations go
/// through, and malloc-based Eigen buffers are counted where they call new) made by fn.
template <class Fn>
long heap_allocations_of(Fn&& fn) {
  const long before = allocations_seen.load();
  fn();
  return allocations_seen.load() - before;
}



/// Largest |a - b| over the largest |b| (plus 1): the error of a float result against the
/// double per-token reference, relative to its size.
double relative_error(const row_matrix<float>& a, const row_matrix<float>& b) {
  return (a - b).cwiseAbs().maxCoeff() / (1.0 + b.cwiseAbs().maxCoeff());
}

std::shared_ptr<grove::cpu_runner> cpu_runner_with(int threads) {
  grove::cpu_runner_options options;
  options.threads = threads;
  return std::make_shared<grove::cpu_runner>(options);
}

/// A runner of the user's own: forwards to a CPU runner and counts the calls that reach it.
class counting_runner final : public grove::runner {
 public:
  [[nodiscard]] std::string name() const override { return "counting " + inner_.name(); }
  int forwards = 0, training_forwards = 0, backwards = 0;

 protected:
  void run_forward(const grove::expert_forward<float>& r) override {
    ++(r.saved ? training_forwards : forwards);
    inner_.forward(r);
  }
  void run_forward(const grove::expert_forward<grove::bf16>& r) override {
    ++forwards;
    inner_.forward(r);
  }
  void run_forward(const grove::expert_forward<double>& r) override {
    ++(r.saved ? training_forwards : forwards);
    inner_.forward(r);
  }
  void run_backward(const grove::expert_backward<float>& r) override {
    ++backwards;
    inner_.backward(r);
  }
  void run_backward(const grove::expert_backward<double>& r) override {
    ++backwards;
    inner_.backward(r);
  }

 private:
  grove::cpu_runner inner_{one_thread()};
  static grove::cpu_runner_options one_thread() {
    grove::cpu_runner_options options;
    options.threads = 1;
    return options;
  }
};

const layer_dims dims{48, 8, 4, 32, 16};

grove::layer<config> make_layer(std::uint64_t seed, std::shared_ptr<grove::runner> runner) {
  return grove::layer(config(dims, 2, 0.25), grove::layer_parameters<float>::random(dims, seed, 0.2), std::move(runner));
}

}  // namespace

TEST_CASE("runners: a cpu_runner's forward agrees with the per-token reference") {
  auto runner = cpu_runner_with(2);
  const auto layer = make_layer(3, runner);
  const row_matrix<float> x = grove_test::random_matrix<float>(37, dims.hidden, 4);
  const row_matrix<float> y = layer.forward(x);
  const row_matrix<float> expected = grove::reference::forward(layer.weights(), {2, 0.25}, x);
  CHECK(relative_error(y, expected) < 1e-5);
  CHECK(runner->name() == std::string("cpu (") + grove::simd::isa_name(runner->isa()) + ", 2 threads)");
  CHECK(cpu_runner_with(1)->name().find("1 thread)") != std::string::npos);
}

TEST_CASE("runners: a layer runs on the runner it holds; on() and set_runner() move it") {
  auto counting = std::make_shared<counting_runner>();
  auto layer = make_layer(5, counting);
  CHECK(&layer.runner() == counting.get());
  const row_matrix<float> x = grove_test::random_matrix<float>(9, dims.hidden, 6);
  const row_matrix<float> y = layer.forward(x);
  CHECK(counting->forwards == 1);

  // The same layer on a CPU runner gives the same bits: the user's runner forwarded to one.
  auto cpu = cpu_runner_with(1);
  const auto on_cpu = layer.on(cpu);
  CHECK(&on_cpu.runner() == cpu.get());
  CHECK(same_bits(on_cpu.forward(x), y));
  CHECK(counting->forwards == 1);  // on() made a copy; the original still holds `counting`
  CHECK(&layer.runner() == counting.get());

  // Training forward and backward reach the runner too.
  const auto f = grove::forward_for_training(layer, x);
  CHECK(counting->training_forwards == 1);
  CHECK(same_bits(f.y, y));
  grove::layer_parameters<float> grads(dims);
  row_matrix<float> dx = row_matrix<float>::Zero(x.rows(), dims.hidden);
  grove::backward(layer, f, x, grove_test::random_matrix<float>(x.rows(), dims.hidden, 7), grads.span(), dx);
  CHECK(counting->backwards == 1);
  CHECK(dx.cwiseAbs().maxCoeff() > 0);

  layer.set_runner(cpu);
  CHECK(&layer.runner() == cpu.get());
  CHECK_THROWS_WITH_AS(layer.set_runner(nullptr), doctest::Contains("needs a runner"), grove::error);
  CHECK_THROWS_WITH_AS(make_layer(1, nullptr), doctest::Contains("needs a runner"), grove::error);
}

TEST_CASE("runners: the default runner is visible and replaceable") {
  const auto original = grove::default_runner();
  REQUIRE(original != nullptr);
  CHECK(grove::default_runner() == original);  // one per process until replaced
  CHECK(original->name().rfind("cpu (", 0) == 0);
  const grove::layer a(config(dims, 2, 0.25), grove::layer_parameters<float>::random(dims, 1, 0.2));
  CHECK(&a.runner() == original.get());

  auto mine = std::make_shared<counting_runner>();
  grove::set_default_runner(mine);
  const grove::layer b(config(dims, 2, 0.25), grove::layer_parameters<float>::random(dims, 1, 0.2));
  CHECK(&b.runner() == mine.get());
  CHECK(&a.runner() == original.get());  // layers made earlier keep theirs
  (void)b.forward(grove_test::random_matrix<float>(3, dims.hidden, 2));
  CHECK(mine->forwards == 1);

  grove::set_default_runner(nullptr);  // back to a fresh CPU runner
  const auto fresh = grove::default_runner();
  CHECK(fresh != nullptr);
  CHECK(fresh.get() != mine.get());
  grove::set_default_runner(original);
}

TEST_CASE("runners: two layers on two runners from two threads give their solo bits") {
  // Different weights and batches per layer; each thread's result must equal its solo run bit
  // for bit (each runner's pass is deterministic and runners share no state).
  auto runner_a = cpu_runner_with(2);
  auto runner_b = cpu_runner_with(2);
  const auto layer_a = make_layer(11, runner_a);
  const auto layer_b = make_layer(12, runner_b);
  const row_matrix<float> xa = grove_test::random_matrix<float>(64, dims.hidden, 13);
  const row_matrix<float> xb = grove_test::random_matrix<float>(41, dims.hidden, 14);
  const row_matrix<float> solo_a = layer_a.forward(xa);
  const row_matrix<float> solo_b = layer_b.forward(xb);
  CHECK(relative_error(solo_a, grove::reference::forward(layer_a.weights(), {2, 0.25}, xa)) < 1e-5);

  // Training passes too: forward with saved activations and backward.
  const row_matrix<float> dy = grove_test::random_matrix<float>(64, dims.hidden, 15);
  auto train = [&](const grove::layer<config>& layer, const row_matrix<float>& x) {
    grove::layer_parameters<float> grads(dims);
    row_matrix<float> dx = row_matrix<float>::Zero(x.rows(), dims.hidden);
    const auto f = grove::forward_for_training(layer, x);
    grove::backward(layer, f, x, dy.topRows(x.rows()), grads.span(), dx);
    const auto values = grads.values();
    return std::pair{row_matrix<float>(Eigen::Map<const row_matrix<float>>(values.data(), 1, static_cast<Index>(values.size()))),
                     dx};
  };
  const auto solo_train_a = train(layer_a, xa);
  const auto solo_train_b = train(layer_b, xb);

  constexpr int rounds = 8;
  auto run_concurrently = [&](const grove::layer<config>& la, const grove::layer<config>& lb) {
    std::barrier start(2);
    std::vector<row_matrix<float>> ya(rounds), yb(rounds);
    std::vector<std::pair<row_matrix<float>, row_matrix<float>>> ta(rounds), tb(rounds);
    std::thread other([&] {
      for (int r = 0; r < rounds; ++r) {
        start.arrive_and_wait();
        yb[static_cast<std::size_t>(r)] = lb.forward(xb);
        tb[static_cast<std::size_t>(r)] = train(lb, xb);
      }
    });
    for (int r = 0; r < rounds; ++r) {
      start.arrive_and_wait();
      ya[static_cast<std::size_t>(r)] = la.forward(xa);
      ta[static_cast<std::size_t>(r)] = train(la, xa);
    }
    other.join();
    for (int r = 0; r < rounds; ++r) {
      const auto i = static_cast<std::size_t>(r);
      CHECK(same_bits(ya[i], solo_a));
      CHECK(same_bits(yb[i], solo_b));
      CHECK(same_bits(ta[i].first, solo_train_a.first));
      CHECK(same_bits(ta[i].second, solo_train_a.second));
      CHECK(same_bits(tb[i].first, solo_train_b.first));
      CHECK(same_bits(tb[i].second, solo_train_b.second));
    }
  };
  SUBCASE("each layer on its own runner: the two run at the same time") { run_concurrently(layer_a, layer_b); }
  SUBCASE("both layers on one runner: calls are serialised, results unchanged") {
    run_concurrently(layer_a, layer_b.on(runner_a));
  }
}

TEST_CASE("runners: the steady state allocates nothing") {
  auto runner = cpu_runner_with(2);
  const auto layer = make_layer(21, runner);
  for (const Index T : {1, 5, 33}) {
    CAPTURE(T);
    const row_matrix<float> x = grove_test::random_matrix<float>(T, dims.hidden, 22 + static_cast<std::uint64_t>(T));
    row_matrix<float> y(T, dims.hidden), y_again(T, dims.hidden);
    grove::routing_plan<float> plan;
    layer.route_into(plan, x);  // first batch: the plan and the runner's workspace grow
    layer.forward(plan, x, y);

    // Routing again into the same plan, and the forward on a warm runner: no heap allocation.
    CHECK(heap_allocations_of([&] { layer.route_into(plan, x); }) == 0);
    CHECK(heap_allocations_of([&] { layer.forward(plan, x, y_again); }) == 0);
    CHECK(heap_allocations_of([&] {
            runner->forward(grove::expert_forward<float>{layer.weights(), plan, x, y_again});
          }) == 0);
    CHECK(same_bits(y, y_again));
    CHECK(same_bits(y, layer.forward(x)));  // route_into gives route's plan

    // A training forward and the experts' backward on warm buffers: none either.
    grove::saved_activations<float> saved;
    grove::layer_parameters<float> grads(dims);
    row_matrix<float> dx = row_matrix<float>::Zero(T, dims.hidden), dw;
    const row_matrix<float> dy = grove_test::random_matrix<float>(T, dims.hidden, 99);
    const grove::expert_backward<float> backward{layer.weights(), plan, x, dy, &saved, grads.span(), dx, dw};
    layer.forward_saving(plan, x, y_again, saved);
    runner->backward(backward);
    CHECK(heap_allocations_of([&] { layer.forward_saving(plan, x, y_again, saved); }) == 0);
    CHECK(heap_allocations_of([&] { runner->backward(backward); }) == 0);
  }
  // The counter counts: a std::vector that must grow is seen.
  CHECK(heap_allocations_of([] { std::vector<int> v(1000); (void)v.data(); }) >= 1);
}

TEST_CASE("runners: a failed check still names the problem") {
  auto runner = cpu_runner_with(1);
  const auto layer = make_layer(31, runner);
  const row_matrix<float> x = grove_test::random_matrix<float>(4, dims.hidden, 32);
  const grove::routing_plan<float> plan = layer.route(x);
  row_matrix<float> wrong(3, dims.hidden);
  CHECK_THROWS_WITH_AS(layer.forward(plan, x, wrong), "grove: output y is [3, 48] but the plan and layer expect [4, 48]",
                       grove::error);
  const row_matrix<float> narrow = grove_test::random_matrix<float>(2, 47, 1);
  CHECK_THROWS_WITH_AS((void)layer.route(narrow),
                       "grove: input x has 47 columns but the layer's hidden size H is 48 (expected x of shape [T, 48])",
                       grove::error);
  grove::cpu_runner_options bad;
  bad.shape = {65, 32, 64};
  CHECK_THROWS_WITH_AS(grove::cpu_runner{bad},
                       "grove: schedule_shape needs gate_up_rows and gate_up_cols in [1, 64] and down_cols >= 1, got "
                       "(65, 32, 64)",
                       grove::error);
  CHECK(grove::simd::parse_isa("avx2") == grove::simd::isa::avx2);
  CHECK_THROWS_WITH_AS((void)grove::simd::parse_isa("sse"), doctest::Contains("unknown instruction set 'sse'"),
                       grove::error);
}

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>

#include "grove/error.hpp"
#include "grove/experts/bf16_weights.hpp"
#include "grove/experts/layer_weights.hpp"
#include "grove/experts/tensor_types.hpp"
#include "grove/kernels/cpu/batch_shapes.hpp"
#include "grove/kernels/cpu/expert_schedule.hpp"
#include "grove/kernels/cpu/thread_pool.hpp"
#include "grove/router/routing_plan.hpp"
#include "grove/simd/batch.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// What the tile kernels of one batch read and write (expert_tiles-inl.hpp). A: element of the
/// staged activations (float, or bf16 bits for vdpbf16ps), W: weight bits (float or bf16 bits),
/// Hs: element of h (the SwiGLU outputs, bf16 bits when the down product uses vdpbf16ps).
template <class A, class W, class Hs>
struct tile_pass {
  const cpu::expert_item<W>* items;
  index item_count;
  const A* x;  ///< staged activations [T, ldx]
  index ldx;
  index hidden;
  Hs* h;  ///< item blocks [row_count, inter], at each item's h_offset
  float* y;
  index ldy;
  index tokens;
  index down_cols;
};

}  // namespace detail
GROVE_END_NAMESPACE

// The tile kernels, once per instruction-set level (see simd/batch.hpp on regions).
#define GROVE_TILES_NS tiles_scalar
#define GROVE_TILES_ARCH simd::scalar
#define GROVE_TILES_BF16_DOT 0
#include "grove/kernels/cpu/detail/expert_tiles-inl.hpp"
#undef GROVE_TILES_NS
#undef GROVE_TILES_ARCH
#undef GROVE_TILES_BF16_DOT

#if GROVE_SIMD_X86
GROVE_SIMD_SILENCE_BEGIN
GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX2)
#define GROVE_TILES_NS tiles_avx2
#define GROVE_TILES_ARCH simd::avx2
#define GROVE_TILES_BF16_DOT 0
#include "grove/kernels/cpu/detail/expert_tiles-inl.hpp"
#undef GROVE_TILES_NS
#undef GROVE_TILES_ARCH
#undef GROVE_TILES_BF16_DOT
GROVE_SIMD_END_REGION()

GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX512)
#define GROVE_TILES_NS tiles_avx512
#define GROVE_TILES_ARCH simd::avx512
#define GROVE_TILES_BF16_DOT 0
#include "grove/kernels/cpu/detail/expert_tiles-inl.hpp"
#undef GROVE_TILES_NS
#undef GROVE_TILES_ARCH
#undef GROVE_TILES_BF16_DOT
GROVE_SIMD_END_REGION()

GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX512_BF16)
#define GROVE_TILES_NS tiles_avx512_bf16
#define GROVE_TILES_ARCH simd::avx512_bf16
#define GROVE_TILES_BF16_DOT 1
#include "grove/kernels/cpu/detail/expert_tiles-inl.hpp"
#undef GROVE_TILES_NS
#undef GROVE_TILES_ARCH
#undef GROVE_TILES_BF16_DOT
GROVE_SIMD_END_REGION()
GROVE_SIMD_SILENCE_END
#endif

GROVE_BEGIN_NAMESPACE
namespace detail {

// Run-time dispatch of one tile to the level's kernels. Called once per tile, never inlined
// into the kernels (they are compiled for other targets).
template <class A, class W, class Hs>
void gate_up_tile_for(simd::isa level, const tile_pass<A, W, Hs>& pass, const cpu::gate_up_tile& tile,
                      const cpu::gate_up_tile* following) {
#if GROVE_SIMD_X86
  if constexpr (std::is_same_v<A, std::uint16_t>) {
    tiles_avx512_bf16::gate_up_tile(pass, tile, following);
  } else {
    switch (level) {
      case simd::isa::scalar: tiles_scalar::gate_up_tile(pass, tile, following); break;
      case simd::isa::avx2: tiles_avx2::gate_up_tile(pass, tile, following); break;
      default: tiles_avx512::gate_up_tile(pass, tile, following); break;
    }
  }
#else
  (void)level;
  tiles_scalar::gate_up_tile(pass, tile, following);
#endif
}

template <class A, class W, class Hs>
void down_tile_for(simd::isa level, const tile_pass<A, W, Hs>& pass, index tile, index following) {
#if GROVE_SIMD_X86
  if constexpr (std::is_same_v<Hs, std::uint16_t>) {
    tiles_avx512_bf16::down_tile(pass, tile, following);
  } else {
    switch (level) {
      case simd::isa::scalar: tiles_scalar::down_tile(pass, tile, following); break;
      case simd::isa::avx2: tiles_avx2::down_tile(pass, tile, following); break;
      default: tiles_avx512::down_tile(pass, tile, following); break;
    }
  }
#else
  (void)level;
  tiles_scalar::down_tile(pass, tile, following);
#endif
}

template <class A>
void stage_rows_for(simd::isa level, const float* x, index ldx_in, index hidden, index r0, index r1, A* out,
                    index ld_out) {
#if GROVE_SIMD_X86
  switch (level) {
    case simd::isa::scalar: tiles_scalar::stage_rows(x, ldx_in, hidden, r0, r1, out, ld_out); break;
    case simd::isa::avx2: tiles_avx2::stage_rows(x, ldx_in, hidden, r0, r1, out, ld_out); break;
    default: tiles_avx512::stage_rows(x, ldx_in, hidden, r0, r1, out, ld_out); break;
  }
#else
  (void)level;
  tiles_scalar::stage_rows(x, ldx_in, hidden, r0, r1, out, ld_out);
#endif
}

/// Row stride (in elements) of a staging buffer: whole cache lines, and one line more when the
/// row would be a multiple of 1 KiB (rows at power-of-two strides all map to the same L1 sets).
inline index padded_stride(index hidden, index element_bytes) {
  const index per_line = 64 / element_bytes;
  index ld = (hidden + per_line - 1) / per_line * per_line;
  if ((ld * element_bytes) % 1024 == 0) ld += per_line;
  return ld;
}

}  // namespace detail

namespace cpu {

/// Wall-clock seconds of the phases of one forward pass.
struct pass_timings {
  double stage = 0;    ///< staging x (copy or bf16 rounding into the padded buffer)
  double gate_up = 0;  ///< gate/up tiles (with SwiGLU)
  double down = 0;     ///< down tiles (with the scatter-add)
};

/// Settings of an expert_engine.
struct engine_options {
  /// Threads of the parallel regions, the caller included; 0: std::thread::hardware_concurrency().
  int threads = 0;
  /// Instruction-set level of the kernels; unset: the best this machine runs (simd::best_isa()).
  std::optional<simd::isa> isa;
  /// Tile sizes of the schedule.
  schedule_shape shape{};
};

/// The fast CPU expert pass (docs/performance.md): one fused pass over every routed expert and
/// every activated adjugate of a routing_plan, with fp32 or BF16 weights.
///
/// Per batch it builds an expert_schedule from the plan (items: routed experts and adjugates
/// alike; tiles), stages x in a padded buffer (bf16 for vdpbf16ps), then runs two parallel
/// regions: gate/up tiles (gather rows, gate and up products, SwiGLU into h) and down tiles
/// (down product and weighted scatter-add into a block of y's columns, items in a fixed order).
/// Results are bitwise identical for every thread count and every run; they depend on the
/// instruction-set level (each level sums in its own fixed order).
///
/// The engine owns its threads and a workspace that grows to the largest batch seen and is then
/// reused: a steady stream of batches allocates nothing. One forward runs at a time (calls from
/// several threads are serialised).
class expert_engine {
 public:
  explicit expert_engine(const engine_options& options = {}) {
    set_shape(options.shape);
    set_threads(options.threads);
    set_isa(options.isa ? *options.isa : simd::best_isa());
  }

  /// y = Σ_s w_s E_{e_s}(x) + λ Σ_j c_j A_j(x) over the plan (docs/math.md, step 6), fp32 weights.
  void forward(const weights_view<float>& weights, const routing_plan<float>& plan, const_rows_ref<float> x,
               rows_ref<float> y) {
    run(weights, plan, x, y);
  }
  /// The same with BF16 weights: fp32 accumulation; with AVX512_BF16 (vdpbf16ps) the
  /// activations x and h are rounded to bf16 for the products, otherwise the weights are widened
  /// to fp32 and multiplied with fp32 activations.
  void forward(const weights_view<bf16>& weights, const routing_plan<float>& plan, const_rows_ref<float> x,
               rows_ref<float> y) {
    run(weights, plan, x, y);
  }

  [[nodiscard]] int threads() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return pool_->size();
  }
  /// Replaces the thread pool (allocates; not for the steady state).
  void set_threads(int threads) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    if (!pool_ || pool_->size() != threads) pool_ = std::make_unique<thread_pool>(threads);
  }
  [[nodiscard]] simd::isa isa() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return isa_;
  }
  /// Forces an instruction-set level; throws grove::error when this machine cannot run it.
  void set_isa(simd::isa level) {
    simd::require_supported(level);
    std::lock_guard<std::mutex> lock(mutex_);
    isa_ = level;
  }
  [[nodiscard]] schedule_shape shape() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return shape_;
  }
  void set_shape(const schedule_shape& shape) {
    detail::require(shape.gate_up_rows >= 1 && shape.gate_up_rows <= 64 && shape.gate_up_cols >= 1 &&
                        shape.gate_up_cols <= 64 && shape.down_cols >= 1,
                    "grove: schedule_shape needs gate_up_rows and gate_up_cols in [1, 64] and down_cols >= 1, got (" +
                        std::to_string(shape.gate_up_rows) + ", " + std::to_string(shape.gate_up_cols) + ", " +
                        std::to_string(shape.down_cols) + ")");
    std::lock_guard<std::mutex> lock(mutex_);
    shape_ = shape;
  }

  /// Wall-clock seconds of the phases of the last forward (for benchmarks and tuning).
  [[nodiscard]] pass_timings last_timings() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return timings_;
  }

  /// Bytes of workspace held (staging, h, schedules).
  [[nodiscard]] std::size_t workspace_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return x_f32_.bytes() + x_bf16_.bytes() + h_f32_.bytes() + h_bf16_.bytes() + schedule_f32_.bytes() +
           schedule_bf16_.bytes();
  }
  /// Times the workspace had to grow (a steady stream of batches of one size adds nothing).
  [[nodiscard]] std::size_t workspace_allocations() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return x_f32_.allocations() + x_bf16_.allocations() + h_f32_.allocations() + h_bf16_.allocations() +
           schedule_f32_.allocations() + schedule_bf16_.allocations();
  }
 private:
  template <class W>
  void run(const layer_weights<const W>& weights, const routing_plan<float>& plan, const_rows_ref<float> x,
           rows_ref<float> y) {
    const layer_dims& d = weights.dims();
    detail::require_batch_shapes(d, plan, x.rows(), x.cols(), "input x");
    detail::require_batch_shapes(d, plan, y.rows(), y.cols(), "output y");
    std::lock_guard<std::mutex> lock(mutex_);
    if constexpr (std::is_same_v<W, float>) {
      schedule_f32_.build(weights, plan, shape_);
      run_pass<float, float, float>(schedule_f32_, x, y, x_f32_, h_f32_);
    } else {
      schedule_bf16_.build(weights, plan, shape_);
      if (isa_ == simd::isa::avx512_bf16)
        run_pass<std::uint16_t, std::uint16_t, std::uint16_t>(schedule_bf16_, x, y, x_bf16_, h_bf16_);
      else
        run_pass<float, std::uint16_t, float>(schedule_bf16_, x, y, x_f32_, h_f32_);
    }
  }

  template <class A, class Wbits, class Hs, class W>
  void run_pass(const expert_schedule<W>& schedule, const_rows_ref<float> x, rows_ref<float> y,
                detail::growing_buffer<A>& x_stage, detail::growing_buffer<Hs>& h_buffer) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    timings_ = {};
    const index T = schedule.tokens(), H = schedule.hidden();
    if (T == 0) return;
    const index ldx = detail::padded_stride(H, static_cast<index>(sizeof(A)));
    A* staged = x_stage.get(static_cast<std::size_t>(T * ldx));
    Hs* h = h_buffer.get(static_cast<std::size_t>(std::max<index>(schedule.h_elements(), 1)));

    static_assert(std::is_same_v<weight_bits_t<W>, Wbits>);
    detail::tile_pass<A, Wbits, Hs> pass{schedule.items().data(),
                                         static_cast<index>(schedule.items().size()),
                                         staged,
                                         ldx,
                                         H,
                                         h,
                                         y.data(),
                                         y.outerStride(),
                                         T,
                                         schedule.shape().down_cols};
    const simd::isa level = isa_;
    const float* x_data = x.data();
    const index x_stride = x.outerStride();
    const std::span<const gate_up_tile> tiles = schedule.gate_up_tiles();
    const index down_tiles = schedule.down_tiles();
    const int threads = pool_->size();
    std::atomic<index> next{0};

    // Staging x (rows split evenly; on the calling thread alone when small), then gate/up tiles
    // (taken from a shared counter), then down tiles. Each region ends when all its work is done.
    if (T * H < (index(1) << 16) || threads == 1) {
      detail::stage_rows_for(level, x_data, x_stride, H, 0, T, staged, ldx);
    } else {
      auto stage_region = [&](int thread) {
        detail::stage_rows_for(level, x_data, x_stride, H, T * thread / threads, T * (thread + 1) / threads, staged,
                               ldx);
      };
      pool_->run(stage_region);
    }
    // A thread claims its next tile before running the current one, so that the current tile
    // can prefetch the next one's first weights (claims stay dynamic: no thread idles while
    // tiles remain unclaimed).
    const auto tile_count = static_cast<index>(tiles.size());
    auto gate_up_tiles = [&](int) {
      index current = next.fetch_add(1, std::memory_order_relaxed);
      while (current < tile_count) {
        const index following = next.fetch_add(1, std::memory_order_relaxed);
        detail::gate_up_tile_for(level, pass, tiles[static_cast<std::size_t>(current)],
                                 following < tile_count ? &tiles[static_cast<std::size_t>(following)] : nullptr);
        current = following;
      }
    };
    const auto staged_at = clock::now();
    pool_->run(gate_up_tiles);
    const auto gate_up_at = clock::now();
    next.store(0, std::memory_order_relaxed);
    auto down_region = [&](int) {
      index current = next.fetch_add(1, std::memory_order_relaxed);
      while (current < down_tiles) {
        const index following = next.fetch_add(1, std::memory_order_relaxed);
        detail::down_tile_for(level, pass, current, following < down_tiles ? following : index(-1));
        current = following;
      }
    };
    pool_->run(down_region);
    const auto done_at = clock::now();
    timings_.stage = std::chrono::duration<double>(staged_at - start).count();
    timings_.gate_up = std::chrono::duration<double>(gate_up_at - staged_at).count();
    timings_.down = std::chrono::duration<double>(done_at - gate_up_at).count();
  }

  mutable std::mutex mutex_;
  std::unique_ptr<thread_pool> pool_;
  pass_timings timings_{};
  simd::isa isa_ = simd::isa::scalar;
  schedule_shape shape_{};
  expert_schedule<float> schedule_f32_;
  expert_schedule<bf16> schedule_bf16_;
  detail::growing_buffer<float> x_f32_, h_f32_;
  detail::growing_buffer<std::uint16_t> x_bf16_, h_bf16_;
};

/// The engine grove::cpu::forward_experts uses: hardware_concurrency() threads, the best
/// instruction set. Configure it with default_engine().set_threads(n) / set_isa(level).
inline expert_engine& default_engine() {
  static expert_engine engine;
  return engine;
}

}  // namespace cpu
GROVE_END_NAMESPACE

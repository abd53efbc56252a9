#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <type_traits>

#include "grove/error.hpp"
#include "grove/experts/bf16_weights.hpp"
#include "grove/experts/layer_weights.hpp"
#include "grove/experts/tensor_types.hpp"
#include "grove/kernels/cpu/backward_inputs.hpp"
#include "grove/kernels/cpu/backward_schedule.hpp"
#include "grove/kernels/cpu/batch_shapes.hpp"
#include "grove/kernels/cpu/expert_schedule.hpp"
#include "grove/kernels/cpu/routing_weight_grads.hpp"
#include "grove/kernels/cpu/saved_activations.hpp"
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
  Hs* h;  ///< item blocks [row_count, inter], at each item's h_offset; null: not needed
  float* y;
  index ldy;
  index tokens;
  index down_cols;
  float* gate_out = nullptr;  ///< when set, g and u are also stored there (layout of h)
  float* up_out = nullptr;
};

/// What the backward tile kernels read and write (backward_tiles-inl.hpp); fp32 throughout.
/// Buffers "in the layout of h" hold every item's [row_count, inter] block at its h_offset.
struct backward_pass {
  const cpu::expert_item<float>* items;
  index item_count;
  const cpu::item_gradients* grads;  ///< per item
  const float* x;                    ///< staged activations [T, ldx]
  index ldx;
  const float* dy;
  index lddy;
  const float* gate;  ///< g, u (saved or recomputed), layout of h
  const float* up;
  float* hw;  ///< w·h, layout of h
  float* dg;  ///< ∂L/∂g, layout of h
  float* du;  ///< ∂L/∂u, layout of h
  float* dots;  ///< partial ⟨r, h⟩, [row_total, dot_blocks]
  index dot_blocks;
  float* dx;
  index lddx;
  index dx_cols;
  index hidden;
};

}  // namespace detail
GROVE_END_NAMESPACE

// The tile kernels, once per instruction-set level (see simd/batch.hpp on regions).
#define GROVE_TILES_NS tiles_scalar
#define GROVE_TILES_ARCH simd::scalar
#define GROVE_TILES_BF16_DOT 0
#include "grove/kernels/cpu/detail/expert_tiles-inl.hpp"
#include "grove/kernels/cpu/detail/backward_tiles-inl.hpp"
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
#include "grove/kernels/cpu/detail/backward_tiles-inl.hpp"
#undef GROVE_TILES_NS
#undef GROVE_TILES_ARCH
#undef GROVE_TILES_BF16_DOT
GROVE_SIMD_END_REGION()

GROVE_SIMD_BEGIN_REGION(GROVE_SIMD_TARGET_AVX512)
#define GROVE_TILES_NS tiles_avx512
#define GROVE_TILES_ARCH simd::avx512
#define GROVE_TILES_BF16_DOT 0
#include "grove/kernels/cpu/detail/expert_tiles-inl.hpp"
#include "grove/kernels/cpu/detail/backward_tiles-inl.hpp"
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

// Run-time dispatch of the backward tiles (fp32 only; avx512_bf16 machines run the AVX-512 ones).
inline void dh_tile_for(simd::isa level, const backward_pass& pass, const cpu::gate_up_tile& tile, float* packed) {
#if GROVE_SIMD_X86
  switch (level) {
    case simd::isa::scalar: tiles_scalar::backward::dh_tile(pass, tile, packed); break;
    case simd::isa::avx2: tiles_avx2::backward::dh_tile(pass, tile, packed); break;
    default: tiles_avx512::backward::dh_tile(pass, tile, packed); break;
  }
#else
  (void)level;
  tiles_scalar::backward::dh_tile(pass, tile, packed);
#endif
}

inline void gradient_tile_for(simd::isa level, const backward_pass& pass, const cpu::gradient_tile& tile) {
#if GROVE_SIMD_X86
  switch (level) {
    case simd::isa::scalar: tiles_scalar::backward::gradient_tile(pass, tile); break;
    case simd::isa::avx2: tiles_avx2::backward::gradient_tile(pass, tile); break;
    default: tiles_avx512::backward::gradient_tile(pass, tile); break;
  }
#else
  (void)level;
  tiles_scalar::backward::gradient_tile(pass, tile);
#endif
}

inline void dx_tile_for(simd::isa level, const backward_pass& pass, index tile, float* packed) {
#if GROVE_SIMD_X86
  switch (level) {
    case simd::isa::scalar: tiles_scalar::backward::dx_tile(pass, tile, packed); break;
    case simd::isa::avx2: tiles_avx2::backward::dx_tile(pass, tile, packed); break;
    default: tiles_avx512::backward::dx_tile(pass, tile, packed); break;
  }
#else
  (void)level;
  tiles_scalar::backward::dx_tile(pass, tile, packed);
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

/// Wall-clock seconds of the phases of the last pass (forward or backward).
struct pass_timings {
  double stage = 0;      ///< staging x (copy or bf16 rounding into the padded buffer)
  double gate_up = 0;    ///< gate/up tiles (with SwiGLU; in backward: recomputing g and u)
  double down = 0;       ///< down tiles (with the scatter-add)
  double dh = 0;         ///< backward: dh tiles (Dᵀ dy and the SwiGLU backward)
  double gradients = 0;  ///< backward: dx tiles and weight-gradient tiles
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

  /// forward() with fp32 weights that also keeps the SwiGLU pre-activations g and u for
  /// backward (cpu::saved_activations, resized here). y is bit-identical to forward()'s.
  void forward_saving(const weights_view<float>& weights, const routing_plan<float>& plan, const_rows_ref<float> x,
                      rows_ref<float> y, saved_activations<float>& saved) {
    const layer_dims& d = weights.dims();
    detail::require_batch_shapes(d, plan, x.rows(), x.cols(), "input x");
    detail::require_batch_shapes(d, plan, y.rows(), y.cols(), "output y");
    std::lock_guard<std::mutex> lock(mutex_);
    schedule_f32_.build(weights, plan, shape_);
    saved.reset(d, plan);
    run_pass<float, float, float>(schedule_f32_, x, y, x_f32_, h_f32_, saved.gate.data(), saved.up.data());
  }

  /// Backward of every routed expert and activated adjugate of the plan, fused like the forward
  /// (docs/performance.md, "Backward"); the contract of cpu::backward_experts_simple:
  /// the weight gradients are added to `grads`, the experts' share of ∂L/∂x is added to `dx`,
  /// and `dw` [T, k] receives ∂L/∂w_s = ⟨dy, E_{e_s}(x)⟩ + λ ⟨dy, A_{e_s / group_size}(x)⟩.
  /// With `saved` (from forward_saving with this plan) g and u are read from it, otherwise they
  /// are recomputed by the forward's own gate/up tiles: both give the same bits. Results are
  /// bitwise identical for every thread count. dx must not share memory with x or dy.
  void backward(const weights_view<float>& weights, const routing_plan<float>& plan, const_rows_ref<float> x,
                const_rows_ref<float> dy, const saved_activations<float>* saved, const weights_span<float>& grads,
                rows_ref<float> dx, row_matrix<float>& dw) {
    detail::require_backward_inputs<float>(weights.dims(), plan, x, dy, dx, grads.dims(), saved);
    std::lock_guard<std::mutex> lock(mutex_);
    run_backward(weights, plan, x, dy, saved, grads, dx, dw);
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

  /// Wall-clock seconds of the phases of the last pass (for benchmarks and tuning).
  [[nodiscard]] pass_timings last_timings() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return timings_;
  }

  /// Bytes of workspace held (staging, h, schedules).
  [[nodiscard]] std::size_t workspace_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return x_f32_.bytes() + x_bf16_.bytes() + h_f32_.bytes() + h_bf16_.bytes() + schedule_f32_.bytes() +
           schedule_bf16_.bytes() + gate_.bytes() + up_.bytes() + dg_.bytes() + du_.bytes() + dots_.bytes() + pack_.bytes() +
           backward_schedule_.bytes() + sizeof(float) * static_cast<std::size_t>(group_dots_.size());
  }
  /// Times the workspace had to grow (a steady stream of batches of one size adds nothing).
  [[nodiscard]] std::size_t workspace_allocations() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return x_f32_.allocations() + x_bf16_.allocations() + h_f32_.allocations() + h_bf16_.allocations() +
           schedule_f32_.allocations() + schedule_bf16_.allocations() + gate_.allocations() + up_.allocations() +
           dg_.allocations() + du_.allocations() + dots_.allocations() + pack_.allocations() + backward_schedule_.allocations();
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

  /// Stages x [T, H] into the padded buffer (bf16 for vdpbf16ps); rows split over the threads
  /// when the batch is large.
  template <class A>
  A* stage(const_rows_ref<float> x, detail::growing_buffer<A>& x_stage, index& ldx) {
    const index T = x.rows(), H = x.cols();
    ldx = detail::padded_stride(H, static_cast<index>(sizeof(A)));
    A* staged = x_stage.get(static_cast<std::size_t>(T * ldx));
    const simd::isa level = isa_;
    const float* x_data = x.data();
    const index x_stride = x.outerStride();
    const int threads = pool_->size();
    if (T * H < (index(1) << 16) || threads == 1) {
      detail::stage_rows_for(level, x_data, x_stride, H, 0, T, staged, ldx);
    } else {
      auto stage_region = [&](int thread) {
        detail::stage_rows_for(level, x_data, x_stride, H, T * thread / threads, T * (thread + 1) / threads, staged,
                               ldx);
      };
      pool_->run(stage_region);
    }
    return staged;
  }

  /// Runs `count` tiles on every thread, each taken from a shared counter; fn(thread, tile,
  /// following) gets the tile the same thread will run next (or -1), so that it can prefetch
  /// its weights.
  template <class Fn>
  void run_tiles(index count, const Fn& fn) {
    if (count == 0) return;
    std::atomic<index> next{0};
    auto region = [&](int thread) {
      index current = next.fetch_add(1, std::memory_order_relaxed);
      while (current < count) {
        const index following = next.fetch_add(1, std::memory_order_relaxed);
        fn(thread, current, following < count ? following : index(-1));
        current = following;
      }
    };
    pool_->run(region);
  }

  template <class A, class Wbits, class Hs>
  void run_gate_up(const detail::tile_pass<A, Wbits, Hs>& pass, std::span<const gate_up_tile> tiles) {
    const simd::isa level = isa_;
    run_tiles(static_cast<index>(tiles.size()), [&](int, index current, index following) {
      detail::gate_up_tile_for(level, pass, tiles[static_cast<std::size_t>(current)],
                               following >= 0 ? &tiles[static_cast<std::size_t>(following)] : nullptr);
    });
  }

  template <class A, class Wbits, class Hs, class W>
  void run_pass(const expert_schedule<W>& schedule, const_rows_ref<float> x, rows_ref<float> y,
                detail::growing_buffer<A>& x_stage, detail::growing_buffer<Hs>& h_buffer, float* gate_out = nullptr,
                float* up_out = nullptr) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    timings_ = {};
    const index T = schedule.tokens(), H = schedule.hidden();
    if (T == 0) return;
    index ldx = 0;
    const A* staged = stage<A>(x, x_stage, ldx);
    Hs* h = h_buffer.get(static_cast<std::size_t>(std::max<index>(schedule.h_elements(), 1)));

    static_assert(std::is_same_v<weight_bits_t<W>, Wbits>);
    const detail::tile_pass<A, Wbits, Hs> pass{schedule.items().data(),
                                               static_cast<index>(schedule.items().size()),
                                               staged,
                                               ldx,
                                               H,
                                               h,
                                               y.data(),
                                               y.outerStride(),
                                               T,
                                               schedule.shape().down_cols,
                                               gate_out,
                                               up_out};
    const simd::isa level = isa_;
    // Gate/up tiles, then down tiles (each region ends when all its work is done). A thread
    // claims its next tile before running the current one, so that the current tile can
    // prefetch the next one's first weights (claims stay dynamic: no thread idles while tiles
    // remain unclaimed).
    const auto staged_at = clock::now();
    run_gate_up(pass, schedule.gate_up_tiles());
    const auto gate_up_at = clock::now();
    run_tiles(schedule.down_tiles(),
              [&](int, index current, index following) { detail::down_tile_for(level, pass, current, following); });
    const auto done_at = clock::now();
    timings_.stage = std::chrono::duration<double>(staged_at - start).count();
    timings_.gate_up = std::chrono::duration<double>(gate_up_at - staged_at).count();
    timings_.down = std::chrono::duration<double>(done_at - gate_up_at).count();
  }

  void run_backward(const weights_view<float>& weights, const routing_plan<float>& plan, const_rows_ref<float> x,
                    const_rows_ref<float> dy, const saved_activations<float>* saved, const weights_span<float>& grads,
                    rows_ref<float> dx, row_matrix<float>& dw) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    timings_ = {};
    dw.setZero(plan.tokens, plan.top_k);
    if (plan.tokens == 0) return;
    schedule_f32_.build(weights, plan, shape_);
    backward_schedule_.build(schedule_f32_, grads);
    const expert_schedule<float>& schedule = schedule_f32_;
    const backward_schedule& tiles = backward_schedule_;
    const index T = plan.tokens, H = weights.dims().hidden;
    const auto h_size = static_cast<std::size_t>(std::max<index>(schedule.h_elements(), 1));
    index ldx = 0;
    const float* staged = stage<float>(x, x_f32_, ldx);
    const auto staged_at = clock::now();

    // g and u: the caller's saved ones, or recomputed by the forward's gate/up tiles.
    const float* gate = nullptr;
    const float* up = nullptr;
    if (saved != nullptr) {
      gate = saved->gate.data();
      up = saved->up.data();
    } else {
      float* g = gate_.get(h_size);
      float* u = up_.get(h_size);
      const detail::tile_pass<float, float, float> pass{schedule.items().data(),
                                                        static_cast<index>(schedule.items().size()),
                                                        staged,
                                                        ldx,
                                                        H,
                                                        nullptr,
                                                        nullptr,
                                                        0,
                                                        T,
                                                        schedule.shape().down_cols,
                                                        g,
                                                        u};
      run_gate_up(pass, schedule.gate_up_tiles());
      gate = g;
      up = u;
    }
    const auto recomputed_at = clock::now();

    const index dot_blocks = tiles.dot_blocks();
    const detail::backward_pass pass{schedule.items().data(),
                                     static_cast<index>(schedule.items().size()),
                                     tiles.gradients().data(),
                                     staged,
                                     ldx,
                                     dy.data(),
                                     dy.outerStride(),
                                     gate,
                                     up,
                                     h_f32_.get(h_size),
                                     dg_.get(h_size),
                                     du_.get(h_size),
                                     dots_.get(static_cast<std::size_t>(std::max<index>(schedule.row_total(), 1) *
                                                                        dot_blocks)),
                                     dot_blocks,
                                     dx.data(),
                                     dx.outerStride(),
                                     backward_schedule::dx_cols,
                                     H};
    const simd::isa level = isa_;
    const std::span<const gate_up_tile> dh_tiles = tiles.dh_tiles();
    // Each thread packs the weight panel of its dh and dx tiles into its own part of pack_.
    const index pack_per_thread = backward_schedule::pack_floats;
    float* pack = pack_.get(static_cast<std::size_t>(pack_per_thread * pool_->size()));
    run_tiles(static_cast<index>(dh_tiles.size()), [&](int thread, index current, index) {
      detail::dh_tile_for(level, pass, dh_tiles[static_cast<std::size_t>(current)], pack + thread * pack_per_thread);
    });
    const auto dh_at = clock::now();

    // ⟨dy, E(x)⟩ of every row: its partial sums over column blocks, in block order.
    group_dots_.setZero(T, plan.max_groups());
    for (const auto& item : schedule.items()) {
      const index blocks = (item.inter + backward_schedule::block_cols - 1) / backward_schedule::block_cols;
      for (index r = 0; r < item.row_count; ++r) {
        const float* partial = pass.dots + (item.first_row + r) * dot_blocks;
        float dot = partial[0];
        for (index b = 1; b < blocks; ++b) dot += partial[b];
        const auto& row = item.rows[r];
        (item.adjugate ? group_dots_ : dw)(row.token, row.slot) = dot;
      }
    }
    detail::add_adjugate_dots(plan, group_dots_, dw);

    // dx tiles (one column block of dx each, all items in order) and weight-gradient tiles,
    // from one counter: the fewer, larger dx tiles first.
    const index dx_tiles = tiles.dx_tiles();
    const std::span<const gradient_tile> gradient_tiles = tiles.gradient_tiles();
    run_tiles(dx_tiles + static_cast<index>(gradient_tiles.size()), [&](int thread, index current, index) {
      if (current < dx_tiles)
        detail::dx_tile_for(level, pass, current, pack + thread * pack_per_thread);
      else
        detail::gradient_tile_for(level, pass, gradient_tiles[static_cast<std::size_t>(current - dx_tiles)]);
    });
    const auto done_at = clock::now();
    timings_.stage = std::chrono::duration<double>(staged_at - start).count();
    timings_.gate_up = std::chrono::duration<double>(recomputed_at - staged_at).count();
    timings_.dh = std::chrono::duration<double>(dh_at - recomputed_at).count();
    timings_.gradients = std::chrono::duration<double>(done_at - dh_at).count();
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
  // Backward's workspace: g and u when recomputed, dg and du, partial dots (w·h lives in h_f32_).
  backward_schedule backward_schedule_;
  detail::growing_buffer<float> gate_, up_, dg_, du_, dots_, pack_;
  row_matrix<float> group_dots_;
};

/// The engine grove::cpu::forward_experts uses: hardware_concurrency() threads, the best
/// instruction set. Configure it with default_engine().set_threads(n) / set_isa(level).
inline expert_engine& default_engine() {
  static expert_engine engine;
  return engine;
}

}  // namespace cpu
GROVE_END_NAMESPACE

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <thread>
#include <type_traits>
#include <utility>

#include "grove/error.hpp"
#include "grove/formats/weight_format.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/tensor_types.hpp"
#include "grove/plan/backward_inputs.hpp"
#include "grove/kernels/cpu/backward_schedule.hpp"
#include "grove/plan/batch_shapes.hpp"
#include "grove/kernels/cpu/expert_schedule.hpp"
#include "grove/kernels/cpu/format_kernels.hpp"
#include "grove/kernels/cpu/kernel_table.hpp"
#include "grove/kernels/cpu/routing_weight_grads.hpp"
#include "grove/plan/saved_activations.hpp"
#include "grove/kernels/cpu/thread_pool.hpp"
#include "grove/plan/routing_plan.hpp"
#include "grove/plan/pass_requests.hpp"

GROVE_BEGIN_NAMESPACE

/// Wall-clock seconds of the phases of a CPU runner's last pass (forward or backward).
struct pass_timings {
  double stage = 0;      ///< staging x (copy or bf16 rounding into the padded buffer)
  double gate_up = 0;    ///< gate/up tiles (with SwiGLU; in backward: recomputing g and u)
  double down = 0;       ///< down tiles (with the scatter-add)
  double dh = 0;         ///< backward: dh tiles (Dᵀ dy and the SwiGLU backward)
  double gradients = 0;  ///< backward: dx tiles and weight-gradient tiles
};

namespace detail {

/// Row stride (in elements) of a staging buffer: whole cache lines, and one line more when the
/// row would be a multiple of 1 KiB (rows at power-of-two strides all map to the same L1 sets).
inline index padded_stride(index hidden, index element_bytes) {
  const index per_line = 64 / element_bytes;
  index ld = (hidden + per_line - 1) / per_line * per_line;
  if ((ld * element_bytes) % 1024 == 0) ld += per_line;
  return ld;
}

/// The fused CPU expert pass (docs/performance.md) behind grove::cpu_runner: one pass over
/// every routed expert and every activated adjugate of a routing_plan, with fp32, BF16, q8 or q4
/// weights, and the fused backward (fp32) on the same schedule.
///
/// Per batch it builds an expert_schedule from the plan (items: routed experts and adjugates
/// alike, group by group; tiles), stages x in a padded buffer (bf16 for vdpbf16ps), then runs two
/// parallel regions: gate/up tiles (gather rows, gate and up products, SwiGLU into h) and down
/// tiles (a block of y's columns: each group's down products summed into a per-thread partial,
/// then added to y, in the canonical order of plan/combine.hpp).
/// Results are bitwise identical for every thread count and every run; they depend on the
/// instruction-set level (each level sums in its own fixed order).
///
/// The engine owns its threads and a workspace that grows to the largest batch seen and is then
/// reused: a steady stream of batches allocates nothing. It is not thread-safe: cpu_runner
/// serialises the calls.
class cpu_engine {
 public:
  cpu_engine(int threads, simd::isa level, const schedule_shape& shape,
             quantized_kernels quantized = quantized_kernels::automatic, index dequantize_from_rows = 0)
      : quantized_(quantized), dequantize_from_rows_(dequantize_from_rows) {
    set_shape(shape);
    set_threads(threads);
    set_isa(level);
  }

  /// The forward of `request` with fp32, BF16, q8 or q4 weights (BF16: fp32 accumulation; with
  /// AVX512_BF16 the activations x and h are rounded to bf16 for vdpbf16ps, otherwise the
  /// weights are widened to fp32; q8 and q4: each item by its rows, x and h quantized to int8
  /// per block of 32 for integer dots (formats/quantized.hpp) or the item's weights dequantized
  /// per tile for the bf16 or fp32 kernels, run_block_pass).
  template <class W>
  void forward(const expert_forward<W>& request) {
    const layer_dims& d = request.weights.dims();
    require_batch_shapes(d, request.plan, request.x.rows(), request.x.cols(), "input x");
    const bool partials = request.output == forward_output::group_partials;
    if (partials) {
      require(request.y.rows() == request.plan.group_row_count() && request.y.cols() == d.hidden,
              "grove: the group partials are [", request.y.rows(), ", ", request.y.cols(),
              "] but the plan and layer expect [", request.plan.group_row_count(), ", ", d.hidden,
              "] (one row per token and picked group)");
      require(request.saved == nullptr, "grove: a training forward writes y, not group partials");
    } else {
      require_batch_shapes(d, request.plan, request.y.rows(), request.y.cols(), "output y");
    }
    float* gate_out = nullptr;
    float* up_out = nullptr;
    if (request.saved != nullptr) {
      require(info_of<W>().trainable, "grove: a training forward needs weights of a format with a backward (",
              info_of<W>().name, " has none yet)");
      request.saved->reset(d, request.plan);
      gate_out = request.saved->gate.data();
      up_out = request.saved->up.data();
    }
    expert_schedule<W>& schedule = schedule_of<W>();
    schedule.build(request.weights, request.plan, shape_);
    // The format's row says which kernels run it at this level (kernels/cpu/format_kernels.hpp).
    cpu_format<W>::with_kernels(*kernels_, [&]<class A, class Wbits, class Hs>() {
      if constexpr (is_block_format<W>)
        run_block_pass<A>(schedule, request.x, request.y, partials, cpu_format<W>::dequantize_from(quantized_, dequantize_from_rows_));
      else
        run_pass<A, Wbits, Hs>(schedule, request.x, request.y, partials, staging<A>(), h_of<Hs>(), gate_out, up_out);
    });
  }

  /// The fused backward of `request` (docs/performance.md, "Backward"), fp32.
  void backward(const expert_backward<float>& request);

  [[nodiscard]] int threads() const { return pool_->size(); }
  /// Replaces the thread pool when the count changes (allocates; not for the steady state).
  void set_threads(int threads) {
    if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    if (!pool_ || pool_->size() != threads) pool_ = std::make_unique<thread_pool>(threads);
  }
  [[nodiscard]] simd::isa isa() const { return kernels_->level; }
  /// Forces an instruction-set level; throws grove::error when this machine cannot run it.
  void set_isa(simd::isa level) {
    simd::require_supported(level);
    kernels_ = &kernels_for(level);
  }
  [[nodiscard]] quantized_kernels quantized() const { return quantized_; }
  void set_quantized(quantized_kernels kernels) { quantized_ = kernels; }
  [[nodiscard]] const schedule_shape& shape() const { return shape_; }
  void set_shape(const schedule_shape& shape) {
    require(shape.gate_up_rows >= 1 && shape.gate_up_rows <= 64 && shape.gate_up_cols >= 1 &&
                shape.gate_up_cols <= 64 && shape.down_cols >= 1,
            "grove: schedule_shape needs gate_up_rows and gate_up_cols in [1, 64] and down_cols >= 1, got (",
            shape.gate_up_rows, ", ", shape.gate_up_cols, ", ", shape.down_cols, ")");
    shape_ = shape;
  }
  [[nodiscard]] const pass_timings& last_timings() const { return timings_; }

  [[nodiscard]] std::size_t workspace_bytes() const {
    return x_f32_.bytes() + x_bf16_.bytes() + h_f32_.bytes() + h_bf16_.bytes() + schedule_f32_.bytes() +
           schedule_bf16_.bytes() + schedule_q8_.bytes() + schedule_q4_.bytes() + x_int8_.bytes() +
           x_scales_.bytes() + h_int8_.bytes() + h_scales_.bytes() + x_sums_.bytes() + h_sums_.bytes() + gate_.bytes() +
           up_.bytes() + dg_.bytes() +
           du_.bytes() + dots_.bytes() + pack_.bytes() + partial_.bytes() + weight_scratch_.bytes() +
           backward_schedule_.bytes() +
           sizeof(float) * static_cast<std::size_t>(adjugate_dots_.size());
  }
  [[nodiscard]] std::size_t workspace_allocations() const {
    return x_f32_.allocations() + x_bf16_.allocations() + h_f32_.allocations() + h_bf16_.allocations() +
           schedule_f32_.allocations() + schedule_bf16_.allocations() + schedule_q8_.allocations() +
           schedule_q4_.allocations() + x_int8_.allocations() + x_scales_.allocations() + h_int8_.allocations() +
           h_scales_.allocations() + x_sums_.allocations() + h_sums_.allocations() + gate_.allocations() +
           up_.allocations() +
           dg_.allocations() + du_.allocations() + dots_.allocations() + pack_.allocations() + partial_.allocations() +
           weight_scratch_.allocations() + backward_schedule_.allocations();
  }

 private:
  /// Stages x [T, H] into the padded buffer (bf16 for vdpbf16ps); rows split over the threads
  /// when the batch is large.
  template <class A>
  A* stage(const_rows_ref<float> x, growing_buffer<A>& x_stage, index& ldx) {
    const index T = x.rows(), H = x.cols();
    ldx = padded_stride(H, static_cast<index>(sizeof(A)));
    A* staged = x_stage.get(static_cast<std::size_t>(T * ldx));
    const auto stage_rows = kernels_->stage<A>();
    const float* x_data = x.data();
    const index x_stride = x.outerStride();
    const int threads = pool_->size();
    if (T * H < (index(1) << 16) || threads == 1) {
      stage_rows(x_data, x_stride, H, 0, T, staged, ldx);
    } else {
      auto stage_region = [&](int thread) {
        stage_rows(x_data, x_stride, H, T * thread / threads, T * (thread + 1) / threads, staged, ldx);
      };
      pool_->run(stage_region);
    }
    return staged;
  }

  /// Quantizes rows [0, rows) of `values` (row r at row_of(r), `n_of(r)` values) to int8 blocks
  /// for the integer dots (formats/quantized.hpp): row r's blocks at q + r·ldq, their scales at
  /// scales + r·lds and their sums at sums + r·lds. Split over the threads when there is enough
  /// work.
  template <class RowOf>
  void quantize_rows(index rows, index values, const RowOf& row_of, std::int8_t* q, index ldq, float* scales,
                     std::int32_t* sums, index lds) {
    const auto quantize = [&](index begin, index end) {
      for (index r = begin; r < end; ++r) {
        const auto [row, n] = row_of(r);
        quantize_activations(row, n, q + r * ldq, scales + r * lds);
        activation_block_sums(q + r * ldq, blocks_per_row(n), sums + r * lds);
      }
    };
    const int threads = pool_->size();
    if (values < (index(1) << 14) || threads == 1) {
      quantize(0, rows);
    } else {
      auto region = [&](int thread) { quantize(rows * thread / threads, rows * (thread + 1) / threads); };
      pool_->run(region);
    }
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
  void run_gate_up(const tile_pass<A, Wbits, Hs>& pass, std::span<const gate_up_tile> tiles) {
    const auto gate_up = kernels_->forward<A, Wbits, Hs>().gate_up;
    run_tiles(static_cast<index>(tiles.size()), [&](int thread, index current, index following) {
      gate_up(pass, tiles[static_cast<std::size_t>(current)],
              following >= 0 ? &tiles[static_cast<std::size_t>(following)] : nullptr, thread);
    });
  }

  /// What every pass over `schedule` reads: its items, the staged x and the sizes.
  template <class A, class Wbits, class Hs, class W>
  static tile_pass<A, Wbits, Hs> tile_pass_of(const expert_schedule<W>& schedule, const A* staged, index ldx) {
    tile_pass<A, Wbits, Hs> pass{};
    pass.items = schedule.items().data();
    pass.item_count = static_cast<index>(schedule.items().size());
    pass.gate_up_spans = schedule.gate_up_spans().data();
    pass.x = staged;
    pass.ldx = ldx;
    pass.hidden = schedule.hidden();
    pass.tokens = schedule.tokens();
    pass.down_cols = schedule.shape().down_cols;
    return pass;
  }

  /// Each thread's scratch of group partials (a down or dx tile's group rows × its columns).
  float* partial_scratch(index group_rows, index cols, index& per_thread) {
    per_thread = std::max<index>(group_rows * cols, 1);
    per_thread = (per_thread + 15) / 16 * 16;  // each thread's part on its own cache lines
    return partial_.get(static_cast<std::size_t>(per_thread * pool_->size()));
  }

  template <class A, class Wbits, class Hs, class W>
  void run_pass(const expert_schedule<W>& schedule, const_rows_ref<float> x, rows_ref<float> y, bool partials,
                growing_buffer<A>& x_stage, growing_buffer<Hs>& h_buffer, float* gate_out = nullptr,
                float* up_out = nullptr) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    timings_ = {};
    if (schedule.tokens() == 0) return;
    index ldx = 0;
    const A* staged = stage<A>(x, x_stage, ldx);
    Hs* h = h_buffer.get(static_cast<std::size_t>(std::max<index>(schedule.h_elements(), 1)));

    static_assert(std::is_same_v<weight_bits_t<W>, Wbits>);
    auto pass = tile_pass_of<A, Wbits, Hs>(schedule, staged, ldx);
    pass.h = h;
    set_outputs(pass, schedule, y, partials);
    pass.gate_out = gate_out;
    pass.up_out = up_out;
    index scratch_per_thread = 0;
    float* scratch = partial_scratch(schedule.max_group_rows(), pass.down_cols, scratch_per_thread);
    const auto down = kernels_->forward<A, Wbits, Hs>().down;
    // Gate/up tiles, then down tiles (each region ends when all its work is done). A thread
    // claims its next tile before running the current one, so that the current tile can
    // prefetch the next one's first weights (claims stay dynamic: no thread idles while tiles
    // remain unclaimed).
    const auto staged_at = clock::now();
    run_gate_up(pass, schedule.gate_up_tiles());
    const auto gate_up_at = clock::now();
    run_tiles(schedule.down_tiles(), [&](int thread, index current, index following) {
      down(pass, current, following, scratch + thread * scratch_per_thread, thread);
    });
    record_timings(start, staged_at, gate_up_at, clock::now());
  }

  /// What every pass over `schedule` writes: y (or the group partials), group by group.
  template <class Pass, class W>
  static void set_outputs(Pass& pass, const expert_schedule<W>& schedule, rows_ref<float> y, bool partials) {
    pass.y = partials ? nullptr : y.data();
    pass.ldy = y.outerStride();
    pass.groups = schedule.groups().data();
    pass.group_count = static_cast<index>(schedule.groups().size());
    pass.group_slots = schedule.group_slots();
    pass.partials = partials ? y.data() : nullptr;
    pass.ldp = y.outerStride();
  }

  void record_timings(std::chrono::steady_clock::time_point start, std::chrono::steady_clock::time_point staged_at,
                      std::chrono::steady_clock::time_point gate_up_at, std::chrono::steady_clock::time_point done_at) {
    timings_.stage = std::chrono::duration<double>(staged_at - start).count();
    timings_.gate_up = std::chrono::duration<double>(gate_up_at - staged_at).count();
    timings_.down = std::chrono::duration<double>(done_at - gate_up_at).count();
  }

  /// The pass of a block format (q8, q4), each gate/up span and each item by its own path
  /// (format_kernels.hpp, block_format_kernels): the integer dots for fewer than `from_rows`
  /// rows, the dequantized tiles (operands A: bf16 bits or fp32) from `from_rows` on. Both write
  /// h in fp32; the down tiles then read it quantized (integer items) or staged as A.
  template <class A, class Block>
  void run_block_pass(const expert_schedule<Block>& schedule, const_rows_ref<float> x, rows_ref<float> y,
                      bool partials, index from_rows) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    timings_ = {};
    const index T = schedule.tokens();
    if (T == 0) return;
    const index H = schedule.hidden();
    const auto spans = schedule.gate_up_spans();
    const auto items = schedule.items();
    const auto wide = [from_rows](const auto& item) { return item.row_count >= from_rows; };
    const bool wide_spans = std::any_of(spans.begin(), spans.end(), wide);
    const bool narrow_spans = !std::all_of(spans.begin(), spans.end(), wide);
    const bool wide_items = std::any_of(items.begin(), items.end(), wide);
    const bool narrow_items = !std::all_of(items.begin(), items.end(), wide);
    float* h = h_f32_.get(static_cast<std::size_t>(std::max<index>(schedule.h_elements(), 1)));
    // The widest item's intermediate size sizes both the weight scratch and quantized h's rows.
    index widest = 0;
    for (const auto& item : items) widest = std::max(widest, item.inter);

    // The integer dots' pass: x quantized per row and block of 32 (int8, with a scale per block).
    auto narrow = tile_pass_of<std::int8_t, Block, float>(schedule, nullptr, 0);
    narrow.h = h;
    set_outputs(narrow, schedule, y, partials);
    if (narrow_spans) {
      narrow.ldx_scales = blocks_per_row(H);
      narrow.ldx = narrow.ldx_scales * quant_block_size;
      std::int8_t* q = x_int8_.get(static_cast<std::size_t>(T * narrow.ldx));
      float* scales = x_scales_.get(static_cast<std::size_t>(T * narrow.ldx_scales));
      std::int32_t* sums = x_sums_.get(static_cast<std::size_t>(T * narrow.ldx_scales));
      const float* data = x.data();
      const index stride = x.outerStride();
      quantize_rows(T, T * H, [&](index t) { return std::pair<const float*, index>{data + t * stride, H}; }, q,
                    narrow.ldx, scales, sums, narrow.ldx_scales);
      narrow.x = q;
      narrow.x_scales = scales;
      narrow.x_sums = sums;
    }
    // The dequantized tiles' pass: x staged as A, each thread's weight scratch.
    auto deq = tile_pass_of<A, Block, float>(schedule, nullptr, 0);
    deq.h = h;
    set_outputs(deq, schedule, y, partials);
    deq.dequantize_from_rows = from_rows;
    deq.integer_pass = &narrow;
    deq.integer_down_item = kernels_->block_down_item<Block>();
    if (wide_spans) deq.x = stage<A>(x, staging<A>(), deq.ldx);
    if (wide_spans || wide_items) {
      deq.weight_row_pad = 32;  // 64 or 128 bytes: rows off 4 KiB strides (tile_pass::weight_row_pad)
      const index elements = std::max(2 * schedule.shape().gate_up_cols * (H + deq.weight_row_pad),
                                      deq.down_cols * (widest + deq.weight_row_pad));
      deq.weight_scratch_stride = (elements * static_cast<index>(sizeof(A)) + 63) / 64 * 64;
      deq.weight_scratch = weight_scratch_.get(static_cast<std::size_t>(deq.weight_scratch_stride * pool_->size()));
    }
    const auto& narrow_kernels = kernels_->forward<std::int8_t, Block, float>();
    const auto& deq_kernels = kernels_->forward<A, Block, float>();
    const auto staged_at = clock::now();

    // Gate/up tiles, each by its span's path.
    const std::span<const gate_up_tile> tiles = schedule.gate_up_tiles();
    run_tiles(static_cast<index>(tiles.size()), [&](int thread, index current, index following) {
      const gate_up_tile& tile = tiles[static_cast<std::size_t>(current)];
      const gate_up_tile* next = following >= 0 ? &tiles[static_cast<std::size_t>(following)] : nullptr;
      if (wide(spans[static_cast<std::size_t>(tile.item)]))
        deq_kernels.gate_up(deq, tile, next, thread);
      else
        narrow_kernels.gate_up(narrow, tile, next, thread);
    });

    // h as the down tiles read it: quantized per schedule row for the integer items; staged as
    // A for the dequantized ones (a copy when A is bf16; h itself when it is fp32).
    if (narrow_items) {
      const index rows = schedule.row_total();
      narrow.ldh_scales = blocks_per_row(widest);
      narrow.ldh_quantized = narrow.ldh_scales * quant_block_size;
      std::int8_t* hq = h_int8_.get(static_cast<std::size_t>(std::max<index>(rows * narrow.ldh_quantized, 1)));
      float* hs = h_scales_.get(static_cast<std::size_t>(std::max<index>(rows * narrow.ldh_scales, 1)));
      std::int32_t* h_sums = h_sums_.get(static_cast<std::size_t>(std::max<index>(rows * narrow.ldh_scales, 1)));
      // Schedule row r belongs to the last item whose first_row is at most r (items number their
      // rows consecutively, in item order); a dequantized item's rows are left out (n = 0).
      quantize_rows(
          rows, schedule.h_elements(),
          [&](index r) {
            const auto after = std::upper_bound(items.begin(), items.end(), r,
                                                [](index row, const auto& item) { return row < item.first_row; });
            const auto& item = *(after - 1);
            return std::pair<const float*, index>{h + item.h_offset + (r - item.first_row) * item.inter,
                                                  wide(item) ? 0 : item.inter};
          },
          hq, narrow.ldh_quantized, hs, h_sums, narrow.ldh_scales);
      narrow.h_quantized = hq;
      narrow.h_scales = hs;
      narrow.h_sums = h_sums;
    }
    if (wide_items) deq.h_staged = stage_h<A>(schedule, h, wide);
    const auto gate_up_at = clock::now();

    index scratch_per_thread = 0;
    float* scratch = partial_scratch(schedule.max_group_rows(), deq.down_cols, scratch_per_thread);
    run_tiles(schedule.down_tiles(), [&](int thread, index current, index following) {
      // Without dequantized items, the integer dots' own down tile (the decode path).
      if (wide_items)
        deq_kernels.down(deq, current, following, scratch + thread * scratch_per_thread, thread);
      else
        narrow_kernels.down(narrow, current, following, scratch + thread * scratch_per_thread, thread);
    });
    record_timings(start, staged_at, gate_up_at, clock::now());
  }

  /// h of the items `wide` selects, as the dequantized down tiles read it: rounded to bf16 (the
  /// rounding x gets), or h itself when A is fp32.
  template <class A, class Block, class Wide>
  const A* stage_h(const expert_schedule<Block>& schedule, const float* h, const Wide& wide) {
    if constexpr (std::is_same_v<A, float>) {
      (void)schedule;
      (void)wide;
      return h;
    } else {
      std::uint16_t* staged = h_bf16_.get(static_cast<std::size_t>(std::max<index>(schedule.h_elements(), 1)));
      const auto stage_rows = kernels_->stage<std::uint16_t>();
      const auto items = schedule.items();
      const auto n = static_cast<index>(items.size());
      const auto run = [&](index begin, index end) {
        for (index i = begin; i < end; ++i) {
          const auto& item = items[static_cast<std::size_t>(i)];
          if (wide(item))
            stage_rows(h + item.h_offset, item.inter, item.inter, 0, item.row_count, staged + item.h_offset, item.inter);
        }
      };
      const int threads = pool_->size();
      if (schedule.h_elements() < (index(1) << 16) || threads == 1) {
        run(0, n);
      } else {
        auto region = [&](int thread) { run(n * thread / threads, n * (thread + 1) / threads); };
        pool_->run(region);
      }
      return staged;
    }
  }

  template <class W>
  expert_schedule<W>& schedule_of() {
    if constexpr (std::is_same_v<W, float>)
      return schedule_f32_;
    else if constexpr (std::is_same_v<W, q8_block>)
      return schedule_q8_;
    else if constexpr (std::is_same_v<W, q4_block>)
      return schedule_q4_;
    else
      return schedule_bf16_;
  }
  /// The staging buffer of x, and h's buffer, for elements A and Hs (fp32, or bf16 bits).
  template <class A>
  growing_buffer<A>& staging() {
    if constexpr (std::is_same_v<A, float>)
      return x_f32_;
    else
      return x_bf16_;
  }
  template <class Hs>
  growing_buffer<Hs>& h_of() {
    if constexpr (std::is_same_v<Hs, float>)
      return h_f32_;
    else
      return h_bf16_;
  }

  std::unique_ptr<thread_pool> pool_;
  const cpu_kernel_table* kernels_ = &kernels_for(simd::isa::scalar);
  pass_timings timings_{};
  schedule_shape shape_{};
  expert_schedule<float> schedule_f32_;
  expert_schedule<bf16> schedule_bf16_;
  expert_schedule<q8_block> schedule_q8_;
  expert_schedule<q4_block> schedule_q4_;
  growing_buffer<float> x_f32_, h_f32_;
  growing_buffer<std::uint16_t> x_bf16_, h_bf16_;
  growing_buffer<std::int8_t> x_int8_, h_int8_;  // the block formats' quantized x and h
  growing_buffer<float> x_scales_, h_scales_;
  growing_buffer<std::int32_t> x_sums_, h_sums_;  ///< each block's Σ of its int8 values (the weights' offset)
  // Backward's workspace: g and u when recomputed, dg and du, partial dots (w·h lives in h_f32_).
  backward_schedule backward_schedule_;
  growing_buffer<float> gate_, up_, dg_, du_, dots_, pack_;
  growing_buffer<float> partial_;  // per-thread group partials of the down and dx tiles
  growing_buffer<std::byte> weight_scratch_;  // per-thread dequantized weight rows (block formats)
  quantized_kernels quantized_ = quantized_kernels::automatic;
  index dequantize_from_rows_ = 0;  ///< automatic's threshold; 0: the format's (format_kernels.hpp)
  row_matrix<float> adjugate_dots_;
};

inline void cpu_engine::backward(const expert_backward<float>& request) {
  const weights_view<float>& weights = request.weights;
  const routing_plan<float>& plan = request.plan;
  row_matrix<float>& dw = request.dw;
  rows_ref<float> dx = request.dx;  // a request is read-only; the Ref it holds writes
  require_backward_inputs<float>(weights.dims(), plan, request.x, request.dy, request.dx, request.grads.dims(),
                                 request.saved);
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  timings_ = {};
  dw.setZero(plan.tokens, plan.top_k);
  if (plan.tokens == 0) return;
  schedule_f32_.build(weights, plan, shape_);
  backward_schedule_.build(schedule_f32_, request.grads);
  const expert_schedule<float>& schedule = schedule_f32_;
  const backward_schedule& tiles = backward_schedule_;
  const index T = plan.tokens, H = weights.dims().hidden;
  const auto h_size = static_cast<std::size_t>(std::max<index>(schedule.h_elements(), 1));
  index ldx = 0;
  const float* staged = stage<float>(request.x, x_f32_, ldx);
  const auto staged_at = clock::now();

  // g and u: the caller's saved ones, or recomputed by the forward's gate/up tiles.
  const float* gate = nullptr;
  const float* up = nullptr;
  if (request.saved != nullptr) {
    gate = request.saved->gate.data();
    up = request.saved->up.data();
  } else {
    float* g = gate_.get(h_size);
    float* u = up_.get(h_size);
    auto pass = tile_pass_of<float, float, float>(schedule, staged, ldx);
    pass.gate_out = g;
    pass.up_out = u;
    run_gate_up(pass, schedule.gate_up_tiles());
    gate = g;
    up = u;
  }
  const auto recomputed_at = clock::now();

  const index dot_blocks = tiles.dot_blocks();
  const backward_pass pass{schedule.items().data(),
                           static_cast<index>(schedule.items().size()),
                           tiles.gradients().data(),
                           tiles.gradient_items().data(),
                           staged,
                           ldx,
                           request.dy.data(),
                           request.dy.outerStride(),
                           gate,
                           up,
                           h_f32_.get(h_size),
                           dg_.get(h_size),
                           du_.get(h_size),
                           dots_.get(static_cast<std::size_t>(std::max<index>(schedule.row_total(), 1) * dot_blocks)),
                           dot_blocks,
                           dx.data(),
                           dx.outerStride(),
                           backward_schedule::dx_cols,
                           H,
                           schedule.groups().data(),
                           static_cast<index>(schedule.groups().size()),
                           schedule.group_slots()};
  const cpu_kernel_table& kernels = *kernels_;
  const std::span<const gate_up_tile> dh_tiles = tiles.dh_tiles();
  // Each thread packs the weight panel of its dh and dx tiles into its own part of pack_.
  const index pack_per_thread = backward_schedule::pack_floats;
  float* pack = pack_.get(static_cast<std::size_t>(pack_per_thread * pool_->size()));
  run_tiles(static_cast<index>(dh_tiles.size()), [&](int thread, index current, index) {
    kernels.dh(pass, dh_tiles[static_cast<std::size_t>(current)], pack + thread * pack_per_thread);
  });
  const auto dh_at = clock::now();

  // ⟨dy, E(x)⟩ of every row: its partial sums over column blocks, in block order. A routed
  // expert's row goes to dw at its pick slot, an adjugate's to the adjugate dots at its slot
  // (group slot once per token, pick slot once per pick; add_adjugate_dots sorts them out).
  adjugate_dots_.setZero(T, adjugate_dot_columns(plan));
  for (const auto& item : schedule.items()) {
    const index blocks = (item.inter + backward_schedule::block_cols - 1) / backward_schedule::block_cols;
    for (index r = 0; r < item.row_count; ++r) {
      const float* partial = pass.dots + (item.first_row + r) * dot_blocks;
      float dot = partial[0];
      for (index b = 1; b < blocks; ++b) dot += partial[b];
      const auto& row = item.rows[r];
      (item.adjugate ? adjugate_dots_ : dw)(row.token, row.slot) = dot;
    }
  }
  add_adjugate_dots(plan, adjugate_dots_, dw);

  // dx tiles (one column block of dx each, all items in order) and weight-gradient tiles,
  // from one counter: the fewer, larger dx tiles first.
  const index dx_tiles = tiles.dx_tiles();
  const std::span<const gradient_tile> gradient_tiles = tiles.gradient_tiles();
  index scratch_per_thread = 0;
  float* scratch = partial_scratch(schedule.max_group_rows(), backward_schedule::dx_cols, scratch_per_thread);
  run_tiles(dx_tiles + static_cast<index>(gradient_tiles.size()), [&](int thread, index current, index) {
    if (current < dx_tiles)
      kernels.dx(pass, current, pack + thread * pack_per_thread, scratch + thread * scratch_per_thread);
    else
      kernels.gradient(pass, gradient_tiles[static_cast<std::size_t>(current - dx_tiles)]);
  });
  const auto done_at = clock::now();
  timings_.stage = std::chrono::duration<double>(staged_at - start).count();
  timings_.gate_up = std::chrono::duration<double>(recomputed_at - staged_at).count();
  timings_.dh = std::chrono::duration<double>(dh_at - recomputed_at).count();
  timings_.gradients = std::chrono::duration<double>(done_at - dh_at).count();
}

}  // namespace detail
GROVE_END_NAMESPACE

#pragma once

// What the CPU tile kernels (detail/expert_tiles-inl.hpp, detail/backward_tiles-inl.hpp) read and
// write. This is the lowest header of the CPU kernels: the kernels include it, the kernel table
// and the engine include the kernels, so no include runs upwards.

#include <cstddef>

#include "grove/config/dynamic.hpp"
#include "grove/kernels/cpu/backward_schedule.hpp"
#include "grove/kernels/cpu/expert_schedule.hpp"
#include "grove/simd/batch.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// What the forward tile kernels of one batch read and write. A: element of the staged
/// activations (float, bf16 bits for vdpbf16ps, or int8 for the block formats' integer dots),
/// W: weight bits (float, bf16 bits, or a q8/q4 block), Hs: element of h (the SwiGLU outputs,
/// bf16 bits when the down product uses vdpbf16ps).
template <class A, class W, class Hs>
struct tile_pass {
  const expert_item<W>* items;
  index item_count;
  const expert_item<W>* gate_up_spans;  ///< what gate_up_tile::item numbers (expert_schedule::gate_up_spans)
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
  // The canonical sum (plan/combine.hpp): a down tile sums each group's items into a scratch of
  // the group's rows (per thread, max_group_rows × down_cols floats), then adds it to y.
  const group_span* groups = nullptr;
  index group_count = 0;
  const std::int32_t* group_slots = nullptr;  ///< per item row (first_row numbering): its group row
  float* partials = nullptr;  ///< when set: the group partials go there (row: plan group row), y untouched
  index ldp = 0;
  // The block formats (quantized_tiles-inl.hpp): x is quantized (A = int8, with these scales per
  // row and block), h is computed in fp32 and then quantized per schedule row for the down tiles.
  // Each block's Σ of its int8 values (x_sums, h_sums: the layout of the scales) takes the
  // weights' stored offset out of the integer products (formats/quantized.hpp, "Panels").
  const float* x_scales = nullptr;
  const std::int32_t* x_sums = nullptr;
  index ldx_scales = 0;
  const std::int8_t* h_quantized = nullptr;  ///< [row_total, ldh_quantized]: schedule row r is item row first_row + ·
  index ldh_quantized = 0;
  const float* h_scales = nullptr;  ///< [row_total, ldh_scales]
  const std::int32_t* h_sums = nullptr;
  index ldh_scales = 0;
  // The block formats' dequantized tiles (dequantized_tiles-inl.hpp; A fp32 or bf16 bits, Hs
  // fp32): each thread's weight rows, at weight_scratch + thread · weight_scratch_stride bytes.
  std::byte* weight_scratch = nullptr;
  index weight_scratch_stride = 0;
  // The weight rows' stride is their length plus this (elements): 0 for a layer's own weights;
  // the dequantized rows are padded off 4 KiB strides, which the 16 rows a panel converts at
  // once would otherwise write into one cache set.
  index weight_row_pad = 0;
  // Their down tiles read h as A (h_staged: h rounded as x is, or h itself when A is fp32) for
  // the items of at least dequantize_from_rows rows; the other items run the integer dots of
  // integer_pass (a tile_pass<std::int8_t, W, float>) through integer_down_item.
  const A* h_staged = nullptr;
  index dequantize_from_rows = 0;
  const void* integer_pass = nullptr;
  void (*integer_down_item)(const void* integer_pass, const expert_item<W>& item, index c_begin, index c_end,
                            float* partial, const expert_item<W>* next_item, index next_col) = nullptr;
};

/// What the backward tile kernels read and write; fp32 throughout. Buffers "in the layout of
/// h" hold every item's [row_count, inter] block at its h_offset.
struct backward_pass {
  const expert_item<float>* items;
  index item_count;
  const item_gradients* grads;  ///< per item
  const std::int32_t* gradient_items;  ///< the items of each gradient tile's MLP (backward_schedule)
  const float* x;               ///< staged activations [T, ldx]
  index ldx;
  const float* dy;
  index lddy;
  const float* gate;  ///< g, u (saved or recomputed), layout of h
  const float* up;
  float* hw;    ///< w·h, layout of h
  float* dg;    ///< ∂L/∂g, layout of h
  float* du;    ///< ∂L/∂u, layout of h
  float* dots;  ///< partial ⟨r, h⟩, [row_total, dot_blocks]
  index dot_blocks;
  float* dx;
  index lddx;
  index dx_cols;
  index hidden;
  const group_span* groups;  ///< dx sums group by group, like y (plan/combine.hpp)
  index group_count;
  const std::int32_t* group_slots;
};

}  // namespace detail
GROVE_END_NAMESPACE

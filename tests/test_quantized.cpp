// The block formats q8 and q4 (docs/quantization.md): ggml's byte layout and rounding, worked out
// by hand; the integer dots of every instruction-set level against this file's own reading of
// the documented order, bit for bit; and the quantized layer: fp32 routing (the picks never
// change), thread invariance, partials, shards, loading, and its distance from the fp32 layer.
#include <doctest/doctest.h>

#include "support/test_support.hpp"

#include <grove/grove.hpp>
#include <grove/io.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using Index = grove::index;  // not `index`: POSIX declares an index() function
using grove::q4_block;
using grove::q8_block;
using grove::row_matrix;
using grove_test::same_bits;

/// fp16 bits → float, written out here (binary16: 1 sign, 5 exponent, 10 fraction bits).
float half_to_float(std::uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1F, fraction = h & 0x3FF;
  const double magnitude = exponent == 0 ? std::ldexp(fraction, -24) : std::ldexp(1024 + fraction, exponent - 25);
  return static_cast<float>(sign ? -magnitude : magnitude);
}

/// This file's reading of the documented dot (formats/quantized.hpp): per block, the 32 products
/// summed exactly; fma'd with a·d in block order.
float documented_dot(const std::int8_t* q, const float* a, const std::vector<std::int8_t>& w_values,
                     const std::vector<float>& w_scales) {
  float acc = 0.0f;
  const auto blocks = static_cast<Index>(w_scales.size());
  for (Index b = 0; b < blocks; ++b) {
    long p = 0;
    for (int i = 0; i < 32; ++i) p += long(q[b * 32 + i]) * long(w_values[static_cast<std::size_t>(b * 32 + i)]);
    acc = std::fma(a[b] * w_scales[static_cast<std::size_t>(b)], float(p), acc);
  }
  return acc;
}

/// A matrix of `rows` rows of `blocks` blocks in memory (panels of 16 rows) back in ggml's row
/// layout, as this file reads the documented panel layout: block b of a panel of n rows is n
/// scales and chunk c (values 4c..4c+3) of every row; q8 bytes hold q + 128; blocks go in pairs
/// (the two blocks' scales, then their values), a last odd block alone.
template <class Block>
std::vector<Block> rows_of(const Block* panels, Index rows, Index blocks) {
  std::vector<Block> out(static_cast<std::size_t>(rows * blocks));
  const auto* bytes = reinterpret_cast<const unsigned char*>(panels);
  constexpr bool q8 = std::is_same_v<Block, q8_block>;
  constexpr int chunks = q8 ? 8 : 4;
  for (Index first = 0; first < rows; first += 16) {
    const Index n = std::min<Index>(16, rows - first);
    const unsigned char* panel = bytes + first * blocks * Index(sizeof(Block));
    for (Index lane = 0; lane < n; ++lane)
      for (Index b = 0; b < blocks; ++b) {
        const Index unit = n * Index(sizeof(Block)), pair = b / 2 * 2, second = b - pair;
        const bool paired = pair + 1 < blocks;
        const unsigned char* scales = panel + pair * unit + (paired ? second * 2 * n : 0);
        const unsigned char* values =
            panel + pair * unit + (paired ? 4 * n + second * (unit - 2 * n) : 2 * n);
        Block& block = out[static_cast<std::size_t>((first + lane) * blocks + b)];
        block.scale = static_cast<std::uint16_t>(scales[2 * lane] | (scales[2 * lane + 1] << 8));
        for (int c = 0; c < chunks; ++c)
          for (int i = 0; i < 4; ++i) {
            const unsigned char v = values[4 * (n * c + lane) + i];
            if constexpr (q8)
              block.q[4 * c + i] = static_cast<std::int8_t>(int(v) - 128);
            else
              block.q[4 * c + i] = v;
          }
      }
  }
  return out;
}

/// A block row's values and scales, read field by field (q4: byte j holds values j and j + 16).
void unpack(const q8_block* row, Index blocks, std::vector<std::int8_t>& values, std::vector<float>& scales) {
  values.clear();
  scales.clear();
  for (Index b = 0; b < blocks; ++b) {
    scales.push_back(half_to_float(row[b].scale));
    for (int i = 0; i < 32; ++i) values.push_back(row[b].q[i]);
  }
}
void unpack(const q4_block* row, Index blocks, std::vector<std::int8_t>& values, std::vector<float>& scales) {
  values.clear();
  scales.clear();
  for (Index b = 0; b < blocks; ++b) {
    scales.push_back(half_to_float(row[b].scale));
    std::int8_t v[32];
    for (int j = 0; j < 16; ++j) {
      v[j] = static_cast<std::int8_t>((row[b].q[j] & 15) - 8);
      v[j + 16] = static_cast<std::int8_t>((row[b].q[j] >> 4) - 8);
    }
    values.insert(values.end(), v, v + 32);
  }
}

std::vector<grove::simd::isa> levels() {
  std::vector<grove::simd::isa> out;
  for (const auto level : {grove::simd::isa::scalar, grove::simd::isa::avx2, grove::simd::isa::avx512,
                           grove::simd::isa::avx512_bf16})
    if (grove::simd::supported(level)) out.push_back(level);
  return out;
}

/// A runner of `threads` threads at `level`; the integer dots unless `kernels` says otherwise
/// (the tests of the integer arithmetic use batches big enough for `automatic` to dequantize).
/// `from_rows`: automatic's threshold (0: the format's).
std::shared_ptr<grove::cpu_runner> runner_of(int threads, grove::simd::isa level = grove::simd::best_isa(),
                                             grove::quantized_kernels kernels = grove::quantized_kernels::integer_dots,
                                             Index from_rows = 0) {
  grove::cpu_runner_options o;
  o.threads = threads;
  o.isa = level;
  o.quantized = kernels;
  o.dequantize_from_rows = from_rows;
  return std::make_shared<grove::cpu_runner>(o);
}

/// y of `layer` on `x` from shards of its groups: each shard's group partials (its runner, a
/// view of its groups, the plan restricted to them), gathered into the plan's group rows and
/// combined, as an expert-parallel layer does across ranks.
template <class Layer>
row_matrix<float> y_from_shards(const Layer& layer, const grove::routing_plan<float>& plan, const row_matrix<float>& x,
                                const std::vector<std::vector<Index>>& shards) {
  row_matrix<float> gathered = row_matrix<float>::Zero(plan.group_row_count(), x.cols());
  for (const auto& groups : shards) {
    const auto part = grove::restrict_to_groups(plan, groups);
    row_matrix<float> p(part.group_row_count(), x.cols());
    layer.runner().forward_partials(layer.weights().only_groups(groups), part, x, p);
    // part's group rows are plan's group rows of those groups, in order.
    Index at = 0;
    for (const Index g : groups)
      for (Index r = plan.adjugate_offsets[static_cast<std::size_t>(g)];
           r < plan.adjugate_offsets[static_cast<std::size_t>(g) + 1]; ++r)
        gathered.row(r) = p.row(at++);
  }
  row_matrix<float> y = row_matrix<float>::Zero(x.rows(), x.cols());
  grove::combine_partials(plan, gathered, y);
  return y;
}

/// The fp32 layer a block layer stands for: each expert and adjugate tensor dequantized here
/// (value × scale, from unpack's reading of the blocks), the router and the bias `source`'s.
template <class Block>
grove::layer_parameters<float> dequantized_layer(const grove::layer_parameters<Block>& q,
                                                 const grove::layer_parameters<float>& source) {
  std::vector<std::pair<std::string, std::vector<Block>>> blocks;
  q.view().for_each_tensor([&](const grove::tensor_info& info, const Block* const& p) {
    if (p != nullptr && info.role != grove::tensor_role::selection_bias)
      blocks.emplace_back(info.name, rows_of(p, info.rows, (info.cols + 31) / 32));
  });
  grove::layer_parameters<float> out(source);
  std::vector<std::int8_t> values;
  std::vector<float> scales;
  out.span().for_each_tensor([&](const grove::tensor_info& info, float*& p) {
    if (info.role == grove::tensor_role::router || info.role == grove::tensor_role::selection_bias) return;
    const auto it = std::find_if(blocks.begin(), blocks.end(), [&](const auto& b) { return b.first == info.name; });
    REQUIRE(it != blocks.end());
    const Index per_row = (info.cols + 31) / 32;
    for (Index r = 0; r < info.rows; ++r) {
      unpack(it->second.data() + r * per_row, per_row, values, scales);
      for (Index c = 0; c < info.cols; ++c)
        p[r * info.cols + c] = float(values[static_cast<std::size_t>(c)]) * scales[static_cast<std::size_t>(c / 32)];
    }
  });
  return out;
}

}  // namespace

TEST_SUITE("quantized") {
  TEST_CASE("the format table's q8 and q4 rows") {
    CHECK(grove::weight_formats.size() == 5);
    CHECK(grove::info_of<q8_block>().name == "q8");
    CHECK(grove::info_of<q4_block>().bits == 4);
    CHECK(grove::info_of<q8_block>().block == 32);
    CHECK(grove::info_of<q4_block>().fp32_routing_copy);
    CHECK_FALSE(grove::info_of<q8_block>().trainable);
    CHECK(grove::parse_weight_format("q4") == grove::weight_format::q4);
    static_assert(grove::is_block_format<q8_block> && !grove::is_block_format<float>);
    static_assert(grove::units_per_row<q8_block>(33) == 2 && grove::units_per_row<float>(33) == 33);
    // bytes_for: rows of blocks (34 and 18 bytes) for every tensor, the fp32 router copy and bias.
    const grove::layer_dims d{40, 4, 2, 8, 4};  // H = 40: two blocks per row, the second padded
    const long rows = 4 + 2 * 4 * 8 + 2 * 2 * 4, down = 40 * 4 + 40 * 2;  // rows of H inputs; down rows (1 block)
    CHECK(grove::layer_parameters<q8_block>::bytes_for(d) == std::size_t(34 * (2 * rows + down) + 4 * (4 * 40 + 4)));
    CHECK(grove::layer_parameters<q4_block>::bytes_for(d) == std::size_t(18 * (2 * rows + down) + 4 * (4 * 40 + 4)));
  }

  TEST_CASE("q8 and q4 blocks hold ggml's bytes: hand-worked rows, padding, and refused values") {
    // x = -16, -15, …, 15 and then 8 more values: two blocks, the second padded with zeros.
    std::vector<float> x(40);
    for (int i = 0; i < 40; ++i) x[static_cast<std::size_t>(i)] = float(i - 16);
    q8_block q8[2];
    grove::quantize_row(x.data(), 40, q8);
    // Block 0: amax 16, d = 16/127 (stored as fp16), q = round(x / d) with the float d:
    // −16 → −127, 0 → 0, 15 → 119.06 → 119; the others as roundf gives them.
    const float id = 1.0f / (16.0f / 127.0f);
    CHECK(q8[0].scale == grove::f16_bits_of(16.0f / 127.0f));
    CHECK(q8[0].q[0] == -127);
    CHECK(q8[0].q[16] == 0);
    CHECK(q8[0].q[31] == 119);
    for (int i = 0; i < 32; ++i) CHECK(q8[0].q[i] == static_cast<std::int8_t>(std::round(float(i - 16) * id)));
    // Block 1: x = 16 … 23 then zeros: amax 23.
    CHECK(q8[1].q[0] == static_cast<std::int8_t>(std::round(16.0f * (1.0f / (23.0f / 127.0f)))));
    CHECK(q8[1].q[7] == 127);
    for (int i = 8; i < 32; ++i) CHECK(q8[1].q[i] == 0);

    q4_block q4[2];
    grove::quantize_row(x.data(), 40, q4);
    // Block 0: the largest magnitude is x = −16, so d = −16 / −8 = 2 and n = min(15, ⌊x/2 + 8.5⌋):
    // x = −16 → 0, x = 0 → 8, x = 15 → 16 → 15. Byte j = n_j | n_{j+16} << 4.
    CHECK(half_to_float(q4[0].scale) == 2.0f);
    CHECK(q4[0].q[0] == (0 | (8 << 4)));
    CHECK(q4[0].q[15] == (8 | (15 << 4)));  // value 15: x = −1 → ⌊−0.5 + 8.5⌋ = 8; value 31: x = 15 → 15
    // Dequantized: d · (n − 8) exactly.
    std::vector<float> back(40);
    grove::dequantize_row(q4, 40, back.data());
    CHECK(back[0] == -16.0f);
    CHECK(back[16] == 0.0f);
    CHECK(back[31] == 14.0f);
    grove::dequantize_row(q8, 40, back.data());
    CHECK(back[16] == 0.0f);
    CHECK(back[0] == half_to_float(q8[0].scale) * -127.0f);
    // A stored −128 is refused (ggml never writes it, and the kernels' sign trick needs it).
    CHECK(grove::valid_block(q8[0]));
    q8[0].q[3] = -128;
    CHECK_FALSE(grove::valid_block(q8[0]));
  }

  TEST_CASE("activations quantize per block: scale amax/127, nearest-even, padding zero") {
    std::vector<float> x{2.5f, -127.0f, 0.5f, 1.5f};
    std::vector<std::int8_t> q(32);
    float scale = 0;
    grove::quantize_activations(x.data(), 4, q.data(), &scale);
    CHECK(scale == 127.0f / 127.0f);
    CHECK(q[0] == 2);  // 2.5 → 2 (ties to even), unlike the weights' roundf
    CHECK(q[1] == -127);
    CHECK(q[2] == 0);  // 0.5 → 0
    CHECK(q[3] == 2);  // 1.5 → 2
    for (int i = 4; i < 32; ++i) CHECK(q[static_cast<std::size_t>(i)] == 0);
    std::vector<float> zeros(32, 0.0f);
    grove::quantize_activations(zeros.data(), 32, q.data(), &scale);
    CHECK(scale == 0.0f);
    CHECK(std::all_of(q.begin(), q.end(), [](std::int8_t v) { return v == 0; }));
  }

  TEST_CASE("the integer dots of every level equal the documented order, bit for bit") {
    for (const Index K : {Index(32), Index(64), Index(96), Index(100), Index(2048)}) {
      CAPTURE(K);
      // 21 weight rows: a whole panel of 16 and a last panel of 5.
      const Index blocks = grove::blocks_per_row(K), rows = 3, cols = 21;
      const auto x = grove_test::random_matrix<float>(rows, K, 1 + K, 1.0);
      const auto w = grove_test::random_matrix<float>(cols, K, 2 + K, 0.05);
      std::vector<std::int8_t> q(static_cast<std::size_t>(rows * blocks * 32));
      std::vector<float> scales(static_cast<std::size_t>(rows * blocks));
      for (Index r = 0; r < rows; ++r)
        grove::quantize_activations(x.data() + r * K, K, q.data() + r * blocks * 32, scales.data() + r * blocks);
      std::vector<q8_block> w8(static_cast<std::size_t>(cols * blocks));
      std::vector<q4_block> w4(static_cast<std::size_t>(cols * blocks));
      for (Index c = 0; c < cols; ++c) {
        grove::quantize_row(w.data() + c * K, K, w8.data() + c * blocks);
        grove::quantize_row(w.data() + c * K, K, w4.data() + c * blocks);
      }
      std::vector<float> want8(static_cast<std::size_t>(rows * cols)), want4(want8.size());
      std::vector<std::int8_t> values;
      std::vector<float> w_scales;
      for (Index r = 0; r < rows; ++r)
        for (Index c = 0; c < cols; ++c) {
          unpack(w8.data() + c * blocks, blocks, values, w_scales);
          want8[static_cast<std::size_t>(r * cols + c)] =
              documented_dot(q.data() + r * blocks * 32, scales.data() + r * blocks, values, w_scales);
          unpack(w4.data() + c * blocks, blocks, values, w_scales);
          want4[static_cast<std::size_t>(r * cols + c)] =
              documented_dot(q.data() + r * blocks * 32, scales.data() + r * blocks, values, w_scales);
          // The library's own scalar statement of the order agrees.
          CHECK(grove::quantized_dot(q.data() + r * blocks * 32, scales.data() + r * blocks, w8.data() + c * blocks,
                                     blocks) == want8[static_cast<std::size_t>(r * cols + c)]);
        }
      // The kernels read panels; this file's own reading of them gives the rows back.
      std::vector<q8_block> p8(w8.size());
      std::vector<q4_block> p4(w4.size());
      grove::rows_to_panels(w8.data(), cols, blocks, p8.data());
      grove::rows_to_panels(w4.data(), cols, blocks, p4.data());
      CHECK(std::memcmp(rows_of(p8.data(), cols, blocks).data(), w8.data(), w8.size() * sizeof(q8_block)) == 0);
      CHECK(std::memcmp(rows_of(p4.data(), cols, blocks).data(), w4.data(), w4.size() * sizeof(q4_block)) == 0);
      std::vector<q8_block> back8(w8.size());
      grove::panels_to_rows(p8.data(), cols, blocks, back8.data());
      CHECK(std::memcmp(back8.data(), w8.data(), w8.size() * sizeof(q8_block)) == 0);
      for (const auto level : levels()) {
        CAPTURE(grove::simd::isa_name(level));
        const auto& kernels = grove::detail::kernels_for(level);
        std::vector<float> got(want8.size());
        kernels.q8_dots(q.data(), scales.data(), rows, p8.data(), cols, blocks, got.data());
        CHECK(std::memcmp(got.data(), want8.data(), got.size() * sizeof(float)) == 0);
        kernels.q4_dots(q.data(), scales.data(), rows, p4.data(), cols, blocks, got.data());
        CHECK(std::memcmp(got.data(), want4.data(), got.size() * sizeof(float)) == 0);
      }
    }
  }

  TEST_CASE("a q8 or q4 layer routes as the fp32 layer, bit for bit, and stays near its output") {
    // H = 100 (not a multiple of 32: padded blocks), I = 40, Ia = 20; a selection bias.
    const grove::layer_dims d{100, 12, 4, 40, 20};
    auto source = grove::layer_parameters<float>::random(d, 3, 0.1);
    for (Index e = 0; e < d.experts; ++e) source.bias()[static_cast<std::size_t>(e)] = 0.02f * float(e % 3);
    const auto x = grove_test::random_matrix<float>(37, d.hidden, 4, 1.0);
    const grove::layer<grove::dynamic_config<float>> f32(grove::dynamic_config<float>(d, 3, 0.2),
                                                         grove::layer_parameters<float>(source), runner_of(1));
    const auto want = f32.forward(x, {.routing = true});
    const auto check = [&]<class Block>(double bound) {
      auto weights = grove::layer_parameters<Block>::from(source.view());
      const grove::layer<grove::dynamic_config<Block>> q(grove::dynamic_config<Block>(d, 3, 0.2), std::move(weights),
                                                         runner_of(1));
      const auto got = q.forward(x, {.routing = true});
      // Routing is the fp32 router's: the same logits, picks and weights.
      CHECK(same_bits(got.routing->logits, want.routing->logits));
      CHECK(got.routing->topk_ids == want.routing->topk_ids);
      CHECK(same_bits(got.routing->topk_weights, want.routing->topk_weights));
      const double relative = (got.y - want.y).norm() / want.y.norm();
      CHECK(relative < bound);
      CHECK(relative > 0);
      // Every thread count and every level's dots give the same bits: compare with 1 thread.
      for (const int threads : {2, 3, 4}) {
        CAPTURE(threads);
        CHECK(same_bits(q.on(runner_of(threads)).forward(x), got.y));
      }
      // The group partials, combined, are y bit for bit (expert parallelism sends partials).
      grove::routing_plan<float> plan;
      q.route_into(plan, x);
      row_matrix<float> partials(plan.group_row_count(), d.hidden), y = row_matrix<float>::Zero(x.rows(), d.hidden);
      q.runner().forward_partials(q.weights(), plan, x, partials);
      grove::combine_partials(plan, partials, y);
      CHECK(same_bits(y, got.y));
      // Two shards of groups, gathered and combined, are the whole layer's y bit for bit.
      CHECK(same_bits(y_from_shards(q, plan, x, {{0, 1}, {2, 3}}), got.y));
      return got.y;
    };
    const row_matrix<float> y8 = check.template operator()<q8_block>(0.02);
    const row_matrix<float> y4 = check.template operator()<q4_block>(0.2);
    CHECK((y8 - want.y).norm() < (y4 - want.y).norm());

    // The other levels: the same dots, SwiGLU's exp may differ in the last bit.
    for (const auto level : levels()) {
      CAPTURE(grove::simd::isa_name(level));
      const grove::layer<grove::dynamic_config<q8_block>> q(grove::dynamic_config<q8_block>(d, 3, 0.2),
                                                            grove::layer_parameters<q8_block>::from(source.view()),
                                                            runner_of(2, level));
      CHECK((q.forward(x) - y8).norm() <= 1e-4 * y8.norm());
    }
  }

  TEST_CASE("dequantized tiles give the bits of the fp32 (or bf16) layer of the dequantized weights") {
    // H = 100 and I = 40, Ia = 20: rows end in padded blocks, which the tiles leave out, and
    // matrices end in panels of fewer than 16 rows. H = 64, I = 64, Ia = 32: whole blocks and
    // whole panels (converted 16 rows at a time at AVX-512). At avx512_bf16 the tiles round the
    // weights to bf16 and run the bf16 kernels; elsewhere fp32.
    const auto dequantized = grove::quantized_kernels::dequantized;
    for (const grove::layer_dims d : {grove::layer_dims{100, 12, 4, 40, 20}, grove::layer_dims{64, 12, 4, 64, 32}}) {
    CAPTURE(d.hidden);
    const auto source = grove::layer_parameters<float>::random(d, 21, 0.1);
    const auto x = grove_test::random_matrix<float>(37, d.hidden, 22, 1.0);
    const auto check = [&]<class Block>() {
      const auto q = grove::layer_parameters<Block>::from(source.view());
      const auto f32 = dequantized_layer(q, source);
      const auto bf16 = grove::layer_parameters<grove::bf16>::from(f32.view());
      const grove::layer<grove::dynamic_config<Block>> layer(grove::dynamic_config<Block>(d, 3, 0.2),
                                                             grove::layer_parameters<Block>(q), runner_of(1));
      grove::routing_plan<float> plan;
      layer.route_into(plan, x);
      for (const auto mode : {grove::adjugate_mode::once_per_token, grove::adjugate_mode::once_per_pick,
                              grove::adjugate_mode::none}) {
        plan.adjugates = mode;
        CAPTURE(static_cast<int>(mode));
        for (const auto level : levels()) {
          CAPTURE(grove::simd::isa_name(level));
          row_matrix<float> got(x.rows(), d.hidden), want(x.rows(), d.hidden);
          runner_of(1, level, dequantized)->forward(q.view(), plan, x, got);
          if (level == grove::simd::isa::avx512_bf16)
            runner_of(1, level)->forward(bf16.view(), plan, x, want);
          else
            runner_of(1, level)->forward(f32.view(), plan, x, want);
          CHECK(same_bits(got, want));
          // Every thread count gives the same bits, and so do the group partials, combined.
          for (const int threads : {2, 3}) {
            CAPTURE(threads);
            row_matrix<float> again(x.rows(), d.hidden);
            runner_of(threads, level, dequantized)->forward(q.view(), plan, x, again);
            CHECK(same_bits(again, got));
          }
          if (mode != grove::adjugate_mode::once_per_pick) {
            row_matrix<float> partials(plan.group_row_count(), d.hidden);
            row_matrix<float> combined = row_matrix<float>::Zero(x.rows(), d.hidden);
            runner_of(2, level, dequantized)->forward_partials(q.view(), plan, x, partials);
            grove::combine_partials(plan, partials, combined);
            CHECK(same_bits(combined, got));
          }
        }
      }
    };
    check.template operator()<q8_block>();
    check.template operator()<q4_block>();
    }
  }

  TEST_CASE("automatic kernels: each expert and adjugate by its own rows, in any batch or shard") {
    const auto level = grove::simd::best_isa();
    const auto integer = grove::quantized_kernels::integer_dots, dequantized = grove::quantized_kernels::dequantized,
               automatic = grove::quantized_kernels::automatic;
    // The format's threshold is "never" (the integer dots were faster at every measured shape):
    // a runner's own threshold mixes the paths.
    CHECK(grove::detail::cpu_format<q8_block>::dequantize_from(automatic) ==
          grove::detail::cpu_format<q8_block>::dequantize_from(integer));
    const Index from = 6;
    const auto rows_of = [](const grove::routing_plan<float>& plan, Index e) {
      return static_cast<Index>(plan.rows_of_expert(e).size());
    };

    SUBCASE("one expert per group: each group's partials are its own path's, bit for bit") {
      // G = E, so a group's expert and adjugate have the same rows and take the same path.
      const grove::layer_dims d{64, 12, 12, 32, 16};
      const auto source = grove::layer_parameters<float>::random(d, 23, 0.1);
      const grove::layer<grove::dynamic_config<q8_block>> layer(grove::dynamic_config<q8_block>(d, 3, 0.2),
                                                                grove::layer_parameters<q8_block>::from(source.view()),
                                                                runner_of(1));
      const auto x = grove_test::random_matrix<float>(24, d.hidden, 24, 1.0);  // about 6 rows per expert
      grove::routing_plan<float> plan;
      layer.route_into(plan, x);
      Index wide = 0, narrow = 0;
      for (Index e = 0; e < d.experts; ++e) (rows_of(plan, e) >= from ? wide : narrow) += rows_of(plan, e) > 0;
      REQUIRE(wide > 0);  // the batch mixes both paths
      REQUIRE(narrow > 0);
      const auto partials_of = [&](grove::quantized_kernels kernels) {
        row_matrix<float> p(plan.group_row_count(), d.hidden);
        runner_of(2, level, kernels, from)->forward_partials(layer.weights(), plan, x, p);
        return p;
      };
      const auto mixed = partials_of(automatic), by_integer = partials_of(integer), by_tiles = partials_of(dequantized);
      for (Index g = 0; g < d.groups; ++g) {
        CAPTURE(g);
        const auto begin = plan.adjugate_offsets[static_cast<std::size_t>(g)];
        const auto n = plan.adjugate_offsets[static_cast<std::size_t>(g) + 1] - begin;
        if (n == 0) continue;
        const auto& want = rows_of(plan, g) >= from ? by_tiles : by_integer;
        CHECK(same_bits(row_matrix<float>(mixed.middleRows(begin, n)), row_matrix<float>(want.middleRows(begin, n))));
      }
    }

    SUBCASE("shards of groups combine to the whole layer's bits (as expert parallelism does)") {
      const grove::layer_dims d{64, 12, 4, 32, 32};
      const auto source = grove::layer_parameters<float>::random(d, 25, 0.1);
      const grove::layer<grove::dynamic_config<q4_block>> layer(grove::dynamic_config<q4_block>(d, 3, 0.2),
                                                                grove::layer_parameters<q4_block>::from(source.view()),
                                                                runner_of(1, level, automatic, from));
      const auto x = grove_test::random_matrix<float>(31, d.hidden, 26, 1.0);
      grove::routing_plan<float> plan;
      layer.route_into(plan, x);
      Index wide = 0, narrow = 0;
      for (Index e = 0; e < d.experts; ++e) (rows_of(plan, e) >= from ? wide : narrow) += rows_of(plan, e) > 0;
      REQUIRE(wide > 0);
      REQUIRE(narrow > 0);
      const auto whole = layer.forward(x);
      CHECK(!same_bits(whole, layer.on(runner_of(1, level, integer)).forward(x)));
      CHECK(!same_bits(whole, layer.on(runner_of(1, level, dequantized)).forward(x)));
      for (const auto& shards : {std::vector<std::vector<Index>>{{0}, {1, 2, 3}}, {{0, 1}, {2, 3}}, {{0, 1, 2}, {3}}})
        CHECK(same_bits(y_from_shards(layer, plan, x, shards), whole));
    }

    SUBCASE("a batch of few rows per item runs the integer dots; one of many, the dequantized tiles") {
      const grove::layer_dims d{64, 12, 4, 32, 32};
      const auto source = grove::layer_parameters<float>::random(d, 27, 0.1);
      const grove::layer<grove::dynamic_config<q8_block>> layer(grove::dynamic_config<q8_block>(d, 3, 0.2),
                                                                grove::layer_parameters<q8_block>::from(source.view()),
                                                                runner_of(1));
      const auto run = [&](const row_matrix<float>& x, grove::quantized_kernels kernels) {
        return layer.on(runner_of(1, level, kernels, from)).forward(x);
      };
      const auto few = grove_test::random_matrix<float>(2, d.hidden, 28, 1.0);
      const auto many = grove_test::random_matrix<float>(200, d.hidden, 29, 1.0);
      grove::routing_plan<float> plan;
      layer.route_into(plan, many);
      for (Index e = 0; e < d.experts; ++e) REQUIRE(rows_of(plan, e) >= from);
      const auto many_tiles = run(many, dequantized), few_integer = run(few, integer);
      // The two paths differ (so the comparisons can tell them apart) and stay close.
      const auto many_integer = run(many, integer);
      CHECK(!same_bits(many_tiles, many_integer));
      CHECK((many_tiles - many_integer).norm() < 0.02 * many_integer.norm());
      CHECK(!same_bits(few_integer, run(few, dequantized)));
      CHECK(same_bits(run(many, automatic), many_tiles));
      CHECK(same_bits(run(few, automatic), few_integer));
      // With the format's own threshold, automatic runs the integer dots for every item.
      CHECK(same_bits(layer.on(runner_of(1, level, automatic)).forward(many), many_integer));
      // The default is automatic, and a runner's setting can change between calls.
      CHECK(grove::cpu_runner().quantized() == automatic);
      auto runner = runner_of(1, level, integer);
      runner->set_quantized(dequantized);
      CHECK(same_bits(layer.on(runner).forward(many), many_tiles));
    }
  }

  TEST_CASE("a q8 layer against a reference of the same arithmetic in double") {
    // The reference: dequantized weights, activations quantized as documented, each dot in double.
    const grove::layer_dims d{64, 8, 4, 32, 32};
    const auto source = grove::layer_parameters<float>::random(d, 9, 0.2);
    const auto q8 = grove::layer_parameters<q8_block>::from(source.view());
    const auto x = grove_test::random_matrix<float>(5, d.hidden, 10, 1.0);
    const grove::layer<grove::dynamic_config<q8_block>> layer(grove::dynamic_config<q8_block>(d, 2, 0.25),
                                                              grove::layer_parameters<q8_block>(q8), runner_of(1));
    const auto got = layer.forward(x, {.routing = true});
    const auto deq = [&](const q8_block* p, Index rows, Index cols) {
      std::vector<float> m(static_cast<std::size_t>(rows * cols));
      const auto row_blocks = rows_of(p, rows, grove::blocks_per_row(cols));
      for (Index r = 0; r < rows; ++r)
        grove::dequantize_row(row_blocks.data() + r * grove::blocks_per_row(cols), cols, m.data() + r * cols);
      return m;
    };
    const auto quantized = [](const float* v, Index n) {
      std::vector<std::int8_t> q(static_cast<std::size_t>(grove::blocks_per_row(n) * 32));
      std::vector<float> s(static_cast<std::size_t>(grove::blocks_per_row(n)));
      grove::quantize_activations(v, n, q.data(), s.data());
      std::vector<double> out(static_cast<std::size_t>(n));
      for (Index i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = double(s[static_cast<std::size_t>(i / 32)]) * q[static_cast<std::size_t>(i)];
      return out;
    };
    const auto mlp = [&](const grove::mlp_tensors<const q8_block>& t, const std::vector<double>& xq) {
      const Index I = t.inter, H = d.hidden;
      const auto g = deq(t.gate, I, H), u = deq(t.up, I, H), down = deq(t.down, H, I);
      std::vector<float> h(static_cast<std::size_t>(I));
      for (Index i = 0; i < I; ++i) {
        double gi = 0, ui = 0;
        for (Index k = 0; k < H; ++k) {
          gi += double(g[static_cast<std::size_t>(i * H + k)]) * xq[static_cast<std::size_t>(k)];
          ui += double(u[static_cast<std::size_t>(i * H + k)]) * xq[static_cast<std::size_t>(k)];
        }
        h[static_cast<std::size_t>(i)] = static_cast<float>(gi / (1 + std::exp(-gi)) * ui);
      }
      const auto hq = quantized(h.data(), I);
      std::vector<double> y(static_cast<std::size_t>(H));
      for (Index c = 0; c < H; ++c)
        for (Index i = 0; i < I; ++i) y[static_cast<std::size_t>(c)] += double(down[static_cast<std::size_t>(c * I + i)]) * hq[static_cast<std::size_t>(i)];
      return y;
    };
    const auto& plan = *got.routing;
    double worst = 0, scale = 0;
    for (Index t = 0; t < x.rows(); ++t) {
      const auto xq = quantized(x.data() + t * d.hidden, d.hidden);
      std::vector<double> y(static_cast<std::size_t>(d.hidden));
      std::vector<double> c(static_cast<std::size_t>(d.groups));
      for (Index s = 0; s < plan.top_k; ++s) {
        const Index e = plan.topk_ids(t, s);
        const double w = plan.topk_weights(t, s);
        c[static_cast<std::size_t>(e / d.group_size())] += w;
        const auto ye = mlp(q8.view().expert_tensors(e), xq);
        for (Index k = 0; k < d.hidden; ++k) y[static_cast<std::size_t>(k)] += w * ye[static_cast<std::size_t>(k)];
      }
      for (Index j = 0; j < d.groups; ++j) {
        if (c[static_cast<std::size_t>(j)] == 0) continue;
        const auto ya = mlp(q8.view().adjugate_tensors(j), xq);
        for (Index k = 0; k < d.hidden; ++k) y[static_cast<std::size_t>(k)] += 0.25 * c[static_cast<std::size_t>(j)] * ya[static_cast<std::size_t>(k)];
      }
      for (Index k = 0; k < d.hidden; ++k) {
        worst = std::max(worst, std::fabs(double(got.y(t, k)) - y[static_cast<std::size_t>(k)]));
        scale = std::max(scale, std::fabs(y[static_cast<std::size_t>(k)]));
      }
    }
    // Float sums against double ones, and h's quantization (h itself differs in the last bits,
    // which can move a value of h to the next int8 step): well under one step of 1/127.
    CHECK(scale > 0);
    CHECK(worst <= 2e-3 * scale);
  }

  TEST_CASE("a checkpoint quantized at load holds from()'s blocks and the fp32 router, exactly") {
    grove_test::temp_dir dir;
    const grove::layer_dims d{50, 6, 3, 24, 8};
    const auto source = grove::layer_parameters<float>::random(d, 12, 0.1);
    grove::io::save_layer(dir / "w.safetensors", source.view(), "m");
    for (const bool shard : {false, true}) {
      CAPTURE(shard);
      const std::vector<Index> groups = shard ? std::vector<Index>{1} : std::vector<Index>{};
      auto loaded = grove::io::load_layer<q8_block>(dir / "w.safetensors", "m", groups);
      const auto wanted = grove::layer_parameters<q8_block>::from(shard ? source.view().only_groups(groups) : source.view());
      REQUIRE(loaded.values().size() == wanted.values().size());
      CHECK(std::memcmp(loaded.values().data(), wanted.values().data(), loaded.values().size() * sizeof(q8_block)) == 0);
      const auto router = loaded.routing_view().router();
      CHECK(same_bits(router, source.view().router()));
    }
    const auto q4 = grove::io::load_layer<q4_block>(dir / "w.safetensors", "m");
    const auto q4_wanted = grove::layer_parameters<q4_block>::from(source.view());
    CHECK(std::memcmp(q4.values().data(), q4_wanted.values().data(), q4.values().size() * sizeof(q4_block)) == 0);
    CHECK(q4.bytes() == grove::layer_parameters<q4_block>::bytes_for(d));
  }
}

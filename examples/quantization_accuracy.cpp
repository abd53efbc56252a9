// How far the block formats move a Grove layer's output (docs/quantization.md, "Accuracy"): the
// relative error ‖y_format − y_f32‖ / ‖y_f32‖ of bf16, q8 and q4 weights against the same layer in
// fp32. q8 and q4 keep the router in fp32 (the picks are checked equal); bf16 rounds it too.
//
//   grove_quantization_accuracy [TRAINED_DIR]
//
// Two more columns measure the weights' rounding alone (the layer in fp32 on dequantized weights,
// activations not quantized): q4 as grove stores it (ggml's Q4_0: a scale per block), and a 4-bit
// variant with a scale and a minimum per block (ggml's Q4_1), to see what a minimum would buy.
//
// Always: GroveMoE-Inst's shape (H = 2048, E = 128, G = 64, k = 8, I = 768, Ia = 128) with
// random weights N(0, 0.02²) on 64 random tokens. With TRAINED_DIR (written by
// `grove_experiment --save-layers DIR`): the experiment's trained layers on their own held-out
// inputs.
#include <grove/grove.hpp>
#include <grove/io.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace {

using grove::index;
using matrix = grove::row_matrix<float>;

/// y of `source` held in Format, with the routing of the fp32 layer (checked identical).
template <class Format>
matrix forward_in(const grove::layer_parameters<float>& source, index k, double lambda, const matrix& x,
                  const grove::routing_plan<float>& fp32_plan) {
  const grove::layer<grove::dynamic_config<Format>> layer(grove::dynamic_config<Format>(source.dims(), k, lambda),
                                                          grove::layer_parameters<Format>::from(source.view()));
  grove::routing_plan<float> plan;
  layer.route_into(plan, x);
  // The block formats route with the source's fp32 router: the same picks. (BF16 rounds the
  // router too, so its picks may differ: its column includes that.)
  if (grove::is_block_format<Format> && plan.topk_ids != fp32_plan.topk_ids)
    std::printf("  (!) the picks of %s differ from fp32's\n", grove::info_of<Format>().name.data());
  matrix y(x.rows(), x.cols());
  layer.forward(plan, x, y);
  return y;
}

/// The weights (experts and adjugates) rounded through `round_row`, router and bias kept: an fp32
/// layer that differs from `source` by the weights' rounding alone.
template <class RoundRow>
grove::layer_parameters<float> rounded(const grove::layer_parameters<float>& source, RoundRow round_row) {
  grove::layer_parameters<float> out(source);
  out.span().for_each_tensor([&](const grove::tensor_info& info, float* const& p) {
    if (p == nullptr || info.role == grove::tensor_role::router || info.role == grove::tensor_role::selection_bias) return;
    for (index r = 0; r < info.rows; ++r) round_row(p + r * info.cols, info.cols);
  });
  return out;
}
/// q4 as stored (Q4_0), dequantized.
void q4_0_row(float* x, index n) {
  std::vector<grove::q4_block> blocks(static_cast<std::size_t>(grove::blocks_per_row(n)));
  grove::quantize_row(x, n, blocks.data());
  grove::dequantize_row(blocks.data(), n, x);
}
/// A 4-bit block with a minimum (ggml's Q4_1): d = (max − min) / 15 and m = min (both fp16),
/// n = round((x − m) / d), value d · n + m.
void q4_1_row(float* x, index n) {
  for (index b = 0; b < n; b += 32) {
    const index end = std::min(n, b + 32);
    float lo = x[b], hi = x[b];
    for (index i = b; i < end; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
    const float d = grove::f16_bits_to_float(grove::f16_bits_of((hi - lo) / 15.0f));
    const float m = grove::f16_bits_to_float(grove::f16_bits_of(lo));
    for (index i = b; i < end; ++i) {
      const float q = d != 0.0f ? std::min(15.0f, std::max(0.0f, std::round((x[i] - m) / d))) : 0.0f;
      x[i] = d * q + m;
    }
  }
}

void report(const char* what, const grove::layer_parameters<float>& source, index k, double lambda, const matrix& x) {
  const grove::layer<grove::dynamic_config<float>> fp32(grove::dynamic_config<float>(source.dims(), k, lambda),
                                                        grove::layer_parameters<float>(source));
  grove::routing_plan<float> plan;
  fp32.route_into(plan, x);
  matrix want(x.rows(), x.cols());
  fp32.forward(plan, x, want);
  const auto relative = [&](const matrix& y) { return (y - want).norm() / want.norm(); };
  const auto weights_only = [&](const grove::layer_parameters<float>& weights) {
    return relative(forward_in<float>(weights, k, lambda, x, plan));
  };
  std::printf("| %s | %.2e | %.2e | %.2e | %.2e | %.2e |\n", what,
              relative(forward_in<grove::bf16>(source, k, lambda, x, plan)),
              relative(forward_in<grove::q8_block>(source, k, lambda, x, plan)),
              relative(forward_in<grove::q4_block>(source, k, lambda, x, plan)), weights_only(rounded(source, q4_0_row)),
              weights_only(rounded(source, q4_1_row)));
}

}  // namespace

int main(int argc, char** argv) {
  std::printf("| weights | bf16 | q8 | q4 | q4 weights alone (Q4_0) | with a minimum (Q4_1) |\n"
              "|---|---:|---:|---:|---:|---:|\n");
  {
    const auto source = grove::layer_parameters<float>::random(grove::grove_moe_inst_dims, 1, 0.02);
    grove::detail::normal_generator g(2);
    matrix x(64, grove::grove_moe_inst_dims.hidden);
    for (grove::index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(g.normal());
    report("random, GroveMoE-Inst's shape, 64 tokens", source, 8, 0.05, x);
  }
  if (argc > 1) {
    const std::filesystem::path dir = argv[1];
    for (int l = 0; std::filesystem::exists(dir / ("layer-" + std::to_string(l) + ".safetensors")); ++l) {
      const auto source = grove::io::load_layer<float>(dir / ("layer-" + std::to_string(l) + ".safetensors"), "block");
      const grove::io::safetensors_reader inputs(dir / ("inputs-" + std::to_string(l) + ".safetensors"));
      const auto x_values = inputs.read<float>("x");
      const matrix x = Eigen::Map<const matrix>(x_values.values.data(), x_values.shape[0], x_values.shape[1]);
      // The experiment's settings (examples/experiment/task.hpp): k = 4, λ = 0.2.
      const std::string what = "trained, the experiment's layer " + std::to_string(l) + ", " +
                               std::to_string(x.rows()) + " held-out inputs";
      report(what.c_str(), source, 4, 0.2, x);
    }
  }
  return 0;
}

#include <grove/grove.hpp>

#include <iostream>

int main() {
  // H = 64, E = 16 experts in G = 8 groups, I = 32, Ia = 16; top-2 routing, adjugate scale λ = 0.05.
  const grove::layer_dims dims{64, 16, 8, 32, 16};
  grove::layer layer(grove::dynamic_config<>(dims, 2, 0.05),
                     grove::layer_parameters<float>::random(dims, /*seed=*/7, /*stddev=*/0.05));

  const grove::row_matrix<float> x = grove::row_matrix<float>::Random(4, dims.hidden);  // 4 tokens
  const auto result = layer.forward(x, {.routing = true});
  std::cout << "token 0 -> experts " << result.routing->topk_ids.row(0)
            << " with weights " << result.routing->topk_weights.row(0) << '\n'
            << "y[0, 0:4] = " << result.y.row(0).head(4) << '\n';
}

// libFuzzer harness: any bytes as model.safetensors.index.json in a directory that also holds
// two valid shards (a small Grove layer under "m", split in two). Opening the checkpoint, looking
// up every tensor the index names and loading the layer each succeed or throw grove::error.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <grove/io.hpp>

#include "fuzz_support.hpp"

namespace {

/// Writes the shards once: the router and expert 0 in model-1.safetensors, the rest in
/// model-2.safetensors (H = 4, E = 4, G = 2, I = 3, Ia = 2; the names the seed index uses).
void write_shards() {
  static const bool written = [] {
    const grove::layer_dims dims{4, 4, 2, 3, 2};
    const auto layer = grove::layer_parameters<float>::random(dims, 1, 0.1);
    grove::io::safetensors_writer first, second;
    layer.view().for_each_tensor([&](const grove::tensor_info& info, const float* const& values) {
      const std::string name = grove::io::tensor_name("m", info.name);
      const bool early = info.name == "gate.weight" || info.name.rfind("experts.0.", 0) == 0;
      const grove::io::tensor_shape shape = info.role == grove::tensor_role::selection_bias
                                                ? grove::io::tensor_shape{info.rows}
                                                : grove::io::tensor_shape{info.rows, info.cols};
      const std::vector<float> zeros(static_cast<std::size_t>(info.size()), 0.0f);
      (early ? first : second)
          .add(name, shape, std::span<const float>(values ? values : zeros.data(), static_cast<std::size_t>(info.size())));
    });
    first.write(grove_fuzz::scratch() / "model-1.safetensors");
    second.write(grove_fuzz::scratch() / "model-2.safetensors");
    return true;
  }();
  (void)written;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  write_shards();
  grove_fuzz::write_input("model.safetensors.index.json", data, size);
  try {
    const grove::io::checkpoint ckpt(grove_fuzz::scratch());
    std::size_t looked_up = 0;
    for (const std::string& name : ckpt.names()) {
      if (++looked_up > 64) break;
      try {
        (void)ckpt.entry(name);
        (void)ckpt.file_of(name);
      } catch (const grove::error&) {
        // a name the shard lacks
      }
    }
    (void)grove::io::load_layer<float>(ckpt, "m");
  } catch (const grove::error&) {
    // a clean refusal
  }
  return 0;
}

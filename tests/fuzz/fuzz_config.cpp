// libFuzzer harness: any bytes as a Hugging Face config.json. Reading it and cross-checking it
// against a layer's sizes each succeed or throw grove::error.
#include <cstddef>
#include <cstdint>

#include <grove/io.hpp>

#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto path = grove_fuzz::write_input("config.json", data, size);
  try {
    const grove::io::hf_config config = grove::io::read_hf_config(path);
    if (config.top_k && *config.top_k <= 0) std::abort();
    if (config.scale && !(*config.scale >= 0.0)) std::abort();
    grove::io::check_hf_config(config, grove::layer_dims{2048, 128, 64, 768, 128});
  } catch (const grove::error&) {
    // a clean refusal
  }
  return 0;
}

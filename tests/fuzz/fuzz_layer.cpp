// libFuzzer harness: any bytes as a checkpoint holding a layer under the prefix "m". Loads it
// as a Grove layer in fp32 and BF16 and upcycles it as a plain MoE layer; each either succeeds
// or throws grove::error. Allocation must stay bounded by the file (validated before
// allocating), so libFuzzer's memory limit catches a loader that trusts a header.
#include <cstddef>
#include <cstdint>

#include <grove/io.hpp>

#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto path = grove_fuzz::write_input("layer.safetensors", data, size);
  auto attempt = [](auto&& action) {
    try {
      action();
    } catch (const grove::error&) {
      // a clean refusal
    }
  };
  attempt([&] {
    const grove::io::checkpoint ckpt(path);
    attempt([&] {
      const auto layer = grove::io::load_layer<float>(ckpt, "m");
      if (layer.dims().experts % layer.dims().groups != 0) std::abort();
    });
    attempt([&] { (void)grove::io::load_layer<grove::bf16>(ckpt, "m"); });
    attempt([&] {
      grove::upcycle_options options;
      options.groups = size > 0 ? 1 + data[size - 1] % 4 : 1;
      options.adjugate_intermediate = 2;
      (void)grove::io::upcycle_layer<float>(ckpt, "m", options);
    });
  });
  return 0;
}

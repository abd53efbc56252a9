// libFuzzer harness: any bytes as a .safetensors file. Opening either succeeds, and then every
// tensor reads back within its declared bytes, or throws grove::error; any other exception,
// crash, sanitizer report, leak or hang is a finding.
#include <cstddef>
#include <cstdint>

#include <grove/io.hpp>

#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto path = grove_fuzz::write_input("input.safetensors", data, size);
  try {
    const grove::io::safetensors_reader reader(path);
    std::uint64_t previous_end = 0;
    for (const grove::io::tensor_entry& e : reader.tensors()) {
      // Invariants the reader promises: offsets ordered inside the data, non-empty tensors apart.
      if (e.begin > e.end || reader.header_bytes() + 8 + e.end > size) std::abort();
      if (e.begin != e.end && e.begin < previous_end) std::abort();
      if (e.begin != e.end) previous_end = e.end;
      if (reader.find(e.name) == nullptr) std::abort();
      if (grove::io::is_floating(e.type)) (void)reader.read<double>(e.name);
      else if (e.type == grove::io::dtype::i64) (void)reader.read<std::int64_t>(e.name);
      else (void)reader.read_bytes(e);
    }
  } catch (const grove::error&) {
    // a clean refusal
  }
  return 0;
}

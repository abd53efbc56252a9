// Checkpoint I/O: dtype conversions, safetensors reading and writing, sharded checkpoints,
// layer loading and saving, config.json, and every error path with files crafted byte by byte.
#include <doctest/doctest.h>

#include "support/test_support.hpp"

#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include <grove/io.hpp>

namespace {

namespace fs = std::filesystem;
namespace io = grove::io;
using doctest::Contains;
using grove_test::temp_dir;


// ---- byte-level file crafting, independent of the library's writer ----

std::string le_bytes(std::uint64_t v, int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += static_cast<char>((v >> (8 * i)) & 0xFF);
  return s;
}

std::string f32_bytes(const std::vector<float>& values) {
  std::string s;
  for (float v : values) {
    std::uint32_t bits;
    std::memcpy(&bits, &v, 4);
    s += le_bytes(bits, 4);
  }
  return s;
}

std::string u16_bytes(const std::vector<std::uint16_t>& values) {
  std::string s;
  for (auto v : values) s += le_bytes(v, 2);
  return s;
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// 8-byte little-endian length, header text, data.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  return le_bytes(header.size(), 8) + header + data;
}

struct raw_tensor {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::string bytes;
};

/// A well-formed file of `tensors`, the header spelled by hand.
std::string safetensors_bytes(const std::vector<raw_tensor>& tensors) {
  std::string header = "{";
  std::string data;
  for (const raw_tensor& t : tensors) {
    if (header.size() > 1) header += ",";
    header += "\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":[";
    for (std::size_t i = 0; i < t.shape.size(); ++i) {
      if (i) header += ",";
      header += std::to_string(t.shape[i]);
    }
    header += "],\"data_offsets\":[" + std::to_string(data.size()) + "," + std::to_string(data.size() + t.bytes.size()) +
              "]}";
    data += t.bytes;
  }
  header += "}";
  return safetensors_bytes(header, data);
}

// ---- a small Grove layer spelled out tensor by tensor ----

constexpr grove::layer_dims small{4, 4, 2, 3, 2};  // H, E, G, I, Ia

/// Value of element i of the tensor numbered `id`: distinct, exactly representable in BF16.
float pattern(int id, std::size_t i) {
  return static_cast<float>((static_cast<int>(i) * 7 + id * 13) % 29 - 14) / 16.0f;
}

/// The tensors of a layer of `small` dims under `prefix`, F32, in the usual names.
std::vector<raw_tensor> layer_tensors(const std::string& prefix, bool with_bias = true) {
  std::vector<raw_tensor> out;
  int id = 0;
  auto matrix = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
    std::vector<float> v(static_cast<std::size_t>(rows * cols));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = pattern(id, i);
    ++id;
    out.push_back({prefix + "." + name, "F32", {rows, cols}, f32_bytes(v)});
  };
  matrix("gate.weight", 4, 4);
  for (int e = 0; e < 4; ++e) {
    matrix("experts." + std::to_string(e) + ".gate_proj.weight", 3, 4);
    matrix("experts." + std::to_string(e) + ".up_proj.weight", 3, 4);
    matrix("experts." + std::to_string(e) + ".down_proj.weight", 4, 3);
  }
  for (int j = 0; j < 2; ++j) {
    matrix("chunk_experts." + std::to_string(j) + ".gate_proj.weight", 2, 4);
    matrix("chunk_experts." + std::to_string(j) + ".up_proj.weight", 2, 4);
    matrix("chunk_experts." + std::to_string(j) + ".down_proj.weight", 4, 2);
  }
  if (with_bias) out.push_back({prefix + ".expert_bias", "F32", {4}, f32_bytes({0.5f, -0.25f, 0.0f, 1.0f})});
  return out;
}

std::vector<raw_tensor> without(std::vector<raw_tensor> tensors, const std::string& fragment) {
  std::erase_if(tensors, [&](const raw_tensor& t) { return t.name.find(fragment) != std::string::npos; });
  return tensors;
}

raw_tensor& named(std::vector<raw_tensor>& tensors, const std::string& name) {
  for (raw_tensor& t : tensors)
    if (t.name == name) return t;
  FAIL("no tensor " << name);
  return tensors.front();
}

/// Expected values of the layer written by layer_tensors, read through the file.
std::vector<float> expected_values(const std::vector<raw_tensor>& tensors, const std::string& name) {
  for (const raw_tensor& t : tensors)
    if (t.name == name) {
      std::vector<float> v(t.bytes.size() / 4);
      std::memcpy(v.data(), t.bytes.data(), t.bytes.size());
      return v;
    }
  return {};
}

}  // namespace

// ================================ dtype conversions ================================

TEST_CASE("io: BF16 rounds to nearest even, hand-computed cases") {
  // 1 + 2^-8 lies exactly halfway between BF16 1.0 (0x3F80) and 1 + 2^-7 (0x3F81): ties to even.
  CHECK(io::float_to_bf16(1.00390625f) == 0x3F80);
  // 1 + 3·2^-8 lies halfway between 0x3F81 and 0x3F82: ties to even goes up.
  CHECK(io::float_to_bf16(1.01171875f) == 0x3F82);
  // Just above the halfway point rounds up, just below rounds down.
  CHECK(io::float_to_bf16(std::bit_cast<float>(0x3F808001u)) == 0x3F81);
  CHECK(io::float_to_bf16(std::bit_cast<float>(0x3F807FFFu)) == 0x3F80);
  CHECK(io::float_to_bf16(-1.01171875f) == 0xBF82);
  CHECK(io::float_to_bf16(3.0f) == 0x4040);
  // The largest float rounds past the largest BF16 (0x7F7F) to +inf; inf and NaN survive.
  CHECK(io::float_to_bf16(std::numeric_limits<float>::max()) == 0x7F80);
  CHECK(io::float_to_bf16(-std::numeric_limits<float>::infinity()) == 0xFF80);
  CHECK(std::isnan(io::bf16_to_float(io::float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload sits only in the low 16 bits must not turn into inf.
  CHECK(std::isnan(io::bf16_to_float(io::float_to_bf16(std::bit_cast<float>(0x7F800001u)))));
  CHECK(io::bf16_to_float(0x3F81) == 1.0078125f);
  // From double, one rounding: 1 + 2^-8 + 2^-30 is above the halfway point, so it rounds up,
  // although rounding to float first would land exactly on the halfway point and go to even.
  CHECK(io::double_to_bf16(1.0 + 0x1p-8 + 0x1p-30) == 0x3F81);
  CHECK(io::double_to_bf16(1.0 + 0x1p-8) == 0x3F80);
}

TEST_CASE("io: F16 conversions, subnormals, inf and NaN") {
  CHECK(io::float_to_f16(1.0f) == 0x3C00);
  CHECK(io::float_to_f16(-2.0f) == 0xC000);
  CHECK(io::float_to_f16(65504.0f) == 0x7BFF);   // largest finite
  CHECK(io::float_to_f16(65519.0f) == 0x7BFF);   // below the halfway point to 65536
  CHECK(io::float_to_f16(65520.0f) == 0x7C00);   // halfway rounds to even: inf
  CHECK(io::float_to_f16(1e6f) == 0x7C00);
  CHECK(io::float_to_f16(0x1p-14f) == 0x0400);   // smallest normal
  CHECK(io::float_to_f16(0x1p-24f) == 0x0001);   // smallest subnormal
  CHECK(io::float_to_f16(1023 * 0x1p-24f) == 0x03FF);
  CHECK(io::float_to_f16(0x1p-25f) == 0x0000);         // halfway to 2^-24: even is 0
  CHECK(io::float_to_f16(1.5f * 0x1p-25f) == 0x0001);  // above halfway
  CHECK(io::float_to_f16(3 * 0x1p-25f) == 0x0002);     // 1.5 units: halfway between 1 and 2, even is 2
  CHECK(io::float_to_f16(5 * 0x1p-25f) == 0x0002);     // 2.5 units: even is 2
  CHECK(io::float_to_f16(-0.0f) == 0x8000);
  CHECK(io::float_to_f16(1e-30f) == 0x0000);
  CHECK(io::float_to_f16(std::numeric_limits<float>::denorm_min()) == 0x0000);
  CHECK(io::float_to_f16(1.0f + 0x1p-11f) == 0x3C00);          // halfway, even
  CHECK(io::float_to_f16(1.0f + 3 * 0x1p-11f) == 0x3C02);      // halfway, even goes up
  CHECK(io::float_to_f16(std::numeric_limits<float>::infinity()) == 0x7C00);
  const std::uint16_t nan = io::float_to_f16(-std::numeric_limits<float>::quiet_NaN());
  CHECK((nan & 0x7C00) == 0x7C00);
  CHECK((nan & 0x03FF) != 0);
  CHECK((nan & 0x8000) == 0x8000);
  CHECK(io::double_to_f16(1.0 + 0x1p-11 + 0x1p-40) == 0x3C01);  // one rounding from double

  // Every binary16 value decodes to sign · 2^(e-15) · (1 + f/1024) (or the subnormal form) and
  // encodes back to itself.
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float f = io::f16_to_float(bits);
    const int exponent = (h >> 10) & 0x1F;
    const int fraction = h & 0x3FF;
    const double sign = (h & 0x8000) ? -1.0 : 1.0;
    if (exponent == 31) {
      if (fraction == 0) {
        CHECK(f == static_cast<float>(sign * std::numeric_limits<double>::infinity()));
      } else {
        CHECK(std::isnan(f));
      }
      continue;
    }
    const double expected = exponent == 0 ? sign * fraction * 0x1p-24
                                          : sign * std::ldexp(1.0 + fraction / 1024.0, exponent - 15);
    if (static_cast<double>(f) != expected) FAIL("f16 " << h << " decoded to " << f);
    if (io::float_to_f16(f) != bits) FAIL("f16 " << h << " did not round trip");
    if (io::double_to_f16(expected) != bits) FAIL("f16 " << h << " did not round trip from double");
  }
  // Every bfloat16 value round trips as well.
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float f = io::bf16_to_float(bits);
    if (std::isnan(f)) continue;
    if (io::float_to_bf16(f) != bits) FAIL("bf16 " << b << " did not round trip");
  }
}

TEST_CASE("io: dtype names and sizes") {
  CHECK(io::dtype_from_name("BF16") == io::dtype::bf16);
  CHECK(io::dtype_from_name("F8_E4M3") == io::dtype::f8_e4m3);
  CHECK(io::dtype_from_name("bf16") == io::dtype::unknown);
  CHECK(io::dtype_name(io::dtype::f16) == "F16");
  CHECK(io::dtype_size(io::dtype::f64) == 8);
  CHECK(io::dtype_size(io::dtype::i32) == 4);
  CHECK(io::dtype_size(io::dtype::unknown) == 0);
  std::byte out[4];
  const float one = 1.0f;
  CHECK_THROWS_WITH_AS(io::encode(io::dtype::i8, &one, 1, out), Contains("unsupported dtype I8"), grove::error);
}

// ================================ safetensors files ================================

TEST_CASE("io: the writer produces the exact bytes of the format") {
  temp_dir dir;
  io::safetensors_writer w;
  w.add("a", {2}, std::vector<float>{1.0f, -2.0f});
  w.add("b", {1, 2}, std::vector<float>{1.00390625f, 3.0f}, io::dtype::bf16);
  w.write(dir / "t.safetensors");

  std::string header =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  REQUIRE(header.size() % 8 == 0);
  const std::string expected = safetensors_bytes(header, f32_bytes({1.0f, -2.0f}) + u16_bytes({0x3F80, 0x4040}));
  CHECK(read_file(dir / "t.safetensors") == expected);
  CHECK(!fs::exists(dir / "t.safetensors.grove-partial"));
}

TEST_CASE("io: round trips of F32, BF16, F16 and metadata") {
  temp_dir dir;
  const std::vector<float> exact{0.0f, -0.0f, 1.0f, -1.5f, 0.09375f, 61440.0f, 0x1p-24f, -3.25f};
  const std::vector<float> fine{1.2345678f, -7.654321e-3f, 3.4e38f, 1e-42f};
  const std::vector<double> precise{1.0 / 3.0, -2.5e-300, 1e300};
  const std::vector<std::int32_t> ids{0, -1, 2147483647, -2147483647 - 1};
  io::safetensors_writer w;
  w.set_metadata("format", "pt");
  w.set_metadata("note", "grove \"test\"");
  w.add("f32", {2, 2, 2}, exact, io::dtype::f32);
  w.add("bf16", {8}, exact, io::dtype::bf16);
  w.add("f16", {4, 2}, exact, io::dtype::f16);
  w.add("fine", {4}, fine, io::dtype::f32);
  w.add("f64", {3}, precise, io::dtype::f64);
  w.add("ids", {2, 2}, ids);
  w.add("empty", {0, 5}, std::vector<float>{});
  w.add("bf16_rounding", {2}, std::vector<float>{1.00390625f, 1.01171875f}, io::dtype::bf16);
  w.write(dir / "r.safetensors");

  const io::safetensors_reader r(dir / "r.safetensors");
  CHECK(r.metadata().at("format") == "pt");
  CHECK(r.metadata().at("note") == "grove \"test\"");
  CHECK((8 + r.header_bytes()) % 8 == 0);
  CHECK(r.tensors().size() == 8);
  for (const char* name : {"f32", "bf16", "f16"}) {
    const auto t = r.read<float>(name);
    CHECK(t.values == exact);
    CHECK(r.read<double>(name).values == std::vector<double>(exact.begin(), exact.end()));
  }
  CHECK(r.at("f32").shape == io::tensor_shape{2, 2, 2});
  CHECK(r.at("bf16").type == io::dtype::bf16);
  CHECK(r.at("bf16").bytes() == 16);
  CHECK(r.read<float>("fine").values == fine);
  CHECK(r.read<double>("f64").values == precise);
  CHECK(r.read<std::int32_t>("ids").values == ids);
  CHECK(r.read<std::int64_t>("ids").values == std::vector<std::int64_t>(ids.begin(), ids.end()));
  CHECK(r.read<float>("empty").values.empty());
  CHECK(r.at("empty").shape == io::tensor_shape{0, 5});
  CHECK(r.read<float>("bf16_rounding").values == std::vector<float>{1.0f, 1.015625f});
  const auto raw = r.read_bytes(r.at("bf16_rounding"));
  REQUIRE(raw.size() == 4);
  CHECK(std::to_integer<int>(raw[0]) == 0x80);
  CHECK(std::to_integer<int>(raw[1]) == 0x3F);
  CHECK_THROWS_WITH_AS((void)r.read<float>("ids"), Contains("unsupported dtype I32"), grove::error);
  CHECK_THROWS_WITH_AS((void)r.read<float>("nope"), Contains("missing tensor 'nope'"), grove::error);

  CHECK_THROWS_WITH_AS(w.add("f32", {1}, std::vector<float>{1.0f}), Contains("twice"), grove::error);
  CHECK_THROWS_WITH_AS(w.add("c", {3}, std::vector<float>{1.0f}), Contains("holds 3 elements but 1 values"),
                       grove::error);
}

TEST_CASE("io: a hand-made file with padding, metadata and an unknown dtype opens") {
  temp_dir dir;
  const std::string header =
      R"({"__metadata__":{"k":"v"},"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},)"
      R"("q":{"dtype":"Q4_FUTURE","shape":[3],"data_offsets":[4,6]}})" "      ";
  write_file(dir / "h.safetensors", safetensors_bytes(header, u16_bytes({0x3C00, 0xC000, 0x1234})));
  const io::safetensors_reader r(dir / "h.safetensors");
  CHECK(r.read<float>("w").values == std::vector<float>{1.0f, -2.0f});
  CHECK(r.at("q").type == io::dtype::unknown);
  CHECK_THROWS_WITH_AS((void)r.read<float>("q"), Contains("unsupported dtype Q4_FUTURE"), grove::error);
}

TEST_CASE("io: malformed safetensors files are rejected with a message naming the problem") {
  temp_dir dir;
  const fs::path p = dir / "bad.safetensors";
  auto open_with = [&](const std::string& bytes) {
    write_file(p, bytes);
    return io::safetensors_reader(p);
  };
  auto with_header = [&](const std::string& header, const std::string& data = std::string(16, '\0')) {
    return open_with(safetensors_bytes(header, data));
  };

  CHECK_THROWS_WITH_AS(io::safetensors_reader(dir / "absent.safetensors"), Contains("no such file"), grove::error);
  CHECK_THROWS_WITH_AS(io::safetensors_reader(dir / "absent.safetensors"), Contains("absent.safetensors"), grove::error);
  CHECK_THROWS_WITH_AS(io::safetensors_reader(dir.path()), Contains("is a directory"), grove::error);
  CHECK_THROWS_WITH_AS(open_with(""), Contains("truncated file: 0 bytes"), grove::error);
  CHECK_THROWS_WITH_AS(open_with(std::string("\x02\0\0", 3)), Contains("truncated file: 3 bytes"), grove::error);
  CHECK_THROWS_WITH_AS(open_with(le_bytes(40, 8) + "{}"), Contains("header length 40 goes beyond the end of the file"),
                       grove::error);
  CHECK_THROWS_WITH_AS(open_with(le_bytes(~0ull, 8) + "{}"), Contains("goes beyond the end of the file"), grove::error);
  CHECK_THROWS_WITH_AS(with_header("{\"a\": "), Contains("header is not valid JSON"), grove::error);
  CHECK_THROWS_WITH_AS(with_header("not json"), Contains("header is not valid JSON"), grove::error);
  CHECK_THROWS_WITH_AS(with_header("[1, 2]"), Contains("header is not a JSON object"), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a": 3})"), Contains("tensor 'a': header entry is not a JSON object"),
                       grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"shape":[2],"data_offsets":[0,8]}})"), Contains("\"dtype\""), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})"), Contains("\"shape\""),
                       grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[2]}})"), Contains("\"data_offsets\""), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})"),
                       Contains("\"data_offsets\""), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})"),
                       Contains("negative dimension"), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})"),
                       Contains("non-integer"), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})"),
                       Contains("tensor 'a': negative data_offsets"), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}})"),
                       Contains("not integers"), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})"),
                       Contains("data_offsets [8, 24] out of range: the data section holds 16 bytes"), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})"),
                       Contains("out of range"), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})"),
                       Contains("data_offsets [0, 8] span 8 bytes but shape [3] of F32 needs 12"), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,16]}})"),
                       Contains("span 16 bytes but shape [2, 3] of BF16 needs 12"), grove::error);
  CHECK_THROWS_WITH_AS(
      with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})"),
      Contains("tensors 'a' (data_offsets [0, 12]) and 'b' (data_offsets [8, 16]) overlap"), grove::error);
  CHECK_THROWS_WITH_AS(
      with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
      Contains("overlap"), grove::error);
  // 2^32 · 2^32 elements overflows 64 bits; 2^62 F32 elements overflow the byte count.
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})"),
                       Contains("shape overflow"), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,8]}})"),
                       Contains("shape overflow"), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"a":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]}})"),
                       Contains("shape overflow"), grove::error);
  CHECK_THROWS_WITH_AS(
      with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})"),
      Contains("declares 'a' twice"), grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"__metadata__":[1]})"), Contains("\"__metadata__\" is not a JSON object"),
                       grove::error);
  CHECK_THROWS_WITH_AS(with_header(R"({"__metadata__":{"n":1}})"), Contains("is not a string"), grove::error);

  // Messages name the file.
  CHECK_THROWS_WITH_AS(with_header("[]"), Contains("bad.safetensors"), grove::error);

  // A file that shrinks after opening: reading reports truncation instead of reading past the end.
  {
    write_file(p, safetensors_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                                    f32_bytes({1, 2, 3, 4})));
    const io::safetensors_reader r(p);
    fs::resize_file(p, fs::file_size(p) - 4);
    CHECK_THROWS_WITH_AS((void)r.read<float>("a"), Contains("truncated"), grove::error);
  }
}

TEST_CASE("io: every truncation and single-byte corruption fails cleanly") {
  temp_dir dir;
  const fs::path p = dir / "fuzz.safetensors";
  const std::string good = safetensors_bytes(std::vector<raw_tensor>{
      {"a", "F32", {2, 3}, f32_bytes({1, 2, 3, 4, 5, 6})},
      {"b", "BF16", {3}, u16_bytes({0x3F80, 0x4000, 0xC040})},
      {"c", "I32", {1}, le_bytes(7, 4)}});
  // 0: opened and every tensor read; 1: grove::error. Any other exception fails the test, and
  // the sanitizers catch any read outside a buffer.
  auto outcome = [&](const std::string& bytes) {
    fs::remove(p);  // a new file rather than a truncated one: ext4 flushes truncate-and-rewrite on close
    write_file(p, bytes);
    try {
      const io::safetensors_reader r(p);
      for (const io::tensor_entry& e : r.tensors()) {
        if (io::is_floating(e.type)) (void)r.read<double>(e.name);
        else (void)r.read_bytes(e);
      }
      return 0;
    } catch (const grove::error&) {
      return 1;
    }
  };
  REQUIRE(outcome(good) == 0);
  for (std::size_t length = 0; length < good.size(); ++length)
    if (outcome(good.substr(0, length)) != 1) FAIL("a file truncated to " << length << " bytes opened");
  int failures = 0;
  for (std::size_t at = 0; at < good.size(); ++at)
    for (char c : {'\0', '\xFF', '"', '9', '-', '}'}) {
      std::string bad = good;
      if (bad[at] == c) continue;
      bad[at] = c;
      failures += outcome(bad);
    }
  CHECK(failures > 0);
}

// ================================ checkpoints and layers ================================

TEST_CASE("io: a layer loads from one file, converts, and round trips through save_layer") {
  temp_dir dir;
  const std::string prefix = "model.layers.3.mlp";
  auto tensors = layer_tensors(prefix);
  // Another layer and unrelated tensors in the same file are ignored.
  tensors.push_back({"model.embed_tokens.weight", "F32", {2, 4}, f32_bytes({1, 2, 3, 4, 5, 6, 7, 8})});
  tensors.push_back({"model.layers.3.mlp.shared_expert.weight", "I8", {3}, "abc"});
  write_file(dir / "one.safetensors", safetensors_bytes(tensors));

  const io::checkpoint ckpt(dir / "one.safetensors");
  CHECK(!ckpt.sharded());
  CHECK(io::infer_layer_dims(ckpt, prefix) == small);
  CHECK(io::infer_layer_dims(ckpt, prefix + ".") == small);

  const auto params = io::load_layer<float>(ckpt, prefix);
  const auto view = params.view();
  CHECK(params.dims() == small);
  const auto router = expected_values(tensors, prefix + ".gate.weight");
  CHECK(std::vector<float>(view.router().data(), view.router().data() + 16) == router);
  CHECK(view.router()(1, 2) == router[1 * 4 + 2]);
  const auto up2 = expected_values(tensors, prefix + ".experts.2.up_proj.weight");
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 4; ++c) CHECK(view.expert(2).up(r, c) == up2[static_cast<std::size_t>(r * 4 + c)]);
  const auto down1 = expected_values(tensors, prefix + ".chunk_experts.1.down_proj.weight");
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 2; ++c) CHECK(view.adjugate(1).down(r, c) == down1[static_cast<std::size_t>(r * 2 + c)]);
  CHECK(std::vector<float>(params.bias().begin(), params.bias().end()) == std::vector<float>{0.5f, -0.25f, 0.0f, 1.0f});

  // double loads the same values.
  const auto as_double = io::load_layer<double>(dir / "one.safetensors", prefix);
  CHECK(as_double.view().expert(2).up(1, 3) == static_cast<double>(view.expert(2).up(1, 3)));

  // Saving and loading back under another prefix gives the same weights, in F32, BF16 (values
  // here are BF16-exact) and F16 (exact too).
  for (io::dtype stored : {io::dtype::f32, io::dtype::bf16, io::dtype::f16}) {
    const fs::path out = dir / ("saved-" + std::string(io::dtype_name(stored)) + ".safetensors");
    io::save_layer(out, view, "blocks.7", stored);
    const io::safetensors_reader r(out);
    CHECK(r.at("blocks.7.experts.3.down_proj.weight").type == stored);
    CHECK(r.at("blocks.7.experts.3.down_proj.weight").shape == io::tensor_shape{4, 3});
    CHECK(r.at("blocks.7.expert_bias").shape == io::tensor_shape{4});
    CHECK(r.tensors().size() == 1 + 3 * 4 + 3 * 2 + 1);
    const auto back = io::load_layer<float>(out, "blocks.7");
    CHECK(std::equal(back.values().begin(), back.values().end(), params.values().begin(), params.values().end()));
    CHECK(std::equal(back.bias().begin(), back.bias().end(), params.bias().begin(), params.bias().end()));
  }

  // Random weights through BF16 come back rounded to nearest even, element by element.
  const auto random = grove::layer_parameters<float>::random(small, 7, 0.3);
  io::save_layer(dir / "random.safetensors", random.view(), "", io::dtype::bf16);
  const auto rounded = io::load_layer<float>(dir / "random.safetensors", "");
  for (std::size_t i = 0; i < random.values().size(); ++i) {
    const float v = random.values()[i];
    std::uint32_t bits;
    std::memcpy(&bits, &v, 4);
    const std::uint32_t rounded_bits = ((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16) << 16;
    float expected;
    std::memcpy(&expected, &rounded_bits, 4);
    if (rounded.values()[i] != expected) FAIL("element " << i << ": " << rounded.values()[i] << " != " << expected);
  }
}

TEST_CASE("io: a layer decodes straight into BF16 memory: copied from BF16, rounded once from F32, F16, F64") {
  temp_dir dir;
  // F32 weights with values that are not bf16-exact (ties and non-ties), written as F32, F64,
  // F16 and BF16 files by the library's writer.
  const auto random = grove::layer_parameters<float>::random(small, 11, 0.3);
  auto with_bias = grove::layer_parameters<float>(random);
  with_bias.bias()[1] = 0.375f;
  for (io::dtype stored : {io::dtype::f32, io::dtype::f64, io::dtype::f16, io::dtype::bf16}) {
    INFO(io::dtype_name(stored));
    const std::string path = dir / ("w-" + std::string(io::dtype_name(stored)) + ".safetensors");
    io::save_layer(path, with_bias.view(), "m", stored);
    const io::checkpoint ckpt(path);
    const grove::layer_parameters<grove::bf16> w = io::load_layer<grove::bf16>(ckpt, "m");
    CHECK(w.dims() == small);
    // Expected: the file's values read as double (exact for every dtype here), rounded once to
    // bf16 by the rule written out in this test (round to nearest, ties to even).
    const auto exact = io::load_layer<double>(ckpt, "m");
    std::size_t i = 0;
    bool all_equal = true;
    w.view().for_each_tensor([&](const grove::tensor_info& info, const grove::bf16* const& p) {
      if (p == nullptr) return;
      for (grove::index k = 0; k < info.size(); ++k, ++i) {
        const double v = exact.values()[i];
        // Round the exact value to bf16 by hand: through float only when that is exact.
        const auto as_float = static_cast<float>(v);
        std::uint16_t expected;
        if (static_cast<double>(as_float) == v) {
          std::uint32_t bits;
          std::memcpy(&bits, &as_float, 4);
          expected = static_cast<std::uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        } else {
          expected = io::double_to_bf16(v);  // F64 values not exact in float: its own single rounding
        }
        if (grove::bits_of(p[k]) != expected) all_equal = false;
      }
    });
    CHECK(all_equal);
    CHECK(i == static_cast<std::size_t>(grove::total_parameters(small)));
    // The bias stays fp32, the fp32 router is the bf16 one widened.
    CHECK(w.bias()[1] == static_cast<float>(exact.bias()[1]));
    CHECK(w.routing_view().router()(2, 3) == grove::to_float(w.view().router()(2, 3)));
    // From F32 it is exactly what rounding the fp32 layer in memory gives.
    if (stored == io::dtype::f32) {
      const grove::layer_parameters<grove::bf16> from_f32 = grove::layer_parameters<grove::bf16>::from(io::load_layer<float>(ckpt, "m").view());
      CHECK(std::memcmp(w.view().router().data(), from_f32.view().router().data(),
                        sizeof(grove::bf16) * static_cast<std::size_t>(grove::total_parameters(small))) == 0);
    }
  }
  // Errors name the tensor: a non-finite weight, a missing tensor.
  auto tensors = layer_tensors("m");
  std::vector<float> nan_values = expected_values(tensors, "m.experts.1.up_proj.weight");
  nan_values[5] = std::numeric_limits<float>::quiet_NaN();
  named(tensors, "m.experts.1.up_proj.weight").bytes = f32_bytes(nan_values);
  write_file(dir / "nan.safetensors", safetensors_bytes(tensors));
  CHECK_THROWS_WITH_AS((void)io::load_layer<grove::bf16>(io::checkpoint(dir / "nan.safetensors"), "m"),
                       Contains("tensor 'experts.1.up_proj.weight' holds a non-finite value"), grove::error);
  auto nan_bias = layer_tensors("m");
  named(nan_bias, "m.expert_bias").bytes = f32_bytes({0.5f, std::numeric_limits<float>::infinity(), 0.0f, 1.0f});
  write_file(dir / "nan-bias.safetensors", safetensors_bytes(nan_bias));
  CHECK_THROWS_WITH_AS((void)io::load_layer<grove::bf16>(io::checkpoint(dir / "nan-bias.safetensors"), "m"),
                       Contains("tensor 'expert_bias' holds a non-finite value (inf) at row 1"), grove::error);
  write_file(dir / "missing.safetensors", safetensors_bytes(without(layer_tensors("m"), "chunk_experts.1.up_proj")));
  CHECK_THROWS_WITH_AS((void)io::load_layer<grove::bf16>(io::checkpoint(dir / "missing.safetensors"), "m"),
                       Contains("m.chunk_experts.1.up_proj.weight"), grove::error);
  CHECK(grove::layer_parameters<grove::bf16>::bytes_for(small) == io::load_layer<grove::bf16>(io::checkpoint(dir / "w-F32.safetensors"), "m").bytes());
  CHECK(grove::layer_parameters<float>::bytes_for(small) == with_bias.bytes());
}

TEST_CASE("io: expert_bias is optional") {
  temp_dir dir;
  write_file(dir / "nb.safetensors", safetensors_bytes(layer_tensors("m", /*with_bias=*/false)));
  const auto params = io::load_layer<float>(dir / "nb.safetensors", "m");
  CHECK(std::vector<float>(params.bias().begin(), params.bias().end()) == std::vector<float>(4, 0.0f));
}

TEST_CASE("io: a shard of whole groups loads only its tensors, with the full layer's values") {
  temp_dir dir;
  // E = 4 experts in G = 2 groups: group 1 is experts 2-3 and adjugate 1. Group 0's tensors
  // are another rank's business: one of them missing is no error for group 1's shard.
  write_file(dir / "all.safetensors", safetensors_bytes(layer_tensors("m")));
  write_file(dir / "no-expert-0.safetensors", safetensors_bytes(without(layer_tensors("m"), "experts.0.down_proj")));
  const auto whole = io::load_layer<float>(dir / "all.safetensors", "m");
  const std::vector<grove::index> mine{1};
  for (const char* file : {"all.safetensors", "no-expert-0.safetensors"}) {
    INFO(file);
    const auto shard = io::load_layer<float>(dir / file, "m", mine);
    CHECK(shard.dims() == small);
    CHECK(std::vector<grove::index>(shard.held_groups().begin(), shard.held_groups().end()) == mine);
    // The router, 2 experts and 1 adjugate: 16 + 2·36 + 24 values, no more.
    CHECK(shard.values().size() == 16 + 2 * 3 * 3 * 4 + 3 * 2 * 4);
    CHECK(shard.bytes() == grove::layer_parameters<float>::bytes_for(small, mine));
    CHECK(shard.bytes() < whole.bytes());
    std::vector<const float*> want;
    whole.view().for_each_tensor([&](const grove::tensor_info&, const float* const& p) { want.push_back(p); });
    std::size_t i = 0;
    shard.view().for_each_tensor([&](const grove::tensor_info& info, const float* const& p) {
      INFO(info.name);
      const grove::index group = grove::group_of_tensor(info, 2);
      if (group == 0) {
        CHECK(p == nullptr);
      } else {
        REQUIRE(p != nullptr);
        CHECK(std::equal(p, p + info.size(), want[i]));
      }
      ++i;
    });
    CHECK(std::equal(shard.bias().begin(), shard.bias().end(), whole.bias().begin(), whole.bias().end()));
    CHECK(shard.view().holds_group(1));
    CHECK_FALSE(shard.view().holds_group(0));
    // The BF16 shard holds the same groups.
    CHECK(io::load_layer<grove::bf16>(dir / file, "m", mine).bytes() ==
          grove::layer_parameters<grove::bf16>::bytes_for(small, mine));
  }
  // Group 0's shard needs expert 0's tensors: the error names the one that is missing.
  CHECK_THROWS_WITH_AS((void)io::load_layer<float>(dir / "no-expert-0.safetensors", "m", std::vector<grove::index>{0}),
                       Contains("m.experts.0.down_proj.weight"), grove::error);
  // A shard converted from a view of the same groups holds the same bits.
  const auto converted = grove::layer_parameters<float>::from(whole.view().only_groups(mine));
  const auto loaded = io::load_layer<float>(dir / "all.safetensors", "m", mine);
  CHECK(std::equal(converted.values().begin(), converted.values().end(), loaded.values().begin(), loaded.values().end()));
  // Group lists are checked.
  CHECK_THROWS_WITH_AS((void)grove::layer_parameters<float>::shard(small, {}), Contains("empty"), grove::error);
  CHECK_THROWS_WITH_AS((void)grove::layer_parameters<float>::shard(small, std::vector<grove::index>{1, 0}),
                       Contains("sorted"), grove::error);
  CHECK_THROWS_WITH_AS((void)io::load_layer<float>(dir / "all.safetensors", "m", std::vector<grove::index>{2}),
                       Contains("outside [0, G = 2)"), grove::error);
}

TEST_CASE("io: sharded checkpoint directories") {
  temp_dir dir;
  const std::string prefix = "model.layers.1.mlp";
  const auto all = layer_tensors(prefix);
  // Split: router and experts 0-1 in shard 1, the rest in shard 2; layer 0 in a third shard.
  std::vector<raw_tensor> first, second;
  for (const raw_tensor& t : all) {
    const bool early = t.name.find("gate.weight") == prefix.size() + 1 || t.name.find(".experts.0.") != std::string::npos ||
                       t.name.find(".experts.1.") != std::string::npos;
    (early ? first : second).push_back(t);
  }
  REQUIRE(first.size() == 7);
  write_file(dir / "model-00001-of-00003.safetensors", safetensors_bytes(first));
  write_file(dir / "model-00002-of-00003.safetensors", safetensors_bytes(second));
  const auto other = layer_tensors("model.layers.0.mlp");
  write_file(dir / "model-00003-of-00003.safetensors", safetensors_bytes(other));

  std::string index = R"({"metadata":{"total_size":1234},"weight_map":{)";
  bool comma = false;
  auto map_all = [&](const std::vector<raw_tensor>& ts, const std::string& shard) {
    for (const raw_tensor& t : ts) {
      if (comma) index += ",";
      index += "\"" + t.name + "\":\"" + shard + "\"";
      comma = true;
    }
  };
  map_all(first, "model-00001-of-00003.safetensors");
  map_all(second, "model-00002-of-00003.safetensors");
  map_all(other, "model-00003-of-00003.safetensors");
  index += "}}";
  write_file(dir / "model.safetensors.index.json", index);

  const io::checkpoint ckpt(dir.path());
  CHECK(ckpt.sharded());
  CHECK(ckpt.names().size() == all.size() + other.size());
  CHECK(ckpt.file_of(prefix + ".experts.3.up_proj.weight").filename() == "model-00002-of-00003.safetensors");
  const auto params = io::load_layer<float>(ckpt, prefix);
  CHECK(params.view().expert(3).gate(2, 0) == expected_values(all, prefix + ".experts.3.gate_proj.weight")[8]);
  CHECK(params.view().router()(3, 3) == expected_values(all, prefix + ".gate.weight")[15]);
  CHECK(params.bias()[3] == 1.0f);
  // The index file itself opens the same checkpoint.
  const auto via_index = io::load_layer<float>(dir / "model.safetensors.index.json", prefix);
  CHECK(std::equal(via_index.values().begin(), via_index.values().end(), params.values().begin()));

  // Only the shards holding the layer are opened: corrupting the third one does not matter
  // for layer 1, and is reported for layer 0.
  write_file(dir / "model-00003-of-00003.safetensors", "garbage!garbage!");
  const io::checkpoint again(dir.path());
  const auto reloaded = io::load_layer<float>(again, prefix);
  CHECK(std::equal(reloaded.values().begin(), reloaded.values().end(), params.values().begin()));
  CHECK_THROWS_WITH_AS((void)io::load_layer<float>(again, "model.layers.0.mlp"),
                       Contains("model-00003-of-00003.safetensors"), grove::error);

  // A directory holding just model.safetensors is a checkpoint too.
  temp_dir single;
  write_file(single / "model.safetensors", safetensors_bytes(all));
  CHECK(io::load_layer<float>(single.path(), prefix).dims() == small);
}

TEST_CASE("io: broken sharded checkpoints") {
  temp_dir dir;
  write_file(dir / "a.safetensors", safetensors_bytes(layer_tensors("m")));
  auto open_with_index = [&](const std::string& index) {
    write_file(dir / "model.safetensors.index.json", index);
    return io::checkpoint(dir.path());
  };
  CHECK_THROWS_WITH_AS(io::checkpoint(dir / "nowhere"), Contains("does not exist"), grove::error);
  CHECK_THROWS_WITH_AS(io::checkpoint(dir.path()), Contains("holds neither model.safetensors.index.json"), grove::error);
  CHECK_THROWS_WITH_AS(open_with_index(R"({"weight_map":{"m.gate.weight":"a.safetensors","m.experts.0.up_proj.weight":"b.safetensors"}})"),
                       Contains("tensor 'm.experts.0.up_proj.weight' is mapped to shard 'b.safetensors', which is missing"),
                       grove::error);
  CHECK_THROWS_WITH_AS(open_with_index("{\"weight_map\": "), Contains("is not valid JSON"), grove::error);
  CHECK_THROWS_WITH_AS(open_with_index("[]"), Contains("not a JSON object"), grove::error);
  CHECK_THROWS_WITH_AS(open_with_index(R"({"metadata":{}})"), Contains("\"weight_map\""), grove::error);
  CHECK_THROWS_WITH_AS(open_with_index(R"({"weight_map":{"x":3}})"), Contains("entry for 'x' is not a string"),
                       grove::error);
  CHECK_THROWS_WITH_AS(open_with_index(R"({"weight_map":{"x":"../a.safetensors"}})"),
                       Contains("not a file inside the checkpoint directory"), grove::error);
  CHECK_THROWS_WITH_AS(open_with_index(R"({"weight_map":{"x":"/etc/passwd"}})"),
                       Contains("not a file inside the checkpoint directory"), grove::error);
  // The index names a tensor its shard does not have.
  const io::checkpoint lying = open_with_index(R"({"weight_map":{"m.gate.weight":"a.safetensors","m.ghost":"a.safetensors"}})");
  CHECK_THROWS_WITH_AS((void)lying.entry("m.ghost"), Contains("maps tensor 'm.ghost' to shard 'a.safetensors', which does not contain it"),
                       grove::error);
  CHECK_THROWS_WITH_AS((void)lying.entry("m.other"), Contains("missing tensor 'm.other'"), grove::error);
}

TEST_CASE("io: layer structure errors name the full tensor and the problem") {
  temp_dir dir;
  const std::string P = "model.layers.0.mlp";
  const fs::path p = dir / "l.safetensors";
  auto load = [&](const std::vector<raw_tensor>& tensors, const std::string& prefix) {
    write_file(p, safetensors_bytes(tensors));
    return io::load_layer<float>(p, prefix);
  };

  // Missing tensors, with the prefix in the name.
  CHECK_THROWS_WITH_AS(load(without(layer_tensors(P), ".experts.2.up_proj"), P),
                       Contains("missing tensor 'model.layers.0.mlp.experts.2.up_proj.weight'"), grove::error);
  CHECK_THROWS_WITH_AS(load(without(layer_tensors(P), ".chunk_experts.1.down_proj"), P),
                       Contains("missing tensor 'model.layers.0.mlp.chunk_experts.1.down_proj.weight'"), grove::error);
  // A wrong prefix names the router it looked for and the layers there are.
  CHECK_THROWS_WITH_AS(load(layer_tensors(P), "model.layers.9.mlp"),
                       Contains("missing tensor 'model.layers.9.mlp.gate.weight'"), grove::error);
  CHECK_THROWS_WITH_AS(load(layer_tensors(P), "model.layers.9.mlp"), Contains("found under 'model.layers.0.mlp'"),
                       grove::error);
  CHECK_THROWS_WITH_AS(load(without(layer_tensors(P), "chunk_experts"), P), Contains("no adjugate experts"),
                       grove::error);

  // Wrong shapes: expected vs actual.
  {
    auto t = layer_tensors(P);
    named(t, P + ".experts.1.down_proj.weight").shape = {3, 4};
    CHECK_THROWS_WITH_AS(load(t, P), Contains("wrong shape for tensor 'model.layers.0.mlp.experts.1.down_proj.weight'"),
                         grove::error);
    CHECK_THROWS_WITH_AS(load(t, P), Contains("expected [4, 3], found [3, 4]"), grove::error);
  }
  {
    auto t = layer_tensors(P);
    named(t, P + ".gate.weight").shape = {16};
    CHECK_THROWS_WITH_AS(load(t, P), Contains("expected [E, H], found [16]"), grove::error);
  }
  {
    auto t = layer_tensors(P);
    named(t, P + ".expert_bias") = {P + ".expert_bias", "F32", {2, 2}, f32_bytes({0, 0, 0, 0})};
    CHECK_THROWS_WITH_AS(load(t, P), Contains("expected [4], found [2, 2]"), grove::error);
  }
  {
    auto t = layer_tensors(P);
    named(t, P + ".chunk_experts.0.up_proj.weight") = {P + ".chunk_experts.0.up_proj.weight", "F32", {2, 5},
                                                        f32_bytes(std::vector<float>(10, 0.0f))};
    CHECK_THROWS_WITH_AS(load(t, P), Contains("expected [2, 4], found [2, 5]"), grove::error);
  }
  // Unsupported dtype for a weight.
  {
    auto t = layer_tensors(P);
    named(t, P + ".experts.0.gate_proj.weight") = {P + ".experts.0.gate_proj.weight", "I8", {3, 4}, std::string(12, '\1')};
    CHECK_THROWS_WITH_AS(load(t, P), Contains("'model.layers.0.mlp.experts.0.gate_proj.weight'"), grove::error);
    CHECK_THROWS_WITH_AS(load(t, P), Contains("unsupported dtype I8"), grove::error);
  }

  // Expert numbering: a gap, and experts beyond the router's E.
  CHECK_THROWS_WITH_AS(load(without(layer_tensors(P), ".experts.2."), P),
                       Contains("inconsistent expert numbering"), grove::error);
  CHECK_THROWS_WITH_AS(load(without(layer_tensors(P), ".experts.2."), P),
                       Contains("'model.layers.0.mlp.experts.2.*' is missing"), grove::error);
  {
    auto t = layer_tensors(P);
    t.push_back({P + ".experts.4.gate_proj.weight", "F32", {3, 4}, f32_bytes(std::vector<float>(12, 0.0f))});
    CHECK_THROWS_WITH_AS(load(t, P), Contains("found 'model.layers.0.mlp.experts.4.*' but 'model.layers.0.mlp.gate.weight' has E = 4"),
                         grove::error);
  }
  CHECK_THROWS_WITH_AS(load(without(layer_tensors(P), ".chunk_experts.0."), P),
                       Contains("inconsistent adjugate numbering"), grove::error);

  // E not a multiple of G: three adjugates for four experts.
  {
    auto t = layer_tensors(P);
    for (const char* proj : {"gate_proj", "up_proj"})
      t.push_back({P + ".chunk_experts.2." + proj + ".weight", "F32", {2, 4}, f32_bytes(std::vector<float>(8, 0.0f))});
    t.push_back({P + ".chunk_experts.2.down_proj.weight", "F32", {4, 2}, f32_bytes(std::vector<float>(8, 0.0f))});
    CHECK_THROWS_WITH_AS(load(t, P), Contains("E = 4 is not a multiple of the group count G = 3"), grove::error);
  }

  // Non-finite weights, named with the prefix.
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto t = layer_tensors(P);
    auto& up = named(t, P + ".experts.3.up_proj.weight");
    up.bytes = f32_bytes({0, 0, 0, 0, 0, 0, bad, 0, 0, 0, 0, 0});
    CHECK_THROWS_WITH_AS(load(t, P), Contains("tensor 'experts.3.up_proj.weight' holds a non-finite value"),
                         grove::error);
    CHECK_THROWS_WITH_AS(load(t, P), Contains("row 1, column 2"), grove::error);
    CHECK_THROWS_WITH_AS(load(t, P), Contains("layer prefix 'model.layers.0.mlp'"), grove::error);
  }
  // BF16 NaN in the bias.
  {
    auto t = layer_tensors(P);
    named(t, P + ".expert_bias") = {P + ".expert_bias", "BF16", {4}, u16_bytes({0, 0x7FC0, 0, 0})};
    CHECK_THROWS_WITH_AS(load(t, P), Contains("'expert_bias' holds a non-finite value"), grove::error);
  }

  // k > E is refused by the configuration built from the loaded dims.
  const auto params = load(layer_tensors(P), P);
  CHECK_THROWS_WITH_AS(grove::dynamic_config<float>(params.dims(), 5, 0.05), Contains("exceeds the expert count E = 4"),
                       grove::error);
}

// ================================ config.json ================================

TEST_CASE("io: config.json fields, cross-checks and errors") {
  temp_dir dir;
  const fs::path p = dir / "config.json";
  auto read = [&](const std::string& text) {
    write_file(p, text);
    return io::read_hf_config(p);
  };

  const auto full = read(R"({"architectures":["GroveMoeForCausalLM"],"hidden_size":4,"num_experts":4,
      "num_experts_per_tok":3,"num_experts_per_group":2,"moe_intermediate_size":3,
      "small_experts_intermediate_size":2,"small_experts_weight":0.05,"rope_theta":1e6})");
  CHECK(full.top_k == 3);
  CHECK(full.scale == 0.05);
  CHECK(full.experts == 4);
  CHECK(full.experts_per_group == 2);
  CHECK(full.expert_intermediate == 3);
  CHECK(full.adjugate_intermediate == 2);
  CHECK(full.hidden == 4);
  CHECK_NOTHROW(io::check_hf_config(full, small));

  const auto sparse = read(R"({"num_experts_per_tok": 2})");
  CHECK(sparse.top_k == 2);
  CHECK(!sparse.scale);
  CHECK(!sparse.experts);
  CHECK_NOTHROW(io::check_hf_config(sparse, small));

  const auto nested = read(R"({"model_type":"x","text_config":{"num_experts_per_tok":4,"small_experts_weight":0.25}})");
  CHECK(nested.top_k == 4);
  CHECK(nested.scale == 0.25);

  CHECK_THROWS_WITH_AS(io::check_hf_config(read(R"({"num_experts": 8})"), small),
                       Contains("says num_experts = 8 but the tensors have E = 4"), grove::error);
  CHECK_THROWS_WITH_AS(io::check_hf_config(read(R"({"num_experts_per_group": 4})"), small),
                       Contains("num_experts_per_group = 4 but the tensors have E / G = 2"), grove::error);
  CHECK_THROWS_WITH_AS(io::check_hf_config(read(R"({"moe_intermediate_size": 768})"), small),
                       Contains("moe_intermediate_size = 768 but the tensors have I = 3"), grove::error);
  CHECK_THROWS_WITH_AS(io::check_hf_config(read(R"({"small_experts_intermediate_size": 128})"), small),
                       Contains("small_experts_intermediate_size = 128 but the tensors have Ia = 2"), grove::error);
  CHECK_THROWS_WITH_AS(io::check_hf_config(read(R"({"hidden_size": 2048})"), small),
                       Contains("hidden_size = 2048 but the tensors have H = 4"), grove::error);
  CHECK_THROWS_WITH_AS(io::check_hf_config(read(R"({"num_experts_per_tok": 5})"), small),
                       Contains("num_experts_per_tok = 5 (k), more than the E = 4 experts"), grove::error);

  CHECK_THROWS_WITH_AS(read(R"({"num_experts_per_tok": 0})"), Contains("\"num_experts_per_tok\" must be a positive integer"),
                       grove::error);
  CHECK_THROWS_WITH_AS(read(R"({"num_experts_per_tok": "8"})"), Contains("must be a positive integer, got \"8\""),
                       grove::error);
  CHECK_THROWS_WITH_AS(read(R"({"num_experts": -3})"), Contains("\"num_experts\" must be a positive integer"), grove::error);
  CHECK_THROWS_WITH_AS(read(R"({"small_experts_weight": -0.5})"), Contains("\"small_experts_weight\" must be a finite number >= 0"),
                       grove::error);
  CHECK_THROWS_WITH_AS(read(R"({"small_experts_weight": "a"})"), Contains("small_experts_weight"), grove::error);
  CHECK_THROWS_WITH_AS(read("{,}"), Contains("is not valid JSON"), grove::error);
  CHECK_THROWS_WITH_AS(read("[1]"), Contains("not a JSON object"), grove::error);
  CHECK_THROWS_WITH_AS((void)io::read_hf_config(dir / "missing.json"), Contains("missing.json' does not exist"), grove::error);
}

// ================================ hostile and huge inputs ================================

namespace {

/// `depth` nested arrays around a 0: "[[[0]]]".
std::string nested_arrays(std::size_t depth) { return std::string(depth, '[') + "0" + std::string(depth, ']'); }

/// The peak resident memory of this process in bytes since the last reset_peak_memory(), or -1
/// where /proc does not say (then the memory checks are skipped).
long long peak_memory() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return -1;
}
/// Resets VmHWM to the current resident memory (Linux 4.0 and later); false where it cannot.
bool reset_peak_memory() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  clear.flush();
  return clear.good();
}

}  // namespace

TEST_CASE("io: JSON nested a million levels deep is refused before anything recursive runs") {
  temp_dir dir;
  const std::string deep = nested_arrays(1'000'000);
  const fs::path p = dir / "deep.safetensors";
  auto header_with = [&](const std::string& header) {
    write_file(p, safetensors_bytes(header, std::string(8, '\0')));
    return io::safetensors_reader(p);
  };
  // In "shape", in "data_offsets", in a field grove does not know, in "__metadata__", as a tensor.
  for (const std::string& header :
       {R"({"a":{"dtype":"F32","shape":)" + deep + R"(,"data_offsets":[0,0]}})",
        R"({"a":{"dtype":"F32","shape":[2],"data_offsets":)" + deep + "}}",
        R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":)" + deep + "}}",
        R"({"__metadata__":{"k":)" + deep + "}}", R"({"__metadata__":)" + deep + "}", R"({"a":)" + deep + "}",
        deep}) {
    try {
      (void)header_with(header);
      FAIL("a header nested a million levels deep opened");
    } catch (const grove::error& e) {
      const std::string message = e.what();
      CHECK(message.find("deep.safetensors") != std::string::npos);
      CHECK(message.size() < 600);  // no dump of the value
    }
  }
  CHECK_THROWS_WITH_AS(header_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":)" + deep + "}}"),
                       Contains("nests arrays and objects deeper than 64 levels"), grove::error);
  // A field grove does not know may nest up to the limit (64 levels in all).
  const auto ok = header_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":)" + nested_arrays(62) + "}}");
  CHECK(ok.at("a").shape == io::tensor_shape{2});
  CHECK_THROWS_WITH_AS(header_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":)" + nested_arrays(63) + "}}"),
                       Contains("deeper than 64 levels"), grove::error);

  // config.json and the index are bounded before nlohmann parses them.
  write_file(dir / "config.json", R"({"num_experts":)" + deep + "}");
  CHECK_THROWS_WITH_AS((void)io::read_hf_config(dir / "config.json"),
                       Contains("config.json' nests arrays and objects deeper than 64 levels (at byte 78)"), grove::error);
  write_file(dir / "a.safetensors", safetensors_bytes(layer_tensors("m")));
  write_file(dir / "model.safetensors.index.json", R"({"weight_map":{"m.gate.weight":)" + deep + "}}");
  CHECK_THROWS_WITH_AS(io::checkpoint(dir.path()), Contains("index.json' nests arrays and objects deeper than 64 levels"),
                       grove::error);
  // Brackets inside strings do not count; escaped quotes do not end a string.
  CHECK(grove::detail::json_too_deep_at(R"({"a":"[[[[\"[[[["})", 2) == std::string_view::npos);
  CHECK(grove::detail::json_too_deep_at(R"({"a":"\\",[[]]})", 2) == 11);
}

TEST_CASE("io: a header of 200,000 tensors opens in one linear pass") {
  // The callback parser of 0.1 rescanned the header object after every entry: 25,000 tensors
  // took 15 s and 200,000 would take over an hour. Linear, this takes well under a second
  // (docs/io.md gives the figures for 1,000,000).
  temp_dir dir;
  constexpr int count = 200'000;
  std::string header = "{";
  header.reserve(static_cast<std::size_t>(count) * 64);
  for (int i = 0; i < count; ++i) {
    if (i) header += ',';
    header += "\"model.layers." + std::to_string(i) + ".w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" +
              std::to_string(4 * i) + "," + std::to_string(4 * i + 4) + "]}";
  }
  header += "}";
  std::string data(4 * static_cast<std::size_t>(count), '\0');
  std::memcpy(data.data() + 4 * 123'456, "\x00\x00\x80\x3F", 4);  // 1.0f
  write_file(dir / "many.safetensors", safetensors_bytes(header, data));
  const io::safetensors_reader r(dir / "many.safetensors");
  REQUIRE(r.tensors().size() == count);
  CHECK(r.tensors()[123'456].name == "model.layers.123456.w");
  CHECK(r.read<float>("model.layers.123456.w").values == std::vector<float>{1.0f});
  CHECK(r.at("model.layers.199999.w").begin == 4 * 199'999u);
}

TEST_CASE("io: error messages quote at most a bounded excerpt of what a file holds") {
  temp_dir dir;
  const std::string huge_name(1 << 20, 'n');
  const fs::path p = dir / "names.safetensors";
  auto message_of = [&](auto&& action) {
    try {
      action();
    } catch (const grove::error& e) {
      return std::string(e.what());
    }
    FAIL("no error");
    return std::string();
  };
  auto open_header = [&](const std::string& header) {
    return message_of([&] {
      write_file(p, safetensors_bytes(header, std::string(8, '\0')));
      (void)io::safetensors_reader(p);
    });
  };
  for (const std::string& message :
       {open_header("{\"" + huge_name + R"(":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})"),
        open_header(R"({"a":{"dtype":")" + huge_name + R"(","shape":[3],"data_offsets":[0,8],"x":1}, "a":1})"),
        open_header(R"({"a":{"dtype":"F32","shape":[)" + std::string(100'000, '1') + ",1],\"data_offsets\":[0,8]}}"),
        open_header(R"({"a":{"dtype":"F32","shape":)" + std::string(1 << 20, ' ') + "\"" + huge_name + "\"}}"),
        open_header(R"({"a":{"dtype":"F32","shape":[)" + std::string(50'000, '1') + "]}}"),
        open_header("{\"a\": tru" + huge_name + "}")}) {
    INFO(message.substr(0, 300));
    CHECK(message.size() < 1000);
    CHECK(message.find("names.safetensors") != std::string::npos);
  }
  CHECK(grove::detail::excerpt(huge_name).size() < 240);
  CHECK(grove::detail::excerpt(huge_name).find("\u2026 (1048576 bytes)") != std::string::npos);
  CHECK(grove::detail::excerpt("short") == "short");
  CHECK(grove::detail::excerpt(std::string(300, '\xC3') + "", 201).size() <= 230);  // cut at a character boundary

  // A shape of 100,000 dimensions in a message is cut too.
  std::vector<std::int64_t> many(100'000, 1);
  CHECK(grove::detail::shape_string(many).size() < 260);

  write_file(dir / "a.safetensors", safetensors_bytes(layer_tensors("m")));
  write_file(dir / "model.safetensors.index.json", R"({"weight_map":{")" + huge_name + R"(":")" + huge_name + "\"}}");
  // Two names cut to 200 bytes, and the shard's path to 4096 (no real path is longer).
  CHECK(message_of([&] { io::checkpoint(dir.path()); }).size() < 5000);
  write_file(dir / "config.json", R"({"num_experts":[")" + huge_name + "\"]}");
  const std::string config_message = message_of([&] { (void)io::read_hf_config(dir / "config.json"); });
  CHECK(config_message.size() < 1000);
  CHECK(config_message.find("\"num_experts\" must be a positive integer, got [\"nnnn") != std::string::npos);
}

TEST_CASE("io: layer sizes whose parameter counts overflow are refused, from the API and from a header") {
  const grove::index big = std::numeric_limits<std::int32_t>::max();
  CHECK_NOTHROW(grove::layer_dims{2048, 128, 64, 768, 128}.validate());
  // E·3·H·I = 2^93 wraps 64 bits; G·3·H·Ia likewise; the sum of bounded parts too.
  CHECK_THROWS_WITH_AS((grove::layer_dims{big, big, 1, big, 1}.validate()),
                       Contains("the experts alone (E * 3 * H * I) would hold more than 2^60 parameters"), grove::error);
  CHECK_THROWS_WITH_AS((grove::layer_dims{big, 1, 1, 1, big}.validate()), Contains("the adjugates alone"), grove::error);
  CHECK_THROWS_WITH_AS((grove::layer_dims{1 << 30, 1 << 28, 1, 1, 1}.validate()), Contains("would hold more than 2^60"),
                       grove::error);
  CHECK_THROWS_WITH_AS((grove::layer_dims{24, 12, 1, 10, 1537228672809129302}.validate()),
                       Contains("adjugate intermediate size Ia = 1537228672809129302 is too large"), grove::error);
  CHECK_THROWS_WITH_AS((grove::layer_dims{std::int64_t{1} << 40, 4, 2, 3, 2}.validate()),
                       Contains("hidden size H = 1099511627776 is too large"), grove::error);

  // The same sizes claimed by a header (a dtype grove does not know, so no data backs them).
  temp_dir dir;
  auto claim = [&](std::int64_t hidden, std::int64_t experts, std::int64_t inter) {
    std::string header = "{";
    auto add = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
      if (header.size() > 1) header += ",";
      header += "\"m." + name + "\":{\"dtype\":\"Q4_FUTURE\",\"shape\":[" + std::to_string(rows) + "," +
                std::to_string(cols) + "],\"data_offsets\":[0,0]}";
    };
    add("gate.weight", experts, hidden);
    for (int e = 0; e < 4; ++e) {
      const std::string p = "experts." + std::to_string(e) + ".";
      add(p + "gate_proj.weight", inter, hidden);
      add(p + "up_proj.weight", inter, hidden);
      add(p + "down_proj.weight", hidden, inter);
    }
    add("chunk_experts.0.gate_proj.weight", 2, hidden);
    add("chunk_experts.0.up_proj.weight", 2, hidden);
    add("chunk_experts.0.down_proj.weight", hidden, 2);
    header += "}";
    write_file(dir / "claim.safetensors", safetensors_bytes(header, ""));
    return io::checkpoint(dir / "claim.safetensors");
  };
  CHECK_THROWS_WITH_AS((void)io::infer_layer_dims(claim(big, 4, big), "m"),
                       Contains("would hold more than 2^60 parameters"), grove::error);
  CHECK_THROWS_WITH_AS((void)io::load_layer<float>(claim(big, 4, big), "m"), Contains("too large"), grove::error);
  CHECK_THROWS_WITH_AS((void)io::load_layer<float>(claim(std::int64_t{1} << 40, 4, 3), "m"),
                       Contains("hidden size H = 1099511627776 is too large"), grove::error);
}

TEST_CASE("io: upcycling checks shapes and dtypes from the headers before it allocates") {
  temp_dir dir;
  // A plain MoE layer of a few hundred bytes of header whose tensors claim sizes no data backs
  // (a dtype grove does not know is not checked against the data when the file opens).
  auto plain_claim = [&](std::int64_t hidden, std::int64_t inter, const std::string& dtype) {
    std::string header = "{";
    auto add = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
      if (header.size() > 1) header += ",";
      header += "\"m." + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":[" + std::to_string(rows) + "," +
                std::to_string(cols) + "],\"data_offsets\":[0,0]}";
    };
    add("gate.weight", 4, hidden);
    for (int e = 0; e < 4; ++e) add("experts." + std::to_string(e) + ".gate_proj.weight", inter, hidden);
    header += "}";
    write_file(dir / "plain.safetensors", safetensors_bytes(header, ""));
    return io::checkpoint(dir / "plain.safetensors");
  };
  grove::upcycle_options options;
  options.groups = 2;
  options.adjugate_intermediate = 2;
  // H = 2^20, I = 2^16: 3.3 TB of float. 0.1 allocated first (bad_alloc, or an abort under
  // AddressSanitizer); now the dtype is refused from the header.
  CHECK_THROWS_WITH_AS((void)io::upcycle_layer<float>(plain_claim(1 << 20, 1 << 16, "Q4_FUTURE"), "m", options),
                       Contains("has unsupported dtype Q4_FUTURE"), grove::error);
  // A width of 2^40 is refused by the sizes' own checks.
  CHECK_THROWS_WITH_AS((void)io::upcycle_layer<float>(plain_claim(std::int64_t{1} << 40, 3, "Q4_FUTURE"), "m", options),
                       Contains("hidden size H = 1099511627776 is too large"), grove::error);

  // 256 MiB claimed: refused without the process growing (0.1 zero-filled it first).
  if (!reset_peak_memory() || peak_memory() < 0) return;
  const long long before = peak_memory();
  CHECK_THROWS_WITH_AS((void)io::upcycle_layer<float>(plain_claim(1 << 13, 1 << 11, "Q4_FUTURE"), "m", options),
                       Contains("unsupported dtype"), grove::error);
  CHECK(peak_memory() - before < (64ll << 20));
}

TEST_CASE("io: files are written through an exclusive temporary beside them, never through a link") {
  temp_dir dir;
  const std::string out = dir / "out.safetensors";
  auto writer_of = [](float value) {
    io::safetensors_writer w;
    w.add("x", {2}, std::vector<float>{value, value});
    return w;
  };
  auto leftovers = [&] {
    int n = 0;
    for (const auto& entry : fs::directory_iterator(dir.path()))
      n += entry.path().filename().string().find("grove-partial") != std::string::npos;
    return n;
  };

  // A link planted at 0.1's predictable temporary name is neither followed nor used.
  write_file(dir / "victim", "precious");
  fs::create_symlink(dir / "victim", out + ".grove-partial");
  writer_of(1.0f).write(out);
  CHECK(read_file(dir / "victim") == "precious");
  CHECK(fs::is_symlink(out + ".grove-partial"));
  CHECK(io::safetensors_reader(out).read<float>("x").values == std::vector<float>{1.0f, 1.0f});
  fs::remove(out + ".grove-partial");

  // Two writers of one destination have temporaries of their own; the last rename wins whole.
  {
    grove::detail::output_file first(out), second(out);
    CHECK(first.temporary() != second.temporary());
    CHECK(first.temporary().parent_path() == dir.path());
    CHECK(!fs::is_symlink(first.temporary()));
    first.write("first", 5);
    second.write("second", 6);
    second.commit();
    CHECK(read_file(out) == "second");
    first.commit();
    CHECK(read_file(out) == "first");
  }
  // Abandoned (an exception between creation and commit): the temporary goes, the destination stays.
  {
    grove::detail::output_file abandoned(out);
    abandoned.write("half", 4);
    CHECK(leftovers() == 1);
  }
  CHECK(leftovers() == 0);
  CHECK(read_file(out) == "first");

  // Writers racing on one destination: every result is one writer's whole file.
  std::vector<std::thread> writers;
  for (int w = 0; w < 4; ++w)
    writers.emplace_back([&, w] {
      const io::safetensors_writer writer = writer_of(static_cast<float>(w + 1));
      for (int i = 0; i < 25; ++i) writer.write(out);
    });
  for (std::thread& t : writers) t.join();
  const auto values = io::safetensors_reader(out).read<float>("x").values;
  REQUIRE(values.size() == 2);
  CHECK(values[0] == values[1]);
  CHECK(leftovers() == 0);

  // A destination that cannot be created: an error naming it, nothing left behind.
  CHECK_THROWS_WITH_AS(writer_of(1.0f).write(dir.path() / "no-such-dir" / "out.safetensors"),
                       Contains("no-such-dir/out.safetensors"), grove::error);
  CHECK(!fs::exists(dir / "no-such-dir"));
}

TEST_CASE("io: the opt-in check of a forward's results names the first token that is not finite") {
  grove::routing_plan<float> plan;
  plan.logits = grove::row_matrix<float>::Constant(3, 4, 1.0f);
  plan.topk_weights = grove::row_matrix<float>::Constant(3, 2, 0.5f);
  grove::row_matrix<float> y = grove::row_matrix<float>::Zero(3, 5);
  CHECK_NOTHROW(grove::check_finite_output(plan, y));
  CHECK(!grove::first_non_finite(y));
  y(2, 1) = std::numeric_limits<float>::quiet_NaN();
  y(1, 3) = std::numeric_limits<float>::infinity();
  CHECK(grove::first_non_finite(y) == std::pair<grove::index, grove::index>{1, 3});
  CHECK_THROWS_WITH_AS(grove::check_finite_output(plan, y),
                       "grove: non-finite output: y holds inf at token 1, column 3 (the first token with a NaN or an "
                       "infinity)",
                       grove::error);
  y.setZero();
  plan.topk_weights(0, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(grove::check_finite_output(plan, y), Contains("topk_weights holds nan at token 0, column 1"),
                       grove::error);
  plan.logits(2, 0) = -std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(grove::check_finite_rows(plan.logits, "router_logits"),
                       Contains("router_logits holds -inf at token 2, column 0"), grove::error);
}

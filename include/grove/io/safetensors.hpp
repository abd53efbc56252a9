#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "grove/error.hpp"
#include "grove/io/dtype.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// a · b without wrapping; false when the product does not fit in 64 bits.
inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

/// "[3, 4]"
inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

inline std::string quoted(const std::filesystem::path& p) {
  std::string s = "'";
  s += p.string();
  s += "'";
  return s;
}

}  // namespace detail

namespace io {

/// A tensor shape, outermost dimension first (PyTorch order).
using tensor_shape = std::vector<std::int64_t>;

/// One tensor as a safetensors header declares it. Offsets are relative to the start of the
/// data section (the byte after the header), as in the file.
struct tensor_entry {
  std::string name;
  std::string dtype_name;  ///< as spelled in the header ("BF16")
  dtype type = dtype::unknown;  ///< dtype::unknown when grove does not know dtype_name
  tensor_shape shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
  std::uint64_t elements = 1;  ///< product of the shape (checked not to overflow)

  [[nodiscard]] std::uint64_t bytes() const { return end - begin; }
};

/// A tensor read into memory: values in row-major order.
template <class Value>
struct tensor {
  tensor_shape shape;
  std::vector<Value> values;
};

/// Reads a .safetensors file: an 8-byte little-endian header length N, N bytes of JSON
/// describing every tensor (dtype, shape, data_offsets) and optional "__metadata__", then the
/// data. Opening reads and validates the header only; tensor data is read on request, one
/// tensor at a time, so a reader over a multi-gigabyte shard costs little memory. Every
/// inconsistency (truncation, bad JSON, offsets out of range, sizes that do not match the shape,
/// overlapping tensors, overflowing shapes) throws grove::error naming the file, the tensor and
/// the problem. A reader is not safe to use from several threads at once.
class safetensors_reader {
 public:
  /// Largest header accepted, as in the reference implementation (100 MB).
  static constexpr std::uint64_t max_header_bytes = 100'000'000;

  explicit safetensors_reader(std::filesystem::path path) : path_(std::move(path)) { open(); }

  [[nodiscard]] const std::filesystem::path& path() const { return path_; }
  /// Every tensor, in the order of its data in the file.
  [[nodiscard]] const std::vector<tensor_entry>& tensors() const { return entries_; }
  /// The "__metadata__" strings (empty when the file has none).
  [[nodiscard]] const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Size of the JSON header in bytes (N); the data section starts at 8 + N.
  [[nodiscard]] std::uint64_t header_bytes() const { return header_bytes_; }

  [[nodiscard]] const tensor_entry* find(std::string_view name) const {
    auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : &entries_[it->second];
  }
  [[nodiscard]] bool contains(std::string_view name) const { return find(name) != nullptr; }
  /// The entry named `name`; throws grove::error naming the tensor and the file when absent.
  [[nodiscard]] const tensor_entry& at(std::string_view name) const {
    if (const tensor_entry* e = find(name)) return *e;
    throw error("grove: missing tensor '" + std::string(name) + "' in " + detail::quoted(path_));
  }

  /// The raw little-endian bytes of one tensor.
  [[nodiscard]] std::vector<std::byte> read_bytes(const tensor_entry& entry) const {
    std::vector<std::byte> bytes(static_cast<std::size_t>(entry.bytes()));
    read_span(entry, entry.begin, bytes.data(), bytes.size());
    return bytes;
  }

  /// Converts one tensor into `out`, which must hold exactly entry.elements values. Reads the
  /// tensor's bytes in bounded chunks, never the whole file.
  template <class Value>
  void read_into(const tensor_entry& entry, std::span<Value> out) const {
    require_convertible<Value>(entry);
    if (out.size() != entry.elements)
      throw error("grove: tensor '" + entry.name + "' holds " + std::to_string(entry.elements) +
                  " values but the destination has room for " + std::to_string(out.size()));
    const std::size_t size = dtype_size(entry.type);
    const std::size_t chunk = std::max<std::size_t>(1, (std::size_t{1} << 20) / size);
    std::vector<std::byte> buffer(std::min<std::size_t>(chunk, out.size()) * size);
    for (std::size_t done = 0; done < out.size();) {
      const std::size_t n = std::min(chunk, out.size() - done);
      read_span(entry, entry.begin + done * size, buffer.data(), n * size);
      decode(entry.type, buffer.data(), n, out.data() + done);
      done += n;
    }
  }

  /// Reads the tensor named `name`, converted to Value.
  template <class Value>
  [[nodiscard]] tensor<Value> read(std::string_view name) const {
    const tensor_entry& entry = at(name);
    require_convertible<Value>(entry);  // before allocating: an unknown dtype's shape is unchecked
    tensor<Value> t;
    t.shape = entry.shape;
    t.values.resize(static_cast<std::size_t>(entry.elements));
    read_into(entry, std::span<Value>(t.values));
    return t;
  }

  /// Throws grove::error naming the tensor and the file unless its dtype converts to Value.
  template <class Value>
  void require_convertible(const tensor_entry& entry) const {
    if (!converts<Value>(entry.type))
      throw error("grove: tensor '" + entry.name + "' in " + detail::quoted(path_) + " has unsupported dtype " +
                  entry.dtype_name + " (grove reads F32, F16, BF16 and F64 as floating point, I32 and I64 as integers)");
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw error("grove: safetensors file " + detail::quoted(path_) + ": " + what);
  }
  [[noreturn]] void fail_tensor(const std::string& name, const std::string& what) const {
    throw error("grove: safetensors file " + detail::quoted(path_) + ": tensor '" + name + "': " + what);
  }

  void open() {
    std::error_code ec;
    if (!std::filesystem::exists(path_, ec))
      throw error("grove: cannot open safetensors file " + detail::quoted(path_) + ": no such file");
    if (std::filesystem::is_directory(path_, ec))
      throw error("grove: cannot open safetensors file " + detail::quoted(path_) + ": it is a directory");
    const std::uintmax_t size = std::filesystem::file_size(path_, ec);
    if (ec) throw error("grove: cannot open safetensors file " + detail::quoted(path_) + ": " + ec.message());
    file_bytes_ = size;
    stream_.open(path_, std::ios::binary);
    if (!stream_) throw error("grove: cannot open safetensors file " + detail::quoted(path_) + " for reading");

    if (file_bytes_ < 8)
      fail("truncated file: " + std::to_string(file_bytes_) + " bytes, shorter than the 8-byte header length");
    std::byte prefix[8];
    raw_read(0, prefix, 8, "the header length");
    header_bytes_ = detail::load_le<std::uint64_t>(prefix);
    if (header_bytes_ > file_bytes_ - 8)
      fail("header length " + std::to_string(header_bytes_) + " goes beyond the end of the file (" +
           std::to_string(file_bytes_) + " bytes; truncated or not a safetensors file)");
    if (header_bytes_ > max_header_bytes)
      fail("header length " + std::to_string(header_bytes_) + " exceeds the limit of " +
           std::to_string(max_header_bytes) + " bytes");
    data_bytes_ = file_bytes_ - 8 - header_bytes_;

    std::string text(static_cast<std::size_t>(header_bytes_), '\0');
    raw_read(8, reinterpret_cast<std::byte*>(text.data()), text.size(), "the header");
    parse_header(text);
  }

  void parse_header(const std::string& text) {
    using json = nlohmann::json;
    json header;
    // nlohmann keeps the last of duplicate keys silently; a tensor declared twice is an error.
    std::map<std::string, int, std::less<>> seen;
    auto on_event = [&](int depth, json::parse_event_t event, json& parsed) {
      if (event == json::parse_event_t::key && depth == 1 && parsed.is_string())
        if (++seen[parsed.get<std::string>()] > 1) fail("header declares '" + parsed.get<std::string>() + "' twice");
      return true;
    };
    try {
      header = json::parse(text, on_event);
    } catch (const json::exception& e) {
      fail(std::string("header is not valid JSON (") + e.what() + ")");
    }
    if (!header.is_object()) fail(std::string("header is not a JSON object (it is ") + header.type_name() + ")");

    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == "__metadata__") {
        if (!it.value().is_object()) fail("\"__metadata__\" is not a JSON object");
        for (auto m = it.value().begin(); m != it.value().end(); ++m) {
          if (!m.value().is_string()) fail("\"__metadata__\" value for '" + m.key() + "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      entries_.push_back(parse_entry(it.key(), it.value()));
    }

    // Data of distinct tensors must not overlap (empty tensors occupy nothing).
    std::sort(entries_.begin(), entries_.end(), [](const tensor_entry& a, const tensor_entry& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    const tensor_entry* previous = nullptr;
    for (const tensor_entry& e : entries_) {
      if (e.begin == e.end) continue;
      if (previous && e.begin < previous->end)
        fail("tensors '" + previous->name + "' (data_offsets [" + std::to_string(previous->begin) + ", " +
             std::to_string(previous->end) + "]) and '" + e.name + "' (data_offsets [" + std::to_string(e.begin) +
             ", " + std::to_string(e.end) + "]) overlap");
      previous = &e;
    }
    for (std::size_t i = 0; i < entries_.size(); ++i) by_name_.emplace(entries_[i].name, i);
  }

  tensor_entry parse_entry(const std::string& name, const nlohmann::json& value) const {
    if (!value.is_object()) fail_tensor(name, "header entry is not a JSON object");
    tensor_entry e;
    e.name = name;

    auto dt = value.find("dtype");
    if (dt == value.end() || !dt->is_string()) fail_tensor(name, "missing or non-string \"dtype\"");
    e.dtype_name = dt->get<std::string>();
    e.type = dtype_from_name(e.dtype_name);

    auto sh = value.find("shape");
    if (sh == value.end() || !sh->is_array()) fail_tensor(name, "missing or non-array \"shape\"");
    for (const auto& d : *sh) {
      if (d.is_number_integer() && !d.is_number_unsigned()) fail_tensor(name, "negative dimension in \"shape\" " + sh->dump());
      if (!d.is_number_unsigned()) fail_tensor(name, "\"shape\" " + sh->dump() + " holds a non-integer");
      const auto v = d.get<std::uint64_t>();
      if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail_tensor(name, "shape overflow: dimension " + std::to_string(v) + " is too large");
      e.shape.push_back(static_cast<std::int64_t>(v));
      if (!detail::checked_mul(e.elements, v, e.elements))
        fail_tensor(name, "shape overflow: " + sh->dump() + " has more than 2^64 elements");
    }

    auto off = value.find("data_offsets");
    if (off == value.end() || !off->is_array() || off->size() != 2)
      fail_tensor(name, "missing \"data_offsets\" or not an array of two integers");
    for (const auto& o : *off) {
      if (o.is_number_integer() && !o.is_number_unsigned()) fail_tensor(name, "negative data_offsets " + off->dump());
      if (!o.is_number_unsigned()) fail_tensor(name, "data_offsets " + off->dump() + " are not integers");
    }
    e.begin = (*off)[0].get<std::uint64_t>();
    e.end = (*off)[1].get<std::uint64_t>();
    if (e.begin > e.end || e.end > data_bytes_)
      fail_tensor(name, "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                            "] out of range: the data section holds " + std::to_string(data_bytes_) + " bytes");
    if (e.type != dtype::unknown) {
      std::uint64_t needed = 0;
      if (!detail::checked_mul(e.elements, dtype_size(e.type), needed))
        fail_tensor(name, "shape overflow: " + detail::shape_string(e.shape) + " of " + e.dtype_name +
                              " needs more than 2^64 bytes");
      if (needed != e.bytes())
        fail_tensor(name, "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] span " +
                              std::to_string(e.bytes()) + " bytes but shape " + detail::shape_string(e.shape) + " of " +
                              e.dtype_name + " needs " + std::to_string(needed));
    }
    return e;
  }

  void read_span(const tensor_entry& entry, std::uint64_t from, std::byte* dst, std::size_t count) const {
    // Validated at open: begin <= from, from + count <= end <= data size.
    raw_read(8 + header_bytes_ + from, dst, count, "tensor '" + entry.name + "'");
  }

  void raw_read(std::uint64_t offset, std::byte* dst, std::size_t count, const std::string& what) const {
    if (count == 0) return;
    stream_.clear();
    stream_.seekg(static_cast<std::streamoff>(offset));
    stream_.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(count));
    if (!stream_ || static_cast<std::size_t>(stream_.gcount()) != count)
      fail("truncated file: could not read " + what + " (" + std::to_string(count) + " bytes at offset " +
           std::to_string(offset) + ")");
  }

  std::filesystem::path path_;
  mutable std::ifstream stream_;
  std::uint64_t file_bytes_ = 0;
  std::uint64_t header_bytes_ = 0;
  std::uint64_t data_bytes_ = 0;
  std::vector<tensor_entry> entries_;
  std::map<std::string, std::size_t, std::less<>> by_name_;
  std::map<std::string, std::string> metadata_;
};

/// Builds a .safetensors file: tensors are converted to their stored dtype when added and
/// written in the order added. The header is compact JSON, "__metadata__" first when set, padded
/// with spaces so that the data starts at a multiple of 8 bytes.
class safetensors_writer {
 public:
  /// A "__metadata__" string entry.
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// Adds `values` (row-major) as tensor `name` of `shape`, stored as `stored`.
  template <class Value>
  void add(const std::string& name, const tensor_shape& shape, std::span<const Value> values, dtype stored) {
    std::uint64_t elements = 1;
    for (std::int64_t d : shape) {
      if (d < 0) throw error("grove: cannot write tensor '" + name + "': negative dimension in shape " + detail::shape_string(shape));
      if (!detail::checked_mul(elements, static_cast<std::uint64_t>(d), elements))
        throw error("grove: cannot write tensor '" + name + "': shape " + detail::shape_string(shape) + " overflows");
    }
    if (elements != values.size())
      throw error("grove: cannot write tensor '" + name + "': shape " + detail::shape_string(shape) + " holds " +
                  std::to_string(elements) + " elements but " + std::to_string(values.size()) + " values were given");
    std::vector<std::byte> bytes(values.size() * dtype_size(stored));
    encode(stored, values.data(), values.size(), bytes.data());
    add_bytes(name, stored, shape, std::move(bytes));
  }
  /// Same, stored as F32 for float/double values and I32 for integers.
  template <class Value>
  void add(const std::string& name, const tensor_shape& shape, std::span<const Value> values) {
    add(name, shape, values, std::is_floating_point_v<Value> ? dtype::f32 : dtype::i32);
  }
  template <class Value>
  void add(const std::string& name, const tensor_shape& shape, const std::vector<Value>& values, dtype stored) {
    add(name, shape, std::span<const Value>(values), stored);
  }
  template <class Value>
  void add(const std::string& name, const tensor_shape& shape, const std::vector<Value>& values) {
    add(name, shape, std::span<const Value>(values));
  }

  /// Adds already-encoded little-endian bytes (for tools and tests); the size must match.
  void add_bytes(const std::string& name, dtype stored, const tensor_shape& shape, std::vector<std::byte> bytes) {
    if (name == "__metadata__") throw error("grove: cannot write a tensor named '__metadata__' (reserved)");
    if (index_.count(name)) throw error("grove: cannot write tensor '" + name + "' twice");
    if (stored == dtype::unknown) throw error("grove: cannot write tensor '" + name + "' with an unknown dtype");
    std::uint64_t needed = dtype_size(stored);
    for (std::int64_t d : shape)
      if (d < 0 || !detail::checked_mul(needed, static_cast<std::uint64_t>(d), needed))
        throw error("grove: cannot write tensor '" + name + "': bad shape " + detail::shape_string(shape));
    if (needed != bytes.size())
      throw error("grove: cannot write tensor '" + name + "': " + std::to_string(bytes.size()) + " bytes given, shape " +
                  detail::shape_string(shape) + " of " + std::string(dtype_name(stored)) + " needs " + std::to_string(needed));
    index_.emplace(name, tensors_.size());
    tensors_.push_back(pending{name, stored, shape, std::move(bytes)});
  }

  [[nodiscard]] bool contains(const std::string& name) const { return index_.count(name) != 0; }
  [[nodiscard]] std::size_t size() const { return tensors_.size(); }

  /// The JSON header as written, padding included (without the 8-byte length).
  [[nodiscard]] std::string header() const {
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    if (!metadata_.empty()) h["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const pending& t : tensors_) {
      h[t.name] = {{"dtype", std::string(dtype_name(t.type))},
                   {"shape", t.shape},
                   {"data_offsets", {offset, offset + t.bytes.size()}}};
      offset += t.bytes.size();
    }
    std::string text = h.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    return text;
  }

  /// Writes the file (to a temporary name beside it, then renamed, so a failed write leaves no
  /// half file under `path`).
  void write(const std::filesystem::path& path) const {
    const std::string text = header();
    std::filesystem::path temporary = path;
    temporary += ".grove-partial";
    {
      std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
      if (!out) throw error("grove: cannot create " + detail::quoted(path));
      std::byte length[8];
      detail::store_le<std::uint64_t>(length, text.size());
      out.write(reinterpret_cast<const char*>(length), 8);
      out.write(text.data(), static_cast<std::streamsize>(text.size()));
      for (const pending& t : tensors_)
        out.write(reinterpret_cast<const char*>(t.bytes.data()), static_cast<std::streamsize>(t.bytes.size()));
      out.close();
      if (!out) {
        std::error_code ignored;
        std::filesystem::remove(temporary, ignored);
        throw error("grove: failed writing " + detail::quoted(path));
      }
    }
    std::error_code ec;
    std::filesystem::rename(temporary, path, ec);
    if (ec) {
      std::error_code ignored;
      std::filesystem::remove(temporary, ignored);
      throw error("grove: cannot write " + detail::quoted(path) + ": " + ec.message());
    }
  }

 private:
  struct pending {
    std::string name;
    dtype type;
    tensor_shape shape;
    std::vector<std::byte> bytes;
  };
  std::map<std::string, std::string> metadata_;
  std::vector<pending> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
};

}  // namespace io
GROVE_END_NAMESPACE

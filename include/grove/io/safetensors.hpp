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
#include "grove/io/json_reader.hpp"
#include "grove/io/messages.hpp"
#include "grove/io/output_file.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// a · b without wrapping; false when the product does not fit in 64 bits.
inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  out = a * b;
  return true;
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
    throw error("grove: missing tensor " + detail::quoted_name(name) + " in " + detail::quoted(path_));
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
      throw error("grove: tensor " + detail::quoted_name(entry.name) + " holds " + std::to_string(entry.elements) +
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
      throw error("grove: tensor " + detail::quoted_name(entry.name) + " in " + detail::quoted(path_) +
                  " has unsupported dtype " + detail::excerpt(entry.dtype_name) + " (grove reads F32, F16, BF16 and F64 as floating point, I32 and I64 as integers)");
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw error("grove: safetensors file " + detail::quoted(path_) + ": " + what);
  }
  [[noreturn]] void fail_tensor(const std::string& name, const std::string& what) const {
    throw error("grove: safetensors file " + detail::quoted(path_) + ": tensor " + detail::quoted_name(name) + ": " + what);
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

  /// Reads the header in one pass with nlohmann's SAX parser, building the entries as their
  /// values go by: linear in the header's size (a DOM with a callback rescans the parent object
  /// after every entry, quadratic in the tensor count), no DOM of a 100 MB header in memory, and
  /// nothing recursive (the parser keeps its own stack; the depth is bounded at max_json_depth).
  void parse_header(const std::string& text) {
    header_parser parser(*this);
    nlohmann::json::sax_parse(text, &parser);
    if (!parser.done()) fail("header is not valid JSON (it ends early)");

    // A tensor declared twice (JSON keeps either silently); found in one sort of the names.
    std::vector<std::size_t> by_name(entries_.size());
    for (std::size_t i = 0; i < by_name.size(); ++i) by_name[i] = i;
    std::sort(by_name.begin(), by_name.end(),
              [&](std::size_t a, std::size_t b) { return entries_[a].name < entries_[b].name; });
    for (std::size_t i = 1; i < by_name.size(); ++i)
      if (entries_[by_name[i]].name == entries_[by_name[i - 1]].name)
        fail("header declares " + detail::quoted_name(entries_[by_name[i]].name) + " twice");

    // Data of distinct tensors must not overlap (empty tensors occupy nothing).
    std::sort(entries_.begin(), entries_.end(), [](const tensor_entry& a, const tensor_entry& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    const tensor_entry* previous = nullptr;
    for (const tensor_entry& e : entries_) {
      if (e.begin == e.end) continue;
      if (previous && e.begin < previous->end)
        fail("tensors " + detail::quoted_name(previous->name) + " (data_offsets [" + std::to_string(previous->begin) +
             ", " + std::to_string(previous->end) + "]) and " + detail::quoted_name(e.name) + " (data_offsets [" +
             std::to_string(e.begin) + ", " + std::to_string(e.end) + "]) overlap");
      previous = &e;
    }
    for (std::size_t i = 0; i < entries_.size(); ++i) by_name_.emplace_hint(by_name_.end(), entries_[i].name, i);
  }

  /// The checks of one entry once its object has closed: every field present, offsets inside
  /// the data section, and for a known dtype a byte count that matches the shape.
  void finish_entry(tensor_entry& e, bool has_dtype, bool has_shape, std::size_t offsets) const {
    if (!has_dtype) fail_tensor(e.name, "missing or non-string \"dtype\"");
    if (!has_shape) fail_tensor(e.name, "missing or non-array \"shape\"");
    if (offsets != 2) fail_tensor(e.name, "missing \"data_offsets\" or not an array of two integers");
    e.type = dtype_from_name(e.dtype_name);
    if (e.begin > e.end || e.end > data_bytes_)
      fail_tensor(e.name, "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                              "] out of range: the data section holds " + std::to_string(data_bytes_) + " bytes");
    if (e.type != dtype::unknown) {
      std::uint64_t needed = 0;
      if (!detail::checked_mul(e.elements, dtype_size(e.type), needed))
        fail_tensor(e.name, "shape overflow: " + detail::shape_string(e.shape) + " of " + detail::excerpt(e.dtype_name) +
                                " needs more than 2^64 bytes");
      if (needed != e.bytes())
        fail_tensor(e.name, "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] span " +
                                std::to_string(e.bytes()) + " bytes but shape " + detail::shape_string(e.shape) +
                                " of " + detail::excerpt(e.dtype_name) + " needs " + std::to_string(needed));
    }
  }

  /// nlohmann's SAX events of a header, checked as they come. Levels: 1 is the header object,
  /// 2 a tensor's object (or "__metadata__"), 3 its "shape" or "data_offsets" array. The value
  /// of a field grove does not know may be any JSON, skipped, up to max_json_depth.
  class header_parser final : public nlohmann::json_sax<nlohmann::json> {
   public:
    explicit header_parser(safetensors_reader& reader) : r_(reader) {}
    [[nodiscard]] bool done() const { return finished_; }

    bool null() override { return scalar("null"); }
    bool boolean(bool) override { return scalar("a boolean"); }
    bool number_integer(number_integer_t value) override {
      // nlohmann reports integers >= 0 as unsigned: this one is negative.
      if (in_array(field::shape))
        r_.fail_tensor(entry_.name, "negative dimension " + std::to_string(value) + " in \"shape\"");
      if (in_array(field::offsets)) r_.fail_tensor(entry_.name, "negative data_offsets value " + std::to_string(value));
      return scalar("a number");
    }
    bool number_unsigned(number_unsigned_t value) override {
      if (in_array(field::shape)) {
        if (value > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
          r_.fail_tensor(entry_.name, "shape overflow: dimension " + std::to_string(value) + " is too large");
        entry_.shape.push_back(static_cast<std::int64_t>(value));
        if (!detail::checked_mul(entry_.elements, value, entry_.elements))
          r_.fail_tensor(entry_.name,
                         "shape overflow: " + detail::shape_string(entry_.shape) + " has more than 2^64 elements");
        return true;
      }
      if (in_array(field::offsets)) {
        if (offsets_ >= 2) r_.fail_tensor(entry_.name, "\"data_offsets\" holds more than two integers");
        (offsets_++ == 0 ? entry_.begin : entry_.end) = value;
        return true;
      }
      return scalar("a number");
    }
    bool number_float(number_float_t, const string_t&) override { return scalar("a non-integer number"); }
    bool string(string_t& value) override {
      if (skipping()) return true;
      if (depth_ == 2 && in_tensor_ && field_ == field::dtype) {
        entry_.dtype_name = std::move(value);
        has_dtype_ = true;
        return true;
      }
      if (depth_ == 2 && !in_tensor_) {
        r_.metadata_[key_] = std::move(value);  // "__metadata__": name -> string
        return true;
      }
      return scalar("a string");
    }
    bool binary(binary_t&) override { return scalar("binary data"); }

    bool key(string_t& name) override {
      if (skipping()) return true;
      if (depth_ == 2 && in_tensor_) {
        field_ = name == "dtype" ? field::dtype
                 : name == "shape" ? field::shape
                 : name == "data_offsets" ? field::offsets
                                          : field::other;
        if (field_ != field::other) {
          bool& seen = field_seen_[static_cast<int>(field_)];
          if (seen) r_.fail_tensor(entry_.name, "\"" + name + "\" given twice");
          seen = true;
        }
      } else {
        key_ = std::move(name);  // a tensor's name (level 1) or a "__metadata__" name (level 2)
      }
      return true;
    }

    bool start_object(std::size_t) override { return open("an object"); }
    bool start_array(std::size_t) override { return open("an array"); }
    bool end_object() override { return close(); }
    bool end_array() override { return close(); }

    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
      r_.fail("header is not valid JSON (" + detail::excerpt(e.what()) + ")");
    }

   private:
    enum class field { dtype, shape, offsets, other };

    [[nodiscard]] bool skipping() const { return skip_from_ != 0; }
    /// Directly inside the "shape" or "data_offsets" array of the current tensor.
    [[nodiscard]] bool in_array(field f) const { return !skipping() && depth_ == 3 && field_ == f; }

    /// A value that is not an unsigned integer, nor a string grove takes, nor a container.
    bool scalar(const char* what) const {
      if (skipping()) return true;
      switch (depth_) {
        case 0:
          r_.fail(std::string("header is not a JSON object (it is ") + what + ")");
        case 1:
          not_an_object(what);
        case 2:
          if (!in_tensor_)
            r_.fail("\"__metadata__\" value for " + detail::quoted_name(key_) + " is not a string (it is " + what + ")");
          if (field_ != field::other) wrong_field(what);
          return true;  // a field grove does not know
        default:
          wrong_element(what);  // level 3: an element of "shape" or "data_offsets"
      }
    }

    bool open(const char* what) {
      if (++depth_ > detail::max_json_depth)
        r_.fail("header nests arrays and objects deeper than " + std::to_string(detail::max_json_depth) + " levels");
      if (skipping()) return true;
      const bool object = what[3] == 'o';  // "an object"
      switch (depth_) {
        case 1:
          if (!object) r_.fail(std::string("header is not a JSON object (it is ") + what + ")");
          return true;
        case 2:
          if (!object) not_an_object(what);
          in_tensor_ = key_ != "__metadata__";
          if (!in_tensor_) {
            if (seen_metadata_) r_.fail("header declares '__metadata__' twice");
            seen_metadata_ = true;
            return true;
          }
          entry_ = tensor_entry{};
          entry_.name = std::move(key_);
          has_dtype_ = false;
          offsets_ = 0;
          field_seen_[0] = field_seen_[1] = field_seen_[2] = false;
          field_ = field::other;
          return true;
        case 3:
          if (!in_tensor_)
            r_.fail("\"__metadata__\" value for " + detail::quoted_name(key_) + " is not a string (it is " + what + ")");
          if (field_ == field::other) {
            skip_from_ = depth_;
            return true;
          }
          if (object || field_ == field::dtype) wrong_field(what);
          return true;  // the "shape" or "data_offsets" array
        default:
          wrong_element(what);  // level 4: a container inside "shape" or "data_offsets"
      }
    }

    bool close() {
      if (!skipping() && depth_ == 2 && in_tensor_) {
        r_.finish_entry(entry_, has_dtype_, field_seen_[static_cast<int>(field::shape)], offsets_);
        r_.entries_.push_back(std::move(entry_));
      }
      if (skip_from_ == depth_) skip_from_ = 0;
      if (--depth_ == 0) finished_ = true;
      return true;
    }

    [[noreturn]] void not_an_object(const char* what) const {
      if (key_ == "__metadata__") r_.fail(std::string("\"__metadata__\" is not a JSON object (it is ") + what + ")");
      r_.fail_tensor(key_, std::string("header entry is not a JSON object (it is ") + what + ")");
    }
    /// A tensor's "dtype", "shape" or "data_offsets" holding the wrong kind of value.
    [[noreturn]] void wrong_field(const char* what) const {
      if (field_ == field::dtype) r_.fail_tensor(entry_.name, std::string("non-string \"dtype\" (it is ") + what + ")");
      if (field_ == field::shape) r_.fail_tensor(entry_.name, std::string("non-array \"shape\" (it is ") + what + ")");
      r_.fail_tensor(entry_.name, std::string("\"data_offsets\" is not an array of two integers (it is ") + what + ")");
    }
    /// An element of "shape" or "data_offsets" that is not an integer >= 0.
    [[noreturn]] void wrong_element(const char* what) const {
      if (field_ == field::shape) r_.fail_tensor(entry_.name, std::string("\"shape\" holds a non-integer (") + what + ")");
      r_.fail_tensor(entry_.name, std::string("data_offsets are not integers (one is ") + what + ")");
    }

    safetensors_reader& r_;
    int depth_ = 0;
    int skip_from_ = 0;  ///< the level of the unknown field's value being skipped; 0 when none
    bool finished_ = false;
    bool in_tensor_ = false;  ///< at level 2: inside a tensor's object, not "__metadata__"
    bool seen_metadata_ = false;
    std::string key_;      ///< the last name at level 1 (a tensor's) or in "__metadata__"
    tensor_entry entry_;   ///< the tensor being read
    field field_ = field::other;
    bool has_dtype_ = false;
    bool field_seen_[3] = {false, false, false};
    std::size_t offsets_ = 0;  ///< data_offsets integers read so far
  };

  void read_span(const tensor_entry& entry, std::uint64_t from, std::byte* dst, std::size_t count) const {
    // Validated at open: begin <= from, from + count <= end <= data size.
    raw_read(8 + header_bytes_ + from, dst, count, "tensor " + detail::quoted_name(entry.name));
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
  /// The names of the tensors added, in order.
  [[nodiscard]] std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const pending& t : tensors_) out.push_back(t.name);
    return out;
  }

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

  /// Writes the file: to a new temporary file of its own beside `path`, renamed over `path`
  /// once complete (detail::output_file), so a failed write leaves `path` as it was and two
  /// writers never share a temporary.
  void write(const std::filesystem::path& path) const {
    const std::string text = header();
    detail::output_file out(path);
    std::byte length[8];
    detail::store_le<std::uint64_t>(length, text.size());
    out.write(length, 8);
    out.write(text.data(), text.size());
    for (const pending& t : tensors_) out.write(t.bytes.data(), t.bytes.size());
    out.commit();
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

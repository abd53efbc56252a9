#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "grove/error.hpp"
#include "grove/io/json_reader.hpp"
#include "grove/io/messages.hpp"
#include "grove/io/safetensors.hpp"

GROVE_BEGIN_NAMESPACE
namespace io {

/// A Hugging Face checkpoint: one .safetensors file, or a directory holding either
/// model.safetensors.index.json (a "weight_map" from tensor name to shard file) with its
/// shards, or a single model.safetensors. A path to an index file itself (any name ending in
/// ".index.json") opens the sharded checkpoint beside it. Tensors are looked up by their full name
/// ("model.layers.0.mlp.gate.weight"); a shard's header is read the first time one of its
/// tensors is asked for, and only the bytes of the tensors read are ever touched, so opening a
/// 66 GB checkpoint to load one layer reads a few headers and that layer's bytes.
/// Not safe to use from several threads at once.
class checkpoint {
 public:
  static constexpr const char* index_file_name = "model.safetensors.index.json";
  static constexpr const char* single_file_name = "model.safetensors";

  explicit checkpoint(std::filesystem::path path) : path_(std::move(path)), directory_(path_) {
    std::error_code ec;
    if (!std::filesystem::exists(path_, ec)) throw error("grove: checkpoint " + detail::quoted(path_) + " does not exist");
    const std::string file = path_.filename().string();
    const std::string index_suffix = ".index.json";
    if (!std::filesystem::is_directory(path_, ec) && file.size() > index_suffix.size() &&
        file.compare(file.size() - index_suffix.size(), index_suffix.size(), index_suffix) == 0) {
      directory_ = path_.parent_path();  // the index itself was named: shards lie beside it
      read_index(path_);
    } else if (!std::filesystem::is_directory(path_, ec)) {
      single_ = std::make_unique<safetensors_reader>(path_);
    } else if (std::filesystem::exists(path_ / index_file_name, ec)) {
      read_index(path_ / index_file_name);
    } else if (std::filesystem::exists(path_ / single_file_name, ec)) {
      single_ = std::make_unique<safetensors_reader>(path_ / single_file_name);
    } else {
      throw error("grove: checkpoint directory " + detail::quoted(path_) + " holds neither " + index_file_name +
                  " nor " + single_file_name);
    }
  }

  [[nodiscard]] const std::filesystem::path& path() const { return path_; }
  /// True for a directory with an index and shards.
  [[nodiscard]] bool sharded() const { return single_ == nullptr; }

  /// Every tensor name, sorted.
  [[nodiscard]] std::vector<std::string> names() const {
    std::vector<std::string> out;
    if (single_) {
      for (const tensor_entry& e : single_->tensors()) out.push_back(e.name);
      std::sort(out.begin(), out.end());
    } else {
      for (const auto& [name, shard] : weight_map_) out.push_back(name);
    }
    return out;
  }

  [[nodiscard]] bool contains(std::string_view name) const {
    return single_ ? single_->contains(name) : weight_map_.find(name) != weight_map_.end();
  }

  /// Every file the checkpoint reads from: the .safetensors file, or the index and every shard
  /// it names (whether or not a shard has been opened yet).
  [[nodiscard]] std::vector<std::filesystem::path> files() const {
    if (single_) return {single_->path()};
    std::vector<std::filesystem::path> out{index_path_};
    for (const auto& [shard, reader] : shards_) out.push_back(directory_ / shard);
    return out;
  }

  /// The file that holds tensor `name`; throws like entry() when there is none.
  [[nodiscard]] std::filesystem::path file_of(std::string_view name) const { return reader_of(name).path(); }

  /// The header entry of tensor `name` (dtype, shape, offsets); throws grove::error naming the
  /// tensor when the checkpoint lacks it.
  [[nodiscard]] const tensor_entry& entry(std::string_view name) const {
    const safetensors_reader& r = reader_of(name);
    const tensor_entry* e = r.find(name);
    if (!e)
      throw error("grove: " + std::string(index_file_name) + " in " + detail::quoted(path_) + " maps tensor " +
                  detail::quoted_name(name) + " to shard " + detail::quoted(r.path().filename()) + ", which does not contain it");
    return *e;
  }

  /// Reads tensor `name` into `out` after checking that its shape is `expected` (throws naming
  /// the tensor, the expected and the actual shape) and that its dtype converts to Value.
  template <class Value>
  void read_into(std::string_view name, std::span<const std::int64_t> expected, std::span<Value> out) const {
    const tensor_entry& e = entry(name);
    if (!std::equal(e.shape.begin(), e.shape.end(), expected.begin(), expected.end()))
      throw error("grove: wrong shape for tensor " + detail::quoted_name(name) + " in " + detail::quoted(file_of(name)) +
                  ": expected " + detail::shape_string(expected) + ", found " + detail::shape_string(e.shape));
    reader_of(name).read_into(e, out);
  }

  /// The "__metadata__" of the file that holds tensor `name` (empty when it has none).
  [[nodiscard]] const std::map<std::string, std::string>& metadata_of(std::string_view name) const {
    return reader_of(name).metadata();
  }

  /// Tensor `name`'s bytes as stored, in its own dtype, whatever that is: for copying a tensor
  /// unchanged and for reading packed quantized values.
  [[nodiscard]] std::vector<std::byte> read_bytes(std::string_view name) const {
    return reader_of(name).read_bytes(entry(name));
  }

  /// Reads tensor `name` whatever its shape.
  template <class Value>
  [[nodiscard]] tensor<Value> read(std::string_view name) const {
    return reader_of(name).template read<Value>(entry(name).name);
  }

 private:
  [[noreturn]] void missing(std::string_view name) const {
    throw error("grove: missing tensor " + detail::quoted_name(name) + " in checkpoint " + detail::quoted(path_));
  }

  const safetensors_reader& reader_of(std::string_view name) const {
    if (single_) {
      if (!single_->contains(name)) missing(name);
      return *single_;
    }
    auto it = weight_map_.find(name);
    if (it == weight_map_.end()) missing(name);
    auto& shard = shards_[it->second];
    if (!shard) shard = std::make_unique<safetensors_reader>(directory_ / it->second);
    return *shard;
  }

  void read_index(const std::filesystem::path& index_path) {
    index_path_ = index_path;
    const nlohmann::json index = detail::parse_json_file(index_path, "checkpoint index");
    auto fail = [&](const std::string& what) {
      throw error("grove: checkpoint index " + detail::quoted(index_path) + ": " + what);
    };
    if (!index.is_object()) fail("not a JSON object");
    auto map = index.find("weight_map");
    if (map == index.end() || !map->is_object()) fail("missing or non-object \"weight_map\"");
    for (auto it = map->begin(); it != map->end(); ++it) {
      if (!it.value().is_string()) fail("\"weight_map\" entry for " + detail::quoted_name(it.key()) + " is not a string");
      const std::string shard = it.value().get<std::string>();
      const std::filesystem::path relative(shard);
      bool escapes = shard.empty() || relative.is_absolute() || relative.has_root_path();
      for (const auto& part : relative) escapes = escapes || part == "..";
      if (escapes)
        fail("shard name " + detail::quoted_name(shard) + " (for tensor " + detail::quoted_name(it.key()) +
             ") is not a file inside the checkpoint directory");
      if (!shards_.count(shard)) {
        std::error_code ec;
        if (!std::filesystem::is_regular_file(directory_ / relative, ec))
          fail("tensor " + detail::quoted_name(it.key()) + " is mapped to shard " + detail::quoted_name(shard) +
               ", which is missing (" +
               detail::quoted(directory_ / relative) + " does not exist)");
        shards_[shard] = nullptr;
      }
      weight_map_.emplace(it.key(), shard);
    }
  }

  std::filesystem::path path_;
  std::filesystem::path directory_;  ///< where shards are looked up
  std::filesystem::path index_path_;  ///< the index of a sharded checkpoint
  std::unique_ptr<safetensors_reader> single_;
  std::map<std::string, std::string, std::less<>> weight_map_;
  mutable std::map<std::string, std::unique_ptr<safetensors_reader>, std::less<>> shards_;
};

}  // namespace io
GROVE_END_NAMESPACE

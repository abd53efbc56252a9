#pragma once

// `grove quantize` (docs/cli.md, docs/quantization.md "Files"): writes Grove layers in q8 or q4.
//
//   grove quantize --weights PATH --prefix P --dtype q8|q4 --out OUT.safetensors
//       one layer: its router and bias (F32) and its experts and adjugates quantized;
//   grove quantize --weights PATH --dtype q8|q4 --out DIR
//       every Grove layer of the checkpoint quantized, every other tensor copied unchanged, as a
//       sharded checkpoint in DIR (a shard per transformer block, its index, config.json),
//       one layer in memory at a time, with progress on stderr.

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_support.hpp"

namespace grove_cli {

struct quantize_options {
  std::string weights, prefix, dtype, out;
};

/// Calls `fn.template operator()<Block>()` with the block type of `--dtype` (q8 or q4; CLI11 lets
/// no other through).
template <class Fn>
decltype(auto) with_block_format(const std::string& dtype, Fn&& fn) {
  using result = decltype(fn.template operator()<grove::q8_block>());
  return with_cli_format(dtype, [&]<class Format>() -> result {
    if constexpr (grove::is_block_format<Format>)
      return fn.template operator()<Format>();
    else
      throw grove::error("grove: quantize writes q8 or q4, not " + dtype);
  });
}

/// The metadata every file `grove quantize` writes carries.
inline void tag_output(io::safetensors_writer& writer) {
  writer.set_metadata("format", "pt");
  writer.set_metadata("grove_version", GROVE_VERSION_STRING);
}

/// One layer into OUT.safetensors.
inline int quantize_one_layer(const quantize_options& o) {
  const io::checkpoint weights(o.weights);
  require_new_output(o.out, "--out", checkpoint_inputs(weights));
  return with_block_format(o.dtype, [&]<class Block>() {
    const grove::layer_parameters<Block> layer = io::load_layer<Block>(weights, o.prefix);
    io::safetensors_writer writer;
    tag_output(writer);
    io::add_quantized_layer(writer, layer, o.prefix);
    writer.write(o.out);
    const grove::layer_dims& d = layer.dims();
    std::cout << "grove: wrote " << in_quotes(o.out) << ": Grove layer '" << o.prefix << "' in " << o.dtype << " ("
              << format_mib(layer.bytes()) << " in memory, against "
              << format_mib(grove::layer_parameters<float>::bytes_for(d)) << " in f32)\n";
    return 0;
  });
}

/// The transformer block a tensor belongs to: its name up to the dot after the number following
/// "layers." ("model.layers.3.self_attn.q_proj.weight" → "model.layers.3."); "" for the others
/// (embeddings, the final norm, the head).
inline std::string block_of(const std::string& name) {
  const std::size_t at = name.find("layers.");
  if (at == std::string::npos) return {};
  std::size_t end = at + 7;
  while (end < name.size() && name[end] >= '0' && name[end] <= '9') ++end;
  if (end == at + 7 || end >= name.size() || name[end] != '.') return {};
  return name.substr(0, end + 1);
}

/// Every layer of a checkpoint into the sharded checkpoint DIR.
inline int quantize_checkpoint(const quantize_options& o) {
  namespace fs = std::filesystem;
  const io::checkpoint weights(o.weights);
  const fs::path out(o.out);
  std::error_code ec;
  // The checkpoint's directory (a single file's folder): where config.json is, where not to write.
  fs::path input_dir = fs::is_directory(o.weights, ec) ? fs::path(o.weights) : fs::path(o.weights).parent_path();
  if (input_dir.empty()) input_dir = ".";
  {
    // Never into the input, nor over anything: DIR is new, or an empty directory.
    if (fs::exists(out, ec) && fs::equivalent(out, input_dir, ec))
      throw grove::error("grove: --out " + in_quotes(out) + " is the checkpoint's own directory; writing there "
                         "would mix with or destroy its files (choose a new directory)");
    if (fs::exists(out, ec) && (!fs::is_directory(out, ec) || !fs::is_empty(out, ec)))
      throw grove::error("grove: --out " + in_quotes(out) + " exists and is not an empty directory (choose a new one)");
  }
  const std::vector<std::string> layers = io::grove_layers(weights);
  if (layers.empty())
    throw grove::error("grove: checkpoint " + in_quotes(weights.path()) + " holds no Grove layer (nothing to quantize)");
  // A layer's tensors are its own; every other tensor goes with the layer of its transformer
  // block, or into the shards of what is left.
  const std::vector<std::string> names = weights.names();
  std::map<std::string, std::vector<std::string>> others_of;  // block → tensors that are not a layer's
  std::vector<std::string> rest;
  std::set<std::string> layer_blocks;
  for (const std::string& layer : layers) layer_blocks.insert(block_of(layer + "."));
  for (const std::string& name : names) {
    bool in_layer = false;
    for (const std::string& layer : layers)
      if (name.compare(0, layer.size() + 1, layer + ".") == 0) in_layer = true;
    if (in_layer) continue;
    const std::string block = block_of(name);
    if (!block.empty() && layer_blocks.count(block) != 0)
      others_of[block].push_back(name);
    else
      rest.push_back(name);
  }
  // The rest in shards of about 512 MiB (a larger tensor alone).
  constexpr std::uint64_t rest_shard_bytes = std::uint64_t(512) << 20;
  std::vector<std::vector<std::string>> rest_shards;
  std::uint64_t filled = rest_shard_bytes;
  for (const std::string& name : rest) {
    const std::uint64_t bytes = weights.entry(name).bytes();
    if (filled + bytes > rest_shard_bytes || rest_shards.empty()) {
      rest_shards.emplace_back();
      filled = 0;
    }
    rest_shards.back().push_back(name);
    filled += bytes;
  }
  fs::create_directories(out);
  const std::size_t shard_count = layers.size() + rest_shards.size();
  const auto shard_name = [&](std::size_t i) {
    char text[64];
    std::snprintf(text, sizeof text, "model-%05zu-of-%05zu.safetensors", i + 1, shard_count);
    return std::string(text);
  };
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  std::uint64_t total = 0;
  const auto copy_unchanged = [&](io::safetensors_writer& writer, const std::string& name) {
    const io::tensor_entry& e = weights.entry(name);
    writer.add_bytes(name, e.type, e.shape, weights.read_bytes(name));
  };
  const auto write_shard = [&](io::safetensors_writer& writer, std::size_t i) {
    writer.write(out / shard_name(i));
    for (const std::string& name : writer.names()) weight_map[name] = shard_name(i);
    return fs::file_size(out / shard_name(i));
  };
  const auto start = std::chrono::steady_clock::now();
  with_block_format(o.dtype, [&]<class Block>() {
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const std::string& layer = layers[i];
      io::safetensors_writer writer;
      tag_output(writer);
      {
        const grove::layer_parameters<Block> quantized = io::load_layer<Block>(weights, layer);
        io::add_quantized_layer(writer, quantized, layer);
      }
      for (const std::string& name : others_of[block_of(layer + ".")]) copy_unchanged(writer, name);
      others_of.erase(block_of(layer + "."));  // a block with two Grove layers copies its others once
      const std::uintmax_t bytes = write_shard(writer, i);
      total += bytes;
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const double left = elapsed / double(i + 1) * double(layers.size() - i - 1);
      std::cerr << "grove: quantize: layer " << i + 1 << " of " << layers.size() << " ('" << layer << "'): "
                << shard_name(i) << ", " << format_mib(bytes) << "; " << format_mib(total) << " written, about "
                << static_cast<long>(left + 0.5) << " s left\n";
    }
  });
  for (std::size_t r = 0; r < rest_shards.size(); ++r) {
    io::safetensors_writer writer;
    tag_output(writer);
    for (const std::string& name : rest_shards[r]) copy_unchanged(writer, name);
    total += write_shard(writer, layers.size() + r);
  }
  // The index, and config.json beside the input's (when it has one).
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_size", total}, {"grove_quantization", o.dtype}};
  index["weight_map"] = weight_map;
  {
    const std::string text = index.dump(2) + "\n";
    grove::detail::output_file file(out / io::checkpoint::index_file_name);
    file.write(text.data(), text.size());
    file.commit();
  }
  const fs::path config = input_dir / "config.json";
  if (fs::is_regular_file(config, ec)) fs::copy_file(config, out / "config.json");
  std::cout << "grove: wrote " << in_quotes(out) << ": " << layers.size() << " Grove layer(s) in " << o.dtype << ", "
            << shard_count << " shard(s), " << format_mib(total) << " in all, with "
            << io::checkpoint::index_file_name << (fs::exists(out / "config.json", ec) ? " and config.json" : "") << "\n";
  return 0;
}

inline int quantize_command(const quantize_options& o) {
  return o.prefix.empty() ? quantize_checkpoint(o) : quantize_one_layer(o);
}

}  // namespace grove_cli

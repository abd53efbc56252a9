#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "grove/config/layer_dims.hpp"
#include "grove/error.hpp"
#include "grove/io/json_reader.hpp"
#include "grove/io/messages.hpp"

GROVE_BEGIN_NAMESPACE
namespace io {

/// What a Hugging Face config.json of a GroveMoE model says about its MoE layers. Every field
/// is optional: a config need not name them all (and other models' configs name none).
struct hf_config {
  std::filesystem::path source;               ///< the file read (for messages)
  std::optional<index> top_k;                 ///< num_experts_per_tok: k
  std::optional<double> scale;                ///< small_experts_weight: λ
  std::optional<index> experts;               ///< num_experts: E
  std::optional<index> experts_per_group;     ///< num_experts_per_group: E / G
  std::optional<index> expert_intermediate;   ///< moe_intermediate_size: I
  std::optional<index> adjugate_intermediate; ///< small_experts_intermediate_size: Ia
  std::optional<index> hidden;                ///< hidden_size: H
};

/// Reads the MoE fields of a config.json (a text config nested under "text_config" is used when
/// the top level has none of them). A field that is present must have the right type: a
/// positive integer, or for small_experts_weight a finite number >= 0; anything else throws
/// grove::error naming the file and the field.
[[nodiscard]] inline hf_config parse_hf_config(const nlohmann::json& document, const std::filesystem::path& source) {
  auto fail = [&](const std::string& what) -> void {
    throw error("grove: config " + detail::quoted(source) + ": " + what);
  };
  if (!document.is_object()) fail(std::string("not a JSON object (it is ") + document.type_name() + ")");
  static constexpr const char* keys[] = {"num_experts_per_tok",  "small_experts_weight",
                                         "num_experts",          "num_experts_per_group",
                                         "moe_intermediate_size", "small_experts_intermediate_size",
                                         "hidden_size"};
  const nlohmann::json* doc = &document;
  bool any = false;
  for (const char* key : keys) any = any || document.contains(key);
  if (!any) {
    auto text = document.find("text_config");
    if (text != document.end() && text->is_object()) doc = &*text;
  }

  hf_config config;
  config.source = source;
  auto integer = [&](const char* key, std::optional<index>& out) {
    auto it = doc->find(key);
    if (it == doc->end() || it->is_null()) return;
    if (!it->is_number_unsigned() || it->get<std::uint64_t>() == 0 ||
        it->get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<std::int32_t>::max()))
      fail(std::string("\"") + key + "\" must be a positive integer, got " + detail::json_excerpt(*it));
    out = static_cast<index>(it->get<std::uint64_t>());
  };
  integer("num_experts_per_tok", config.top_k);
  integer("num_experts", config.experts);
  integer("num_experts_per_group", config.experts_per_group);
  integer("moe_intermediate_size", config.expert_intermediate);
  integer("small_experts_intermediate_size", config.adjugate_intermediate);
  integer("hidden_size", config.hidden);
  auto lambda = doc->find("small_experts_weight");
  if (lambda != doc->end() && !lambda->is_null()) {
    if (!lambda->is_number() || !std::isfinite(lambda->get<double>()) || lambda->get<double>() < 0.0)
      fail("\"small_experts_weight\" must be a finite number >= 0, got " + detail::json_excerpt(*lambda));
    config.scale = lambda->get<double>();
  }
  return config;
}

/// Reads config.json at `path` (at most 256 MiB, nested at most detail::max_json_depth deep).
[[nodiscard]] inline hf_config read_hf_config(const std::filesystem::path& path) {
  return parse_hf_config(detail::parse_json_file(path, "config"), path);
}

/// Cross-checks a config against the sizes the tensors have; throws grove::error naming the
/// field, the config's value and the tensors' value on the first mismatch. Also rejects a top-k
/// larger than E.
inline void check_hf_config(const hf_config& config, const layer_dims& dims) {
  auto check = [&](const std::optional<index>& value, index actual, const char* field, const char* symbol) {
    if (value && *value != actual)
      throw error("grove: config " + detail::quoted(config.source) + " says " + field + " = " +
                  std::to_string(*value) + " but the tensors have " + symbol + " = " + std::to_string(actual));
  };
  check(config.experts, dims.experts, "num_experts", "E");
  check(config.experts_per_group, dims.group_size(), "num_experts_per_group", "E / G");
  check(config.expert_intermediate, dims.expert_intermediate, "moe_intermediate_size", "I");
  check(config.adjugate_intermediate, dims.adjugate_intermediate, "small_experts_intermediate_size", "Ia");
  check(config.hidden, dims.hidden, "hidden_size", "H");
  if (config.top_k && *config.top_k > dims.experts)
    throw error("grove: config " + detail::quoted(config.source) + " says num_experts_per_tok = " +
                std::to_string(*config.top_k) + " (k), more than the E = " + std::to_string(dims.experts) + " experts");
}

}  // namespace io
GROVE_END_NAMESPACE

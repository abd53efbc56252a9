#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "grove/config/layer_dims.hpp"
#include "grove/error.hpp"
#include "grove/weights/check_finite.hpp"
#include "grove/weights/layer_parameters.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/io/checkpoint.hpp"
#include "grove/io/dtype.hpp"
#include "grove/io/quantized_io.hpp"
#include "grove/io/safetensors.hpp"

GROVE_BEGIN_NAMESPACE
namespace io {

/// The full checkpoint name of a layer tensor: `prefix` + "." + `relative`
/// ("model.layers.0.mlp" + "gate.weight"). An empty prefix leaves the name as it is; a prefix
/// that already ends in '.' gets no second one.
[[nodiscard]] inline std::string tensor_name(std::string_view prefix, std::string_view relative) {
  std::string name(prefix);
  if (!name.empty() && name.back() != '.') name += '.';
  return name + std::string(relative);
}

}  // namespace io

namespace detail {

/// The indices i of every tensor named `<prefix><family>.<i>.<anything>`, e.g. the 0..E-1 of
/// "experts.{e}.gate_proj.weight". Indices are plain decimal without leading zeros.
inline std::set<index> numbered_children(const std::vector<std::string>& names, const std::string& stem) {
  std::set<index> found;
  for (const std::string& name : names) {
    if (name.size() <= stem.size() || name.compare(0, stem.size(), stem) != 0) continue;
    std::size_t at = stem.size();
    std::size_t digits = 0;
    index value = 0;
    while (at + digits < name.size() && name[at + digits] >= '0' && name[at + digits] <= '9' && digits < 10) {
      value = value * 10 + (name[at + digits] - '0');
      ++digits;
    }
    if (digits == 0 || at + digits >= name.size() || name[at + digits] != '.') continue;
    if (digits > 1 && name[at] == '0') continue;
    found.insert(value);
  }
  return found;
}

/// A 2-D shape [rows, cols] from the entry, or an error naming the tensor.
inline std::pair<index, index> matrix_shape(const io::checkpoint& ckpt, const std::string& name, const char* expected) {
  const io::tensor_entry& e = ckpt.entry(name);
  if (e.shape.size() != 2)
    throw error("grove: wrong shape for tensor '" + name + "' in " + quoted(ckpt.file_of(name)) + ": expected " +
                expected + ", found " + shape_string(e.shape));
  return {static_cast<index>(e.shape[0]), static_cast<index>(e.shape[1])};
}

/// The rows of weight `name` [rows, ·], stored as itself or quantized ("<stem>.scales" has them).
inline index weight_rows(const io::checkpoint& ckpt, const std::string& name, const char* expected) {
  if (!ckpt.contains(name) && io::stored_format(ckpt, name)) {
    const io::tensor_entry& e = ckpt.entry(io::scales_name(name));
    if (e.shape.size() != 2)
      throw error("grove: wrong shape for tensor '" + io::scales_name(name) + "' in " +
                  quoted(ckpt.file_of(io::scales_name(name))) + ": expected [rows, blocks], found " + shape_string(e.shape));
    return static_cast<index>(e.shape[0]);
  }
  return matrix_shape(ckpt, name, expected).first;
}

/// " (layer prefix 'P' in checkpoint 'path')": what the loaders add to a tensor's error.
inline std::string layer_context(const io::checkpoint& ckpt, std::string_view prefix) {
  return " (layer prefix '" + std::string(prefix) + "' in checkpoint " + quoted(ckpt.path()) + ")";
}

/// True for the tensors of the adjugate experts (chunk_experts.{j}.*).
inline bool is_adjugate(tensor_role r) {
  return r == tensor_role::adjugate_gate || r == tensor_role::adjugate_up || r == tensor_role::adjugate_down;
}

/// Layer prefixes present in the checkpoint (names "<p>.chunk_experts.0.gate_proj.weight"),
/// at most `limit`, for the hint of a "missing tensor" error.
/// a < b with runs of digits compared as numbers: "layers.2" before "layers.10".
inline bool natural_less(std::string_view a, std::string_view b) {
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const bool da = a[i] >= '0' && a[i] <= '9', db = b[j] >= '0' && b[j] <= '9';
    if (da && db) {
      std::size_t ei = i, ej = j;
      while (ei < a.size() && a[ei] >= '0' && a[ei] <= '9') ++ei;
      while (ej < b.size() && b[ej] >= '0' && b[ej] <= '9') ++ej;
      // Compare the numbers: the one with more significant digits (leading zeros aside) is larger.
      std::size_t si = i, sj = j;
      while (si + 1 < ei && a[si] == '0') ++si;
      while (sj + 1 < ej && b[sj] == '0') ++sj;
      if (ei - si != ej - sj) return ei - si < ej - sj;
      const int c = a.substr(si, ei - si).compare(b.substr(sj, ej - sj));
      if (c != 0) return c < 0;
      i = ei;
      j = ej;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

/// The prefix of every Grove layer among `names` (those with "<prefix>.chunk_experts.0.gate_proj"
/// stored as itself or quantized), in natural order.
inline std::vector<std::string> grove_layer_list(const std::vector<std::string>& names) {
  std::vector<std::string> out;
  for (const std::string_view tail : {std::string_view(".chunk_experts.0.gate_proj.weight"),
                                      std::string_view(".chunk_experts.0.gate_proj.qweight")})
    for (const std::string& name : names)
      if (name.size() > tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0)
        out.push_back(name.substr(0, name.size() - tail.size()));
  std::sort(out.begin(), out.end(), natural_less);
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

inline std::string grove_layer_prefixes(const std::vector<std::string>& names, std::size_t limit = 3) {
  const std::vector<std::string> layers = grove_layer_list(names);
  std::string out;
  for (std::size_t i = 0; i < layers.size() && i < limit; ++i) out += (i ? ", " : "") + quoted_name(layers[i]);
  if (layers.size() > limit) out += ", ... (" + std::to_string(layers.size()) + " in all)";
  return out;
}

}  // namespace detail

namespace io {

/// The sizes of the routed part of a layer (router and experts), which plain MoE layers
/// (Qwen3-MoE) and Grove layers share.
struct moe_dims {
  index hidden = 0;               ///< H
  index experts = 0;              ///< E
  index expert_intermediate = 0;  ///< I
};

/// Infers H, E and I from the tensors under `prefix`, reading headers only: E and H from the
/// router `gate.weight` [E, H] (and the `experts.{e}.*` names, which must be exactly 0..E-1),
/// I from `experts.0.gate_proj.weight` [I, H]. Throws grove::error when a tensor is missing or
/// the numbering has a gap.
[[nodiscard]] inline moe_dims infer_moe_dims(const checkpoint& ckpt, std::string_view prefix) {
  const std::string router = tensor_name(prefix, "gate.weight");
  const std::vector<std::string> names = ckpt.names();
  if (!ckpt.contains(router)) {
    const std::string found = detail::grove_layer_prefixes(names);
    throw error("grove: missing tensor '" + router + "' in checkpoint " + detail::quoted(ckpt.path()) +
                ": no Grove layer under prefix '" + std::string(prefix) + "'" +
                (found.empty() ? std::string(" (the checkpoint holds no Grove layer)") : "; Grove layers found under " + found));
  }
  const auto [experts, hidden] = detail::matrix_shape(ckpt, router, "[E, H]");

  const std::string expert_stem = tensor_name(prefix, "experts.");
  const std::set<index> expert_ids = detail::numbered_children(names, expert_stem);
  if (expert_ids.empty())
    throw error("grove: missing tensor '" + expert_stem + "0.gate_proj.weight': no routed experts under prefix '" +
                std::string(prefix) + "'");
  if (*expert_ids.rbegin() >= experts)
    throw error("grove: inconsistent expert numbering under '" + std::string(prefix) + "': found '" + expert_stem +
                std::to_string(*expert_ids.rbegin()) + ".*' but '" + router + "' has E = " + std::to_string(experts) +
                " rows (experts 0.." + std::to_string(experts - 1) + ")");
  for (index e = 0; e < experts; ++e)
    if (!expert_ids.count(e))
      throw error("grove: inconsistent expert numbering under '" + std::string(prefix) + "': '" + expert_stem +
                  std::to_string(e) + ".*' is missing (a gap) but '" + router + "' has E = " + std::to_string(experts) +
                  " rows (experts 0.." + std::to_string(experts - 1) + " expected)");
  // Checked with every other shape by check_layer_tensors; a quantized file has it in ".scales".
  const index inter = detail::weight_rows(ckpt, expert_stem + "0.gate_proj.weight", "[I, H]");
  return {hidden, experts, inter};
}

/// Infers a Grove layer's sizes from the tensors under `prefix` ("model.layers.0.mlp"), reading
/// headers only: H, E and I as infer_moe_dims does, G from the `chunk_experts.{j}.*` names
/// (0..G-1), Ia from `chunk_experts.0.gate_proj.weight` [Ia, H].
/// Throws grove::error when a tensor is missing, a numbering has a gap, or G does not divide E.
[[nodiscard]] inline layer_dims infer_layer_dims(const checkpoint& ckpt, std::string_view prefix) {
  const moe_dims moe = infer_moe_dims(ckpt, prefix);
  const index experts = moe.experts;
  const std::vector<std::string> names = ckpt.names();

  const std::string adjugate_stem = tensor_name(prefix, "chunk_experts.");
  const std::set<index> group_ids = detail::numbered_children(names, adjugate_stem);
  if (group_ids.empty())
    throw error("grove: missing tensor '" + adjugate_stem + "0.gate_proj.weight': no adjugate experts under prefix '" +
                std::string(prefix) + "' (a plain MoE layer is not a Grove layer)");
  const index groups = *group_ids.rbegin() + 1;
  for (index j = 0; j < groups; ++j)
    if (!group_ids.count(j))
      throw error("grove: inconsistent adjugate numbering under '" + std::string(prefix) + "': '" + adjugate_stem +
                  std::to_string(j) + ".*' is missing (a gap) but '" + adjugate_stem + std::to_string(groups - 1) +
                  ".*' exists");
  if (experts % groups != 0)
    throw error("grove: expert count E = " + std::to_string(experts) + " is not a multiple of the group count G = " +
                std::to_string(groups) + " under prefix '" + std::string(prefix) + "'");

  const index adj_inter = detail::weight_rows(ckpt, adjugate_stem + "0.gate_proj.weight", "[Ia, H]");
  layer_dims dims{moe.hidden, experts, groups, moe.expert_intermediate, adj_inter};
  dims.validate();
  return dims;
}

/// Checks, from headers alone, that every tensor of a layer with `dims` is present under `prefix`
/// with the shape and a floating dtype grove reads; `expert_bias` may be absent. Without
/// `adjugates`, the routed part only (router, experts, bias: a plain MoE layer to upcycle).
/// Loaders call it before they allocate: a header's shapes are checked against the data its
/// file really holds only for dtypes grove knows, so an allocation sized from an unchecked
/// shape could ask for terabytes on behalf of a file of a few hundred bytes. With `groups`
/// (sorted, as for layer_parameters::shard), the router, the bias and those groups' tensors only.
inline void check_layer_tensors(const checkpoint& ckpt, std::string_view prefix, const layer_dims& dims,
                                bool adjugates = true, std::span<const index> groups = {}) {
  const weights_view<float> full(dims);
  const weights_view<float> layout = groups.empty() ? full : full.only_groups(groups);
  layout.for_each_tensor([&](const tensor_info& info, const float* const&) {
    if (!adjugates && detail::is_adjugate(info.role)) return;
    if (!layout.holds(info)) return;
    const std::string name = tensor_name(prefix, info.name);
    const bool bias = info.role == tensor_role::selection_bias;
    if (bias && !ckpt.contains(name)) return;
    // An expert's or adjugate's weight may be stored quantized (io/quantized_io.hpp).
    if (const auto quantized = info.role != tensor_role::router && !bias ? stored_format(ckpt, name) : std::nullopt) {
      if (*quantized == weight_format::q8)
        check_quantized_tensor<q8_block>(ckpt, name, info.rows, info.cols);
      else
        check_quantized_tensor<q4_block>(ckpt, name, info.rows, info.cols);
      return;
    }
    const tensor_entry& e = ckpt.entry(name);
    const tensor_shape expected = bias ? tensor_shape{info.rows} : tensor_shape{info.rows, info.cols};
    if (e.shape != expected)
      throw error("grove: wrong shape for tensor '" + name + "' in " + detail::quoted(ckpt.file_of(name)) +
                  ": expected " + detail::shape_string(expected) + ", found " + detail::shape_string(e.shape));
    if (!is_floating(e.type))
      throw error("grove: tensor '" + name + "' in " + detail::quoted(ckpt.file_of(name)) + " has unsupported dtype " +
                  detail::excerpt(e.dtype_name) + " (grove reads F32, F16, BF16 and F64 weights)");
  });
}

/// Reads the tensors of `into` (its dims say which) from the checkpoint under `prefix`,
/// converting to Scalar: the router, the experts, the adjugates when `adjugates` is set, and
/// `expert_bias` when present (left as it is otherwise). Then checks every value read is finite.
/// Throws grove::error naming the full tensor name on a missing tensor, a wrong shape, an
/// unsupported dtype or a NaN/Inf weight.
template <class Scalar>
void read_layer_tensors(const checkpoint& ckpt, std::string_view prefix, const weights_span<Scalar>& into,
                        bool adjugates) {
  into.for_each_tensor([&](const tensor_info& info, Scalar* const& data) {
    if (!adjugates && detail::is_adjugate(info.role)) return;
    if (data == nullptr) return;  // a tensor the destination keeps elsewhere (a BF16 layer's fp32 bias)
    const std::string name = tensor_name(prefix, info.name);
    const bool bias = info.role == tensor_role::selection_bias;
    if (bias && !ckpt.contains(name)) return;
    if (!bias && info.role != tensor_role::router && stored_format(ckpt, name)) {
      // Stored quantized: its exact values, as fp32, then into Scalar.
      std::vector<float> values(static_cast<std::size_t>(info.size()));
      read_as_float(ckpt, name, info.rows, info.cols, values);
      for (std::size_t i = 0; i < values.size(); ++i) data[i] = format_traits<Scalar>::from_float(values[i]);
      return;
    }
    const tensor_shape expected = bias ? tensor_shape{info.rows} : tensor_shape{info.rows, info.cols};
    ckpt.read_into(name, std::span<const std::int64_t>(expected),
                   std::span<Scalar>(data, static_cast<std::size_t>(info.size())));
  });
  try {
    check_finite(weights_view<Scalar>(into));
  } catch (const error& e) {
    throw error(std::string(e.what()) + detail::layer_context(ckpt, prefix));
  }
}

/// Reads every tensor of `into` (a block format: q8, q4) as fp32, one tensor at a time, checks
/// it is finite and quantizes it row by row; the router also goes, exact, into the fp32 routing
/// copy, so that routing is the checkpoint's. Peak memory: the quantized layer and one fp32
/// tensor.
template <weight_storage Storage>
void quantize_layer_tensors(const checkpoint& ckpt, std::string_view prefix, layer_parameters<Storage>& into) {
  std::vector<float> values;
  std::vector<Storage> rows_of_blocks;  // one tensor in ggml's row layout, before its panels
  into.span().for_each_tensor([&](const tensor_info& info, Storage* const& data) {
    if (data == nullptr || info.role == tensor_role::selection_bias) return;
    const std::string name = tensor_name(prefix, info.name);
    const index units = units_per_row<Storage>(info.cols);
    rows_of_blocks.resize(static_cast<std::size_t>(info.rows * units));
    if (info.role != tensor_role::router && stored_format(ckpt, name) == format_of<Storage>) {
      // Stored in this very format: the blocks as they are, no second quantization; repacked
      // into panels (formats/quantized.hpp), exactly.
      read_quantized_blocks(ckpt, name, info.rows, info.cols, rows_of_blocks.data());
      rows_to_panels(rows_of_blocks.data(), info.rows, units, data);
      return;
    }
    values.resize(static_cast<std::size_t>(info.size()));
    read_as_float(ckpt, name, info.rows, info.cols, values);
    // Before quantizing: a NaN would not even reach the block's scale.
    try {
      detail::require_finite(info, values.data(), info.size());
    } catch (const error& e) {
      throw error(std::string(e.what()) + detail::layer_context(ckpt, prefix));
    }
    if (info.role == tensor_role::router) std::copy(values.begin(), values.end(), into.routing_router().begin());
    for (index r = 0; r < info.rows; ++r)
      encode_row(values.data() + r * info.cols, info.cols, rows_of_blocks.data() + r * units);
    rows_to_panels(rows_of_blocks.data(), info.rows, units, data);
  });
}

/// Loads the Grove layer under `prefix` into memory of format `Storage` (float, double,
/// grove::bf16, or quantized at load: grove::q8_block, grove::q4_block; formats/weight_format.hpp):
/// sizes inferred (infer_layer_dims), every tensor decoded straight into the format from
/// BF16/F16/F32/F64 on disk (bit for bit where the dtype is the format's, otherwise rounded or
/// quantized once), `expert_bias` zero when the checkpoint has none.
/// There is no fp32 copy of the layer on the way: a BF16 layer peaks at its BF16 bytes plus the
/// fp32 router copy and bias (docs/io.md, "BF16 weights"). Only this layer's bytes are read.
/// Throws grove::error naming the full tensor name on a missing tensor, a wrong shape, an
/// unsupported dtype, or a NaN/Inf weight.
/// With `groups` (sorted ascending, without repeats), a shard (layer_parameters::shard): the
/// router, the bias and those whole groups, read from the checkpoint and nothing else, so that
/// an expert-parallel rank reads and holds its own groups' bytes only. Only those tensors are
/// checked: a tensor missing from another group is another rank's error.
template <weight_storage Storage>
[[nodiscard]] layer_parameters<Storage> load_layer(const checkpoint& ckpt, std::string_view prefix,
                                                   std::span<const index> groups = {}) {
  const layer_dims dims = infer_layer_dims(ckpt, prefix);
  check_layer_tensors(ckpt, prefix, dims, /*adjugates=*/true, groups);
  layer_parameters<Storage> parameters =
      groups.empty() ? layer_parameters<Storage>(dims) : layer_parameters<Storage>::shard(dims, groups);
  if constexpr (is_block_format<Storage>)
    quantize_layer_tensors(ckpt, prefix, parameters);
  else
    read_layer_tensors(ckpt, prefix, parameters.span(), /*adjugates=*/true);
  using routing_scalar = typename layer_parameters<Storage>::routing_scalar;
  if constexpr (!std::is_same_v<routing_scalar, Storage>) {
    // The bias is kept in the routing type, not the format's: read and checked by the same
    // mechanism, through a view that holds only it.
    weights_span<routing_scalar> bias_only(dims);
    bias_only.set_bias(parameters.bias().data());
    read_layer_tensors(ckpt, prefix, bias_only, /*adjugates=*/false);
  }
  parameters.refresh_routing();
  return parameters;
}

/// Same, opening `path` (a .safetensors file or a checkpoint directory).
template <weight_storage Storage>
[[nodiscard]] layer_parameters<Storage> load_layer(const std::filesystem::path& path, std::string_view prefix,
                                                   std::span<const index> groups = {}) {
  return load_layer<Storage>(checkpoint(path), prefix, groups);
}

/// The prefixes of the checkpoint's Grove layers ("model.layers.0.mlp", …), in natural order.
[[nodiscard]] inline std::vector<std::string> grove_layers(const checkpoint& ckpt) {
  return detail::grove_layer_list(ckpt.names());
}

/// The format an expert's weights are stored in under `prefix`: q8 or q4 for a quantized file,
/// f32 for any floating dtype (what `grove run` holds them in unless told otherwise).
[[nodiscard]] inline weight_format stored_layer_format(const checkpoint& ckpt, std::string_view prefix) {
  return stored_format(ckpt, tensor_name(prefix, "experts.0.gate_proj.weight")).value_or(weight_format::f32);
}

/// Adds a block-format layer to `writer` under `prefix` (io/quantized_io.hpp): the router (its
/// fp32 routing copy) and the bias as F32, every expert and adjugate tensor as "<stem>.qweight"
/// and "<stem>.scales", and the file's "grove_quantization" tag.
template <class Block>
void add_quantized_layer(safetensors_writer& writer, const layer_parameters<Block>& parameters, std::string_view prefix)
  requires(is_block_format<Block>)
{
  const weights_view<Block> view = parameters.view();
  view.require_complete();
  writer.set_metadata(quantization_key, std::string(info_of<Block>().name));
  const weights_view<float> routing = parameters.routing_view();
  const layer_dims& d = parameters.dims();
  writer.add(tensor_name(prefix, "gate.weight"), tensor_shape{d.experts, d.hidden},
             std::span<const float>(routing.router().data(), static_cast<std::size_t>(d.experts * d.hidden)), dtype::f32);
  std::vector<Block> rows_of_blocks;
  view.for_each_tensor([&](const tensor_info& info, const Block* const& data) {
    if (info.role == tensor_role::router || info.role == tensor_role::selection_bias || data == nullptr) return;
    // Files keep ggml's row layout; memory holds panels (formats/quantized.hpp).
    const index units = units_per_row<Block>(info.cols);
    rows_of_blocks.resize(static_cast<std::size_t>(info.rows * units));
    panels_to_rows(data, info.rows, units, rows_of_blocks.data());
    add_quantized_tensor(writer, tensor_name(prefix, info.name), rows_of_blocks.data(), info.rows, info.cols);
  });
  writer.add(tensor_name(prefix, "expert_bias"), tensor_shape{d.experts},
             std::span<const float>(parameters.bias().data(), parameters.bias().size()), dtype::f32);
}

/// Adds every tensor of `weights` to `writer` under `prefix` with the checkpoint names, stored as
/// `stored`. The selection bias is written when `include_bias` (zeros when the view has none).
template <class Scalar>
void add_layer(safetensors_writer& writer, const weights_view<Scalar>& weights, std::string_view prefix,
               dtype stored = dtype::f32, bool include_bias = true) {
  weights.require_complete();
  const std::vector<Scalar> zeros(static_cast<std::size_t>(weights.dims().experts), Scalar(0));
  weights.for_each_tensor([&](const tensor_info& info, const Scalar* const& data) {
    const bool bias = info.role == tensor_role::selection_bias;
    if (bias && !include_bias) return;
    const Scalar* values = (bias && data == nullptr) ? zeros.data() : data;
    const tensor_shape shape = bias ? tensor_shape{info.rows} : tensor_shape{info.rows, info.cols};
    writer.add(tensor_name(prefix, info.name), shape,
               std::span<const Scalar>(values, static_cast<std::size_t>(info.size())), stored);
  });
}

/// Writes one layer's weights to a .safetensors file, names as in Hugging Face checkpoints.
template <class Scalar>
void save_layer(const std::filesystem::path& path, const weights_view<Scalar>& weights, std::string_view prefix,
                dtype stored = dtype::f32) {
  safetensors_writer writer;
  writer.set_metadata("format", "pt");
  add_layer(writer, weights, prefix, stored);
  writer.write(path);
}

}  // namespace io
GROVE_END_NAMESPACE

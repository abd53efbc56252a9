#pragma once

#include <string>
#include <string_view>

#include "grove/config/layer_dims.hpp"
#include "grove/error.hpp"
#include "grove/weights/layer_parameters.hpp"
#include "grove/io/checkpoint.hpp"
#include "grove/io/layer_io.hpp"
#include "grove/weights/upcycle.hpp"

GROVE_BEGIN_NAMESPACE
namespace io {

/// Upcycles the plain MoE layer under `prefix` (router `gate.weight` and experts
/// `experts.{e}.*`, Qwen3-MoE names) into a Grove layer with `options.groups` adjugates of size
/// `options.adjugate_intermediate`: router, experts and `expert_bias` are copied, adjugate gate/up
/// drawn from N(0, stddev²), adjugate down zero, so the layer computes exactly what the plain one
/// did (docs/training.md, "Upcycling"). Only this layer's bytes are read, and nothing is
/// allocated before every tensor's shape and dtype have been checked from the headers.
template <class Scalar>
[[nodiscard]] layer_parameters<Scalar> upcycle_layer(const checkpoint& ckpt, std::string_view prefix,
                                                     const upcycle_options& options) {
  const moe_dims moe = infer_moe_dims(ckpt, prefix);
  if (ckpt.contains(tensor_name(prefix, "chunk_experts.0.gate_proj.weight")))
    throw error("grove: upcycle: the layer under prefix '" + std::string(prefix) +
                "' already has adjugate experts (chunk_experts.*): it is a Grove layer already");
  const layer_dims dims{moe.hidden, moe.experts, options.groups, moe.expert_intermediate,
                        options.adjugate_intermediate};
  dims.validate();  // G divides E, Ia > 0, sizes that do not overflow
  // Shapes and dtypes from the headers before anything is allocated: the allocation is then
  // bounded by the bytes the files hold (and the adjugates the options ask for).
  check_layer_tensors(ckpt, prefix, dims, /*adjugates=*/false);
  layer_parameters<Scalar> parameters(dims);
  read_layer_tensors(ckpt, prefix, parameters.span(), /*adjugates=*/false);
  initialize_adjugates(parameters.span(), options.seed, options.stddev);
  return parameters;
}

}  // namespace io
GROVE_END_NAMESPACE

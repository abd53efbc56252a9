#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "grove/config/layer_dims.hpp"
#include "grove/error.hpp"
#include "grove/weights/layer_parameters.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/random.hpp"

GROVE_BEGIN_NAMESPACE

/// How the adjugates of an upcycled layer start (docs/math.md, "Upcycling").
struct upcycle_options {
  index groups = 0;                 ///< G, must divide E
  index adjugate_intermediate = 0;  ///< Ia
  std::uint64_t seed = 0;           ///< for the adjugates' gate/up draws
  double stddev = 0.006;            ///< gate/up ~ N(0, stddev²); the paper's 0.006
};

/// Sets every adjugate of `weights` to its upcycling start: gate and up drawn from
/// N(0, stddev²) with detail::normal_generator(seed) (adjugate 0 gate, up, adjugate 1 gate, up,
/// … each row-major), down projections exactly zero. Router, experts and bias are untouched.
/// With zero down projections every adjugate output is ±0 and adding it changes no bit of y,
/// so the layer computes what it computed before (docs/training.md, "Upcycling").
template <class Scalar>
void initialize_adjugates(const weights_span<Scalar>& weights, std::uint64_t seed, double stddev = 0.006) {
  detail::require(std::isfinite(stddev) && stddev >= 0.0,
                  "grove: the adjugate init stddev must be finite and >= 0, got " + std::to_string(stddev));
  detail::normal_generator gen(seed);
  for (index j = 0; j < weights.dims().groups; ++j) {
    swiglu_weights<Scalar> a = weights.adjugate(j);
    detail::require(a.gate.data() && a.up.data() && a.down.data(),
                    "grove: missing tensor 'chunk_experts." + std::to_string(j) + ".*' to initialise");
    for (Scalar* m : {a.gate.data(), a.up.data()})
      for (index i = 0; i < a.gate.size(); ++i) m[i] = static_cast<Scalar>(stddev * gen.normal());
    a.down.setZero();
  }
}

/// Builds a Grove layer from a plain MoE layer (router + E SwiGLU experts, Qwen3-MoE names,
/// which grove shares): `source(const tensor_info&)` returns a pointer to the data of each
/// tensor it is asked for, `gate.weight`, `experts.{e}.{gate,up,down}_proj.weight` (row-major,
/// shape info.rows × info.cols) and `expert_bias` (nullptr for none: zero). `moe` gives H, E
/// and I; the adjugates are sized by `options` and set by initialize_adjugates.
template <class Scalar, class Source>
[[nodiscard]] layer_parameters<Scalar> upcycle(index hidden, index experts, index expert_intermediate, Source&& source,
                                               const upcycle_options& options) {
  const layer_dims dims{hidden, experts, options.groups, expert_intermediate, options.adjugate_intermediate};
  layer_parameters<Scalar> grove(dims);
  grove.span().for_each_tensor([&](const tensor_info& info, Scalar*& dst) {
    switch (info.role) {
      case tensor_role::adjugate_gate:
      case tensor_role::adjugate_up:
      case tensor_role::adjugate_down:
        return;
      default:
        break;
    }
    const Scalar* src = source(info);
    if (info.role == tensor_role::selection_bias) {
      if (src) std::copy(src, src + info.size(), dst);
      return;
    }
    detail::require(src != nullptr, "grove: upcycle: the plain MoE layer has no tensor '" + info.name + "'");
    std::copy(src, src + info.size(), dst);
  });
  initialize_adjugates<Scalar>(grove.span(), options.seed, options.stddev);
  return grove;
}

/// The same from the router, experts and bias of a weights view (its adjugates, if any, are
/// ignored; a plain MoE can be described with any G and Ia, e.g. 1 and 1, and null adjugates).
template <class T>
[[nodiscard]] layer_parameters<std::remove_const_t<T>> upcycle(const layer_weights<T>& moe,
                                                               const upcycle_options& options) {
  using Scalar = std::remove_const_t<T>;
  const layer_dims& d = moe.dims();
  return upcycle<Scalar>(
      d.hidden, d.experts, d.expert_intermediate,
      [&](const tensor_info& want) -> const Scalar* {
        switch (want.role) {
          case tensor_role::router:
            return moe.router().data();
          case tensor_role::expert_gate:
            return moe.expert(want.owner).gate.data();
          case tensor_role::expert_up:
            return moe.expert(want.owner).up.data();
          case tensor_role::expert_down:
            return moe.expert(want.owner).down.data();
          case tensor_role::selection_bias:
            return moe.bias();
          default:
            return nullptr;
        }
      },
      options);
}

GROVE_END_NAMESPACE

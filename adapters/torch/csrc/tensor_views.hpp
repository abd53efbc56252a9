#pragma once

// Torch tensors seen as grove buffers, without copies: x, y and the gradients as Eigen maps, and
// a layer's tensors (the released block's, one tensor per projection) as a grove weights view.
// Every check names the tensor by its name in the released block's state_dict.

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <grove/error.hpp>
#include <grove/formats/bf16.hpp>
#include <grove/weights/layer_weights.hpp>
#include <grove/weights/tensor_types.hpp>

namespace grove_torch::detail {

using grove::index;

/// The torch dtype of a grove element type.
template <class T>
constexpr at::ScalarType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return at::kFloat;
  else if constexpr (std::is_same_v<T, double>) return at::kDouble;
  else return at::kBFloat16;
}

inline std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

/// Throws grove::error unless `t` is a contiguous CPU tensor of `dtype` and shape [rows, cols].
inline void require_matrix(const at::Tensor& t, const std::string& name, at::ScalarType dtype, int64_t rows,
                           int64_t cols) {
  grove::detail::require(t.defined(), "grove_torch: tensor '" + name + "' is undefined");
  grove::detail::require(t.device().is_cpu(), "grove_torch: tensor '" + name + "' is on " + t.device().str() +
                                                  "; grove_torch runs on the CPU (move it with .cpu())");
  grove::detail::require(t.scalar_type() == dtype, "grove_torch: tensor '" + name + "' has dtype " +
                                                       std::string(c10::toString(t.scalar_type())) + " but must be " +
                                                       c10::toString(dtype) + " like the layer's weights");
  grove::detail::require(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols,
                         "grove_torch: tensor '" + name + "' has shape " + shape_of(t) + " but must be [" +
                             std::to_string(rows) + ", " + std::to_string(cols) + "]");
  grove::detail::require(t.is_contiguous(), "grove_torch: tensor '" + name +
                                                "' is not contiguous (row-major); call .contiguous() first");
}

/// A [rows, cols] tensor checked by require_matrix, as an Eigen map (no copy).
template <class T>
Eigen::Map<grove::row_matrix<T>> rows_of(const at::Tensor& t) {
  return {reinterpret_cast<T*>(t.data_ptr()), t.size(0), t.size(1)};
}
template <class T>
Eigen::Map<const grove::row_matrix<T>> const_rows_of(const at::Tensor& t) {
  return {reinterpret_cast<const T*>(t.data_ptr()), t.size(0), t.size(1)};
}

/// A layer's tensors as the released block lists them: the router `gate.weight` [E, H], the
/// optional `expert_bias` [E], and for each routed expert e and each adjugate j its three
/// projections in the order gate, up, down (`experts.{e}.gate_proj.weight`, ...,
/// `chunk_experts.{j}.down_proj.weight`).
struct layer_tensors {
  at::Tensor router;
  std::optional<at::Tensor> bias;
  std::vector<at::Tensor> experts;    // 3E
  std::vector<at::Tensor> adjugates;  // 3G
};

inline const char* projection_name(std::size_t i) {
  static const char* names[] = {"gate_proj", "up_proj", "down_proj"};
  return names[i % 3];
}

/// The layer's sizes, read off its tensors and validated (G divides E, every size positive).
inline grove::layer_dims dims_of(const layer_tensors& w) {
  grove::detail::require(w.router.defined() && w.router.dim() == 2,
                         "grove_torch: tensor 'gate.weight' (the router) must be a matrix [E, H], got " +
                             (w.router.defined() ? shape_of(w.router) : std::string("undefined")));
  const index experts = w.router.size(0), hidden = w.router.size(1);
  grove::detail::require(static_cast<index>(w.experts.size()) == 3 * experts,
                         "grove_torch: the router 'gate.weight' has E = " + std::to_string(experts) +
                             " rows, so 3·E = " + std::to_string(3 * experts) + " expert tensors are needed; got " +
                             std::to_string(w.experts.size()));
  grove::detail::require(!w.adjugates.empty() && w.adjugates.size() % 3 == 0,
                         "grove_torch: the adjugates 'chunk_experts.*' must come as 3 tensors each (gate, up, down); got " +
                             std::to_string(w.adjugates.size()));
  const auto groups = static_cast<index>(w.adjugates.size() / 3);
  grove::detail::require(w.experts[0].dim() == 2 && w.adjugates[0].dim() == 2,
                         "grove_torch: 'experts.0.gate_proj.weight' and 'chunk_experts.0.gate_proj.weight' must be matrices");
  grove::layer_dims dims{hidden, experts, groups, w.experts[0].size(0), w.adjugates[0].size(0)};
  grove::detail::require(groups <= experts && experts % groups == 0,
                         "grove_torch: the " + std::to_string(groups) + " adjugates (groups G) must divide the " +
                             std::to_string(experts) + " experts E into groups of E / G");
  dims.validate();
  return dims;
}

/// The tensors of `w` as a grove weights view of element type W (no copy), every tensor checked.
template <class W>
grove::weights_view<W> view_of(const layer_tensors& w, const grove::layer_dims& d) {
  constexpr at::ScalarType dtype = dtype_of<W>();
  require_matrix(w.router, "gate.weight", dtype, d.experts, d.hidden);
  grove::weights_view<W> view(d);
  view.set_router(reinterpret_cast<const W*>(w.router.data_ptr()));
  if (w.bias && w.bias->defined()) {
    const at::Tensor& b = *w.bias;
    grove::detail::require(b.dim() == 1 && b.size(0) == d.experts,
                           "grove_torch: tensor 'expert_bias' has shape " + shape_of(b) + " but must be [" +
                               std::to_string(d.experts) + "]");
    require_matrix(b.view({1, d.experts}), "expert_bias", dtype, 1, d.experts);
    view.set_bias(reinterpret_cast<const W*>(b.data_ptr()));
  }
  auto bind = [&](const std::vector<at::Tensor>& list, const char* stem, index count, index inter, auto set) {
    for (index i = 0; i < count; ++i) {
      const W* p[3];
      for (std::size_t m = 0; m < 3; ++m) {
        const at::Tensor& t = list[static_cast<std::size_t>(3 * i) + m];
        const std::string name = std::string(stem) + std::to_string(i) + "." + projection_name(m) + ".weight";
        if (m < 2)
          require_matrix(t, name, dtype, inter, d.hidden);
        else
          require_matrix(t, name, dtype, d.hidden, inter);
        p[m] = reinterpret_cast<const W*>(t.data_ptr());
      }
      set(i, p[0], p[1], p[2]);
    }
  };
  bind(w.experts, "experts.", d.experts, d.expert_intermediate,
       [&](index e, const W* g, const W* u, const W* dn) { view.set_expert(e, g, u, dn); });
  bind(w.adjugates, "chunk_experts.", d.groups, d.adjugate_intermediate,
       [&](index j, const W* g, const W* u, const W* dn) { view.set_adjugate(j, g, u, dn); });
  return view;
}

/// Zeroed gradient tensors for the groups a batch touched (their experts and adjugate) and the
/// router, and a writable grove view of them that holds just those groups. The other experts'
/// tensors stay undefined (None in Python, as autograd gives an unused parameter): a decode batch
/// touches a few groups, and zero-filling every expert's gradient would cost more than the pass.
template <class S>
struct layer_gradients {
  at::Tensor router;
  std::vector<at::Tensor> experts, adjugates;
  grove::weights_span<S> span;

  layer_gradients(const layer_tensors& w, const grove::layer_dims& d, const std::vector<index>& touched_groups)
      : experts(w.experts.size()), adjugates(w.adjugates.size()), span(d) {
    const auto options = at::TensorOptions().dtype(dtype_of<S>());
    auto ptr = [](at::Tensor& t) { return reinterpret_cast<S*>(t.data_ptr()); };
    router = at::zeros(w.router.sizes(), options);
    span.set_router(ptr(router));
    const index group_size = d.group_size();
    for (const index j : touched_groups) {
      for (std::size_t m = 0; m < 3; ++m) {
        const std::size_t a = static_cast<std::size_t>(3 * j) + m;
        adjugates[a] = at::zeros(w.adjugates[a].sizes(), options);
      }
      span.set_adjugate(j, ptr(adjugates[3 * j]), ptr(adjugates[3 * j + 1]), ptr(adjugates[3 * j + 2]));
      for (index e = j * group_size; e < (j + 1) * group_size; ++e) {
        for (std::size_t m = 0; m < 3; ++m) {
          const std::size_t a = static_cast<std::size_t>(3 * e) + m;
          experts[a] = at::zeros(w.experts[a].sizes(), options);
        }
        span.set_expert(e, ptr(experts[3 * e]), ptr(experts[3 * e + 1]), ptr(experts[3 * e + 2]));
      }
    }
    if (!touched_groups.empty()) span = span.only_groups(touched_groups);
  }
};

}  // namespace grove_torch::detail

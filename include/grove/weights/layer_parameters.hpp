#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "grove/config/layer_dims.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/random.hpp"

GROVE_BEGIN_NAMESPACE

/// A layer's weights, owned. The trainable tensors (router, experts, adjugates) lie in one flat
/// buffer in checkpoint order, so an optimizer or a gradient accumulator treats them as one
/// vector; the selection bias is a separate buffer because it is not trained by gradients
/// (docs/math.md, "Load balancing"). Gradients of a layer are a layer_parameters too.
template <class Scalar>
class layer_parameters {
 public:
  layer_parameters() = default;

  /// All tensors zero, bias zero.
  explicit layer_parameters(const layer_dims& dims)
      : dims_(dims), values_(static_cast<std::size_t>((dims.validate(), total_parameters(dims))), Scalar(0)),
        bias_(static_cast<std::size_t>(dims.experts), Scalar(0)) {}

  /// Every trainable weight drawn from N(0, stddev²) with a fixed, portable generator; bias zero.
  static layer_parameters random(const layer_dims& dims, std::uint64_t seed, double stddev) {
    layer_parameters p(dims);
    detail::normal_generator gen(seed);
    for (Scalar& v : p.values_) v = static_cast<Scalar>(stddev * gen.normal());
    return p;
  }

  [[nodiscard]] const layer_dims& dims() const { return dims_; }

  /// Read-only view; valid while this object lives (moving it keeps the buffers).
  [[nodiscard]] weights_view<Scalar> view() const { return bind<const Scalar>(values_.data(), bias_.data()); }
  /// Writable view.
  [[nodiscard]] weights_span<Scalar> span() { return bind<Scalar>(values_.data(), bias_.data()); }

  /// The trainable weights as one vector (router, experts, adjugates, in checkpoint order).
  [[nodiscard]] std::span<Scalar> values() { return values_; }
  [[nodiscard]] std::span<const Scalar> values() const { return values_; }
  /// The selection bias b, [E].
  [[nodiscard]] std::span<Scalar> bias() { return bias_; }
  [[nodiscard]] std::span<const Scalar> bias() const { return bias_; }

  /// Bytes held: every tensor and the bias, in Scalar.
  [[nodiscard]] std::size_t bytes() const { return (values_.size() + bias_.size()) * sizeof(Scalar); }
  /// What bytes() is for a layer of these dims.
  [[nodiscard]] static std::size_t bytes_for(const layer_dims& dims) {
    return static_cast<std::size_t>(total_parameters(dims) + dims.experts) * sizeof(Scalar);
  }

  /// Sets every trainable weight to zero (gradients between steps); the bias is untouched.
  void zero_values() { std::fill(values_.begin(), values_.end(), Scalar(0)); }

 private:
  template <class T>
  layer_weights<T> bind(T* values, T* bias) const {
    layer_weights<T> w(dims_);
    T* cursor = values;
    w.for_each_tensor([&](const tensor_info& info, T*& p) {
      if (info.role == tensor_role::selection_bias) {
        p = bias;
      } else {
        p = cursor;
        cursor += info.size();
      }
    });
    return w;
  }

  layer_dims dims_{};
  std::vector<Scalar> values_;
  std::vector<Scalar> bias_;
};

GROVE_END_NAMESPACE

#pragma once

#include <cmath>
#include <span>
#include <string>
#include <type_traits>

#include "grove/config/dynamic.hpp"
#include "grove/error.hpp"
#include "grove/weights/tensor_types.hpp"

GROVE_BEGIN_NAMESPACE

/// RMSNorm, the normalisation around Qwen3-MoE's (and GroveMoE's) MoE blocks, for small models
/// built around Grove layers: per row t, y_t = γ ⊙ x_t · r_t with r_t = 1 / √(mean(x_t²) + ε).
/// `y` [T, H] is written.
template <class Scalar>
void rms_norm(std::type_identity_t<const_rows_ref<Scalar>> x, std::span<const Scalar> gain, double epsilon,
              std::type_identity_t<rows_ref<Scalar>> y) {
  detail::require(static_cast<index>(gain.size()) == x.cols() && y.rows() == x.rows() && y.cols() == x.cols(),
                  "grove: rms_norm wants x and y [T, H] and a gain of H = " + std::to_string(x.cols()) +
                      " entries, got a gain of " + std::to_string(gain.size()));
  const Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> g(gain.data(), x.cols());
  for (index t = 0; t < x.rows(); ++t) {
    const Scalar r = Scalar(1) / std::sqrt(x.row(t).squaredNorm() / Scalar(x.cols()) + Scalar(epsilon));
    y.row(t) = x.row(t).cwiseProduct(g) * r;
  }
}

/// Backward of rms_norm given dy = ∂L/∂y; ADDS ∂L/∂x to `dx` and ∂L/∂γ to `dgain`:
///   ∂γ += Σ_t dy_t ⊙ x_t r_t;  dx_t += r_t (γ ⊙ dy_t) − r_t³ x_t ⟨γ ⊙ dy_t, x_t⟩ / H.
template <class Scalar>
void rms_norm_backward(std::type_identity_t<const_rows_ref<Scalar>> x, std::span<const Scalar> gain, double epsilon,
                       std::type_identity_t<const_rows_ref<Scalar>> dy, std::type_identity_t<rows_ref<Scalar>> dx,
                       std::span<Scalar> dgain) {
  const index h = x.cols();
  detail::require(
      static_cast<index>(gain.size()) == h && static_cast<index>(dgain.size()) == h && dy.rows() == x.rows() &&
          dy.cols() == h && dx.rows() == x.rows() && dx.cols() == h,
      "grove: rms_norm_backward wants x, dy, dx [T, H] and gain, dgain of H = " + std::to_string(h) + " entries");
  const Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> g(gain.data(), h);
  Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> dg(dgain.data(), h);
  for (index t = 0; t < x.rows(); ++t) {
    const Scalar r = Scalar(1) / std::sqrt(x.row(t).squaredNorm() / Scalar(h) + Scalar(epsilon));
    dg += dy.row(t).cwiseProduct(x.row(t)) * r;
    const Scalar proj = dy.row(t).cwiseProduct(g).dot(x.row(t));
    dx.row(t) += dy.row(t).cwiseProduct(g) * r - x.row(t) * (r * r * r * proj / Scalar(h));
  }
}

GROVE_END_NAMESPACE

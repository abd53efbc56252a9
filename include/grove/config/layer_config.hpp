#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "grove/config/dynamic.hpp"
#include "grove/config/layer_dims.hpp"
#include "grove/error.hpp"
#include "grove/formats/weight_format.hpp"

GROVE_BEGIN_NAMESPACE

/// Compile-time description of a Grove layer: expert count E, group count G, top-k and the
/// adjugate scale λ, each either fixed or `dynamic` (`dynamic_scale` for λ), plus the scalar
/// type and the scale-bound policy. What is fixed is checked here, at compile time; what is
/// dynamic is checked by the constructor. Sizes that only weights determine (H, I, Ia) are
/// always run-time values. `Scalar` is the format the weights are held in (float, double or
/// grove::bf16, formats/weight_format.hpp).
///
///   using inst = grove::layer_config<128, 64, 8, grove::ratio<1, 20>>;   // GroveMoE-Inst
///   using any  = grove::layer_config<>;                                  // all from a file
template <int Experts = dynamic, int Groups = dynamic, int TopK = dynamic,
          class Scale = dynamic_scale, class Scalar = float,
          class ScaleBound = check_scale_bound>
class layer_config {
  static_assert(weight_storage<Scalar>, "GROVE_SCALAR_MUST_BE_A_WEIGHT_FORMAT_FLOAT_DOUBLE_OR_BF16");
  static_assert(Experts == dynamic || Experts >= 1, "GROVE_EXPERT_COUNT_MUST_BE_POSITIVE");
  static_assert(Groups == dynamic || Groups >= 1, "GROVE_GROUP_COUNT_MUST_BE_POSITIVE");
  static_assert(Experts == dynamic || Groups == dynamic || Experts % Groups == 0,
                "GROVE_GROUP_COUNT_MUST_DIVIDE_EXPERT_COUNT");
  static_assert(TopK == dynamic || TopK >= 1, "GROVE_TOP_K_MUST_BE_AT_LEAST_ONE");
  static_assert(TopK == dynamic || Experts == dynamic || TopK <= Experts,
                "GROVE_TOP_K_MUST_NOT_EXCEED_EXPERT_COUNT");

  static constexpr bool scale_is_fixed = !std::is_same_v<Scale, dynamic_scale>;
  template <class S>
  static constexpr bool scale_is_nonnegative() {
    if constexpr (std::is_same_v<S, dynamic_scale>) return true;
    else return S::num >= 0;
  }
  // λ <= G / E  <=>  num * E <= G * den (den > 0), exact in integers.
  template <class S>
  static constexpr bool scale_within_paper_bound() {
    if constexpr (std::is_same_v<S, dynamic_scale> || Experts == dynamic || Groups == dynamic ||
                  !ScaleBound::enforced)
      return true;
    else return S::num * Experts <= static_cast<std::intmax_t>(Groups) * S::den;
  }
  static_assert(scale_is_nonnegative<Scale>(), "GROVE_SCALE_MUST_BE_NONNEGATIVE");
  static_assert(scale_within_paper_bound<Scale>(),
                "GROVE_SCALE_EXCEEDS_PAPER_BOUND_G_OVER_E__USE_unchecked_scale_bound_TO_OPT_OUT");

 public:
  using scalar = Scalar;
  using scale_bound = ScaleBound;
  static constexpr int experts_at_compile_time = Experts;
  static constexpr int groups_at_compile_time = Groups;
  static constexpr int top_k_at_compile_time = TopK;
  static constexpr bool has_fixed_scale = scale_is_fixed;

  /// For configurations whose top-k and λ are fixed at compile time.
  explicit layer_config(const layer_dims& dims)
    requires(TopK != dynamic && scale_is_fixed)
      : layer_config(dims, TopK, fixed_scale()) {}

  /// The general form; a top_k or scale fixed at compile time must match the argument.
  layer_config(const layer_dims& dims, index top_k, double scale)
      : dims_(dims), top_k_(top_k), scale_(scale) {
    validate();
  }

  [[nodiscard]] const layer_dims& dims() const { return dims_; }
  [[nodiscard]] index hidden() const { return dims_.hidden; }
  [[nodiscard]] index experts() const { return dims_.experts; }
  [[nodiscard]] index groups() const { return dims_.groups; }
  [[nodiscard]] index group_size() const { return dims_.group_size(); }
  [[nodiscard]] index expert_intermediate() const { return dims_.expert_intermediate; }
  [[nodiscard]] index adjugate_intermediate() const { return dims_.adjugate_intermediate; }
  [[nodiscard]] index top_k() const { return top_k_; }
  [[nodiscard]] double scale() const { return scale_; }

 private:
  static constexpr double fixed_scale() {
    if constexpr (scale_is_fixed) return Scale::value;
    else return 0.0;
  }

  void validate() const {
    using std::to_string;
    dims_.validate();
    if constexpr (Experts != dynamic)
      detail::require(dims_.experts == Experts, "grove: this layer_config fixes E = " +
                                                    to_string(Experts) + " but the weights have E = " +
                                                    to_string(dims_.experts));
    if constexpr (Groups != dynamic)
      detail::require(dims_.groups == Groups, "grove: this layer_config fixes G = " +
                                                  to_string(Groups) + " but the weights have G = " +
                                                  to_string(dims_.groups));
    if constexpr (TopK != dynamic)
      detail::require(top_k_ == TopK, "grove: this layer_config fixes k = " + to_string(TopK) +
                                          " but k = " + to_string(top_k_) + " was given");
    if constexpr (scale_is_fixed)
      detail::require(scale_ == Scale::value,
                      "grove: this layer_config fixes the scale λ = " + to_string(Scale::value) +
                          " but λ = " + to_string(scale_) + " was given");
    detail::require(top_k_ >= 1, "grove: top-k must be at least 1, got k = " + to_string(top_k_));
    detail::require(top_k_ <= dims_.experts, "grove: top-k k = " + to_string(top_k_) +
                                                 " exceeds the expert count E = " +
                                                 to_string(dims_.experts));
    detail::require(std::isfinite(scale_) && scale_ >= 0.0,
                    "grove: the adjugate scale λ must be finite and >= 0, got " + to_string(scale_));
    if constexpr (ScaleBound::enforced) {
      // Compare λ·E <= G exactly enough: a one-ulp slack so that λ = G/E typed as a decimal passes.
      const double bound = static_cast<double>(dims_.groups) / static_cast<double>(dims_.experts);
      detail::require(scale_ <= bound * (1.0 + 1e-12),
                      "grove: the adjugate scale λ = " + to_string(scale_) +
                          " exceeds the paper's bound G / E = " + to_string(bound) +
                          "; use grove::unchecked_scale_bound to opt out");
    }
  }

  layer_dims dims_;
  index top_k_;
  double scale_;
};

/// Every size and λ decided at run time, for layers read from checkpoints.
template <class Scalar = float, class ScaleBound = check_scale_bound>
using dynamic_config = layer_config<dynamic, dynamic, dynamic, dynamic_scale, Scalar, ScaleBound>;

/// The released GroveMoE-Inst layer: E = 128, G = 64, k = 8, λ = 0.05 (H = 2048, I = 768, Ia = 128).
template <class Scalar = float>
using grove_moe_inst_config = layer_config<128, 64, 8, ratio<1, 20>, Scalar>;

/// The released GroveMoE-Inst sizes, for grove_moe_inst_config or for experiments at full scale.
inline constexpr layer_dims grove_moe_inst_dims{2048, 128, 64, 768, 128};

namespace detail {
template <class T>
struct is_layer_config : std::false_type {};
template <int E, int G, int K, class S, class T, class B>
struct is_layer_config<layer_config<E, G, K, S, T, B>> : std::true_type {};
}  // namespace detail

/// Satisfied by every grove::layer_config instantiation.
template <class T>
concept layer_configuration = detail::is_layer_config<T>::value;

GROVE_END_NAMESPACE

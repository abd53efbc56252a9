#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <span>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <Eigen/Core>

#include "grove/config/layer_dims.hpp"
#include "grove/error.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/bf16.hpp"

GROVE_BEGIN_NAMESPACE

namespace detail {

/// Allocator for large weight buffers: blocks of 2 MiB or more are 2 MiB aligned and, on Linux,
/// advised to use transparent huge pages (MADV_HUGEPAGE). The expert kernels stream weights at
/// memory bandwidth; with 4 KiB pages every 4 KiB of a multi-gigabyte layer is a TLB miss and
/// a page walk whose tables do not fit in cache (docs/performance.md, "Memory").
template <class T>
struct huge_page_allocator {
  using value_type = T;
  static constexpr std::size_t huge_page = std::size_t(2) << 20;

  huge_page_allocator() = default;
  template <class U>
  huge_page_allocator(const huge_page_allocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor)

  T* allocate(std::size_t n) {
    const std::size_t bytes = n * sizeof(T);
    if (bytes < huge_page) return static_cast<T*>(::operator new(bytes, std::align_val_t{64}));
    void* p = ::operator new(rounded(bytes), std::align_val_t{huge_page});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)::madvise(p, rounded(bytes), MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    const std::size_t bytes = n * sizeof(T);
    if (bytes < huge_page)
      ::operator delete(p, std::align_val_t{64});
    else
      ::operator delete(p, std::align_val_t{huge_page});
  }
  template <class U>
  friend bool operator==(const huge_page_allocator&, const huge_page_allocator<U>&) noexcept {
    return true;
  }

 private:
  static std::size_t rounded(std::size_t bytes) { return (bytes + huge_page - 1) / huge_page * huge_page; }
};

}  // namespace detail

/// A layer's weights kept in BF16, as the released checkpoints store them (docs/performance.md,
/// "BF16 weights"): every tensor is bfloat16 in memory, in one flat buffer in checkpoint order
/// and PyTorch's [out, in] layout, so the CPU kernels read half the bytes of fp32 and accumulate
/// in fp32. Routing needs the router in fp32 (logits are always fp32, docs/math.md step 1): an
/// fp32 copy of the bf16 router (exact) and the fp32 selection bias are kept beside it, and
/// routing_view() exposes them as the weights_view<float> grove::route reads.
///
///   grove::bf16_weights w = grove::bf16_weights::from(params.view());
///   auto plan = grove::route(w.routing_view(), {k, lambda}, x);
///   runner.forward(w.view(), plan, x, y);  // any grove::runner, e.g. a grove::cpu_runner
class bf16_weights {
 public:
  bf16_weights() = default;

  /// Every tensor zero.
  explicit bf16_weights(const layer_dims& dims)
      : dims_(dims), values_(static_cast<std::size_t>((dims.validate(), total_parameters(dims)))),
        router_(static_cast<std::size_t>(dims.experts * dims.hidden), 0.0f),
        bias_(static_cast<std::size_t>(dims.experts), 0.0f) {}

  /// fp32 weights rounded to bf16 (round to nearest even); the bias stays fp32.
  static bf16_weights from(const weights_view<float>& weights) {
    weights.require_complete();
    bf16_weights out(weights.dims());
    std::size_t at = 0;
    weights.for_each_tensor([&](const tensor_info& info, const float* const& p) {
      if (info.role == tensor_role::selection_bias) {
        if (p != nullptr)
          for (index e = 0; e < info.rows; ++e) out.bias_[static_cast<std::size_t>(e)] = p[e];
        return;
      }
      for (index i = 0; i < info.size(); ++i) out.values_[at + static_cast<std::size_t>(i)] = to_bf16(p[i]);
      at += static_cast<std::size_t>(info.size());
    });
    out.refresh_router();
    return out;
  }

  [[nodiscard]] const layer_dims& dims() const { return dims_; }

  /// Every tensor, in bf16 (the bias is not a bf16 tensor: it is null here, see routing_view()).
  [[nodiscard]] weights_view<bf16> view() const { return bind<const bf16>(values_.data()); }
  /// Writable view, for loading a BF16 checkpoint straight into this storage; call
  /// refresh_router() afterwards.
  [[nodiscard]] weights_span<bf16> span() { return bind<bf16>(values_.data()); }

  /// The fp32 router (the bf16 one, widened) and the fp32 selection bias, the only tensors
  /// grove::route reads; expert tensors are unset in this view.
  [[nodiscard]] weights_view<float> routing_view() const {
    weights_view<float> w(dims_);
    w.set_router(router_.data());
    w.set_bias(bias_.data());
    return w;
  }
  /// The selection bias b, fp32 (it is updated by load balancing, not trained in bf16).
  [[nodiscard]] std::span<float> bias() { return bias_; }
  [[nodiscard]] std::span<const float> bias() const { return bias_; }

  /// Recomputes the fp32 router from the bf16 one after the bf16 tensors were written through span().
  void refresh_router() {
    const bf16* router = values_.data();  // the router is the first tensor in checkpoint order
    for (std::size_t i = 0; i < router_.size(); ++i) router_[i] = to_float(router[i]);
  }

  /// Bytes held: bf16 tensors, the fp32 router copy and the bias.
  [[nodiscard]] std::size_t bytes() const {
    return values_.size() * sizeof(bf16) + (router_.size() + bias_.size()) * sizeof(float);
  }
  /// What bytes() is for a layer of these dims.
  [[nodiscard]] static std::size_t bytes_for(const layer_dims& dims) {
    return static_cast<std::size_t>(total_parameters(dims)) * sizeof(bf16) +
           static_cast<std::size_t>(dims.experts * dims.hidden + dims.experts) * sizeof(float);
  }

 private:
  template <class T>
  layer_weights<T> bind(T* values) const {
    layer_weights<T> w(dims_);
    T* cursor = values;
    w.for_each_tensor([&](const tensor_info& info, T*& p) {
      if (info.role == tensor_role::selection_bias) return;
      p = cursor;
      cursor += info.size();
    });
    return w;
  }

  layer_dims dims_{};
  std::vector<bf16, detail::huge_page_allocator<bf16>> values_;
  std::vector<float> router_;
  std::vector<float> bias_;
};

GROVE_END_NAMESPACE

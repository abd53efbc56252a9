// grove CUDA backend: the device copies a cuda_runner keeps of host weights (docs/cuda.md,
// "Host weights on the device").
#pragma once

#include <cstddef>
#include <memory>
#include <utility>
#include <vector>

#include "grove/config/layer_dims.hpp"
#include "grove/cuda/common.cuh"
#include "grove/cuda/device_weights.cuh"
#include "grove/weights/layer_weights.hpp"

GROVE_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

/// Device copies of host weights, each kept under the identity of the host view it was uploaded
/// from: its dims and the address of every tensor (router, each expert's and adjugate's gate,
/// up, down, and the bias). Two views of the same buffers are the same weights; a view of other
/// buffers is other weights, even with equal values. A lookup compares addresses only: no
/// allocation and no reading of values, so it costs nothing next to a layer call.
///
/// Entries live until released; their device memory stays at one address (a new upload of the
/// same view copies into it), so device views handed out earlier stay valid.
template <class S>
class weights_registry {
 public:
  /// The device copy of `host`: copied now (synchronously), into the existing copy when these
  /// weights were uploaded before.
  template <class W>
  const device_parameters<S>& upload(const weights_view<W>& host) {
    if (entry* found = find_entry(host)) {
      found->device.assign(host);
      return found->device;
    }
    auto fresh = std::make_unique<entry>();
    fresh->device = device_parameters<S>::upload(host);
    fresh->dims = host.dims();
    for_each_address(host, [&](const void* p) { fresh->addresses.push_back(p); });
    entries_.push_back(std::move(fresh));
    return entries_.back()->device;
  }

  /// The device copy of `host`, or nullptr when it was not uploaded.
  template <class W>
  [[nodiscard]] const device_parameters<S>* find(const weights_view<W>& host) const {
    const entry* found = find_entry(host);
    return found ? &found->device : nullptr;
  }

  /// Frees the device copy of `host`; false when there was none.
  template <class W>
  bool release(const weights_view<W>& host) {
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (same(**it, host)) {
        entries_.erase(it);
        return true;
      }
    return false;
  }

  void clear() { entries_.clear(); }
  [[nodiscard]] std::size_t size() const { return entries_.size(); }
  /// Device memory of the copies (weights and bias).
  [[nodiscard]] std::size_t bytes() const {
    std::size_t total = 0;
    for (const auto& e : entries_)
      total += e->device.value_count() * sizeof(S) + static_cast<std::size_t>(e->dims.experts) * sizeof(float);
    return total;
  }

 private:
  struct entry {
    layer_dims dims;
    std::vector<const void*> addresses;  // for_each_address's order
    device_parameters<S> device;
  };

  /// The view's tensor addresses in checkpoint order, then the bias (the tensors' own accessors:
  /// for_each_tensor would build names, and a lookup must not allocate).
  template <class W, class Fn>
  static void for_each_address(const weights_view<W>& w, Fn&& fn) {
    const layer_dims& d = w.dims();
    fn(w.router().data());
    auto mlp = [&](const swiglu_weights<const W>& m) {
      fn(m.gate.data());
      fn(m.up.data());
      fn(m.down.data());
    };
    for (index e = 0; e < d.experts; ++e) mlp(w.expert(e));
    for (index j = 0; j < d.groups; ++j) mlp(w.adjugate(j));
    fn(w.bias());
  }

  template <class W>
  static bool same(const entry& e, const weights_view<W>& host) {
    if (!(e.dims == host.dims()) || e.addresses.empty() || e.addresses.front() != host.router().data()) return false;
    std::size_t at = 0;
    bool equal = true;
    for_each_address(host, [&](const void* p) { equal = equal && e.addresses[at++] == p; });
    return equal;
  }

  template <class W>
  entry* find_entry(const weights_view<W>& host) const {
    for (const auto& e : entries_)
      if (same(*e, host)) return e.get();
    return nullptr;
  }

  std::vector<std::unique_ptr<entry>> entries_;
};

}  // namespace detail
}  // namespace cuda
GROVE_END_NAMESPACE

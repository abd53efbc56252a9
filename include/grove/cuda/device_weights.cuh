// grove CUDA backend: a layer's weights in device memory.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "grove/config/layer_dims.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/cuda/common.cuh"

GROVE_BEGIN_NAMESPACE
namespace cuda {

/// Read-only device view of a layer's weights (PyTorch [out, in] row-major layout, as on the CPU).
/// `gate`, `up`, `down` are device arrays of E + G device pointers (experts, then adjugates), so
/// the tensors may live anywhere: one flat buffer (device_parameters) or a framework's own
/// allocations. gate/up of MLP m are [N_m, H], down is [H, N_m] with N_m = shape.intermediate(m)
/// (the core's layer_dims: the kernels read the same sizes and MLP numbering as the CPU).
template <class S>
struct device_weights {
  layer_dims shape;
  const S* router = nullptr;       ///< W_r [E, H]
  const S* const* gate = nullptr;  ///< [E + G] pointers
  const S* const* up = nullptr;    ///< [E + G] pointers
  const S* const* down = nullptr;  ///< [E + G] pointers
  const float* bias = nullptr;     ///< selection bias b [E] in fp32; nullptr means zero
};

/// Writable fp32 device view with the same structure, for gradients (always fp32, whatever the
/// weights' type: the usual master-gradient precision).
struct device_gradients {
  layer_dims shape;
  float* router = nullptr;
  float* const* gate = nullptr;
  float* const* up = nullptr;
  float* const* down = nullptr;
};

namespace detail {

__device__ inline float hashed_normal(std::uint64_t seed, std::uint64_t i) {
  auto mix = [](std::uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  const std::uint64_t a = mix(seed ^ mix(2 * i));
  const std::uint64_t b = mix(seed ^ mix(2 * i + 1));
  const float u1 = (static_cast<float>(a >> 40) + 1.0f) * 0x1.0p-24f;  // (0, 1]
  const float u2 = static_cast<float>(b >> 40) * 0x1.0p-24f;
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

/// Where MLP m's block (gate [N_m, H], up [N_m, H], down [H, N_m], in this order) starts in a
/// flat buffer in checkpoint order: after the router [E, H] and every earlier MLP's block. The
/// one definition of that layout on the device side (device_parameters, the runner's gradients).
inline std::size_t flat_mlp_offset(const layer_dims& d, index m) {
  const index experts_before = m < d.experts ? m : d.experts;
  const index adjugates_before = m < d.experts ? 0 : m - d.experts;
  return static_cast<std::size_t>(d.experts * d.hidden + 3 * d.hidden *
                                                             (experts_before * d.expert_intermediate +
                                                              adjugates_before * d.adjugate_intermediate));
}

template <class S>
__global__ void fill_normal_kernel(S* values, std::int64_t count, std::uint64_t seed, float stddev) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    values[i] = from_float<S>(stddev * hashed_normal(seed, static_cast<std::uint64_t>(i)));
}

}  // namespace detail

/// A layer's weights, owned, in device memory: the trainable tensors in ONE flat buffer in
/// checkpoint order (router, experts 0..E-1 gate/up/down, adjugates 0..G-1 gate/up/down), as
/// grove::layer_parameters holds them on the host, plus the fp32 selection bias and the
/// pointer tables the kernels index. With S = float it also serves as a gradient buffer.
template <class S>
class device_parameters {
  static_assert(detail::is_device_scalar<S>, "GROVE_CUDA_SCALAR_MUST_BE_float_OR_bfloat16");

 public:
  device_parameters() = default;

  /// All tensors and the bias zero.
  explicit device_parameters(const layer_dims& dims) : dims_((dims.validate(), dims)) {
    values_.allocate(static_cast<std::size_t>(total_parameters(dims)));
    bias_.allocate(static_cast<std::size_t>(dims.experts));
    values_.zero();
    bias_.zero();
    build_tables();
    detail::check(cudaDeviceSynchronize(), "zeroing device_parameters");
  }

  /// Copies host weights (a grove::weights_view of float, double or bf16) to the device, rounding
  /// to S: device_parameters(host.dims()), then assign(host).
  template <class T>
  static device_parameters upload(const layer_weights<const T>& host) {
    device_parameters p(host.dims());
    p.assign(host);
    return p;
  }

  /// Copies host weights of this object's dims into its device memory (synchronous), keeping the
  /// device pointers: views handed out before (weights(), a device_router) see the new values.
  /// It walks the core's tensor list (layer_weights::for_each_tensor), the order the flat buffer
  /// and every checkpoint use; a missing tensor is named, a missing bias uploads as zeros.
  template <class T>
  void assign(const layer_weights<const T>& host) {
    detail::require(host.dims() == dims_, "grove::cuda: device_parameters::assign: the host weights have other "
                                          "dimensions (H, E, G, I, Ia) than the device copy");
    std::vector<S> staging(values_.size());
    std::vector<float> bias(static_cast<std::size_t>(dims_.experts), 0.0f);
    std::size_t at = 0;
    host.for_each_tensor([&](const tensor_info& info, const T* const& src) {
      if (info.role == tensor_role::selection_bias) {
        if (src != nullptr)
          for (index e = 0; e < info.rows; ++e) bias[static_cast<std::size_t>(e)] = static_cast<float>(src[e]);
        return;
      }
      if (src == nullptr) throw error("grove::cuda: missing tensor '" + info.name + "' in the weights to upload");
      for (index i = 0; i < info.size(); ++i) staging[at++] = detail::from_float<S>(static_cast<float>(src[i]));
    });
    values_.upload(staging);
    bias_.upload(bias);
  }

  [[nodiscard]] const layer_dims& dims() const { return dims_; }

  /// The view the kernels read.
  [[nodiscard]] device_weights<S> weights() const {
    device_weights<S> w;
    w.shape = dims_;
    w.router = values_.data();
    const std::size_t m = static_cast<std::size_t>(dims_.mlps());
    w.gate = tables_.data();
    w.up = tables_.data() + m;
    w.down = tables_.data() + 2 * m;
    w.bias = bias_.data();
    return w;
  }

  /// The writable fp32 view backward accumulates into.
  [[nodiscard]] device_gradients gradients() requires std::is_same_v<S, float> {
    device_gradients g;
    g.shape = dims_;
    g.router = values_.data();
    const std::size_t m = static_cast<std::size_t>(dims_.mlps());
    g.gate = tables_.data();
    g.up = tables_.data() + m;
    g.down = tables_.data() + 2 * m;
    return g;
  }

  /// The flat buffer (checkpoint order), its length and the bias [E].
  [[nodiscard]] S* values() const { return values_.data(); }
  [[nodiscard]] std::size_t value_count() const { return values_.size(); }
  [[nodiscard]] float* bias() const { return bias_.data(); }

  /// Copies the flat buffer to the host (synchronising), e.g. to compare with
  /// grove::layer_parameters::values() or to save a checkpoint.
  [[nodiscard]] std::vector<S> download_values() const { return values_.download(); }
  [[nodiscard]] std::vector<float> download_bias() const { return bias_.download(); }

  /// Sets every trainable tensor to zero on `stream` (gradients between steps); bias untouched.
  void zero_values(cudaStream_t stream = nullptr) { values_.zero(stream); }

  /// Fills the trainable tensors with N(0, stddev²) on the device (fast, for benchmarks; not the
  /// same numbers as layer_parameters::random).
  void fill_normal(std::uint64_t seed, float stddev, cudaStream_t stream = nullptr) {
    if (values_.empty()) return;
    detail::launch("fill_normal_kernel", detail::fill_normal_kernel<S>, 1024, 256, 0, stream, values_.data(),
                   static_cast<std::int64_t>(values_.size()), seed, stddev);
  }

 private:
  void build_tables() {
    const layer_dims& d = dims_;
    const std::size_t m = static_cast<std::size_t>(dims_.mlps());
    std::vector<S*> table(3 * m);
    for (index mlp = 0; mlp < d.mlps(); ++mlp) {
      S* block = values_.data() + detail::flat_mlp_offset(d, mlp);
      const index tensor = d.intermediate(mlp) * d.hidden;
      const auto i = static_cast<std::size_t>(mlp);
      table[i] = block;
      table[m + i] = block + tensor;
      table[2 * m + i] = block + 2 * tensor;
    }
    tables_.allocate(table.size());
    tables_.upload(table);
  }

  layer_dims dims_{};
  device_buffer<S> values_;
  device_buffer<float> bias_;
  device_buffer<S*> tables_;  // gate[E+G], up[E+G], down[E+G]
};

}  // namespace cuda
GROVE_END_NAMESPACE

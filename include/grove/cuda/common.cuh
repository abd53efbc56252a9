// grove CUDA backend: shared basics (error checking, element types, an owning device buffer).
// Header-only; compiled by the consumer's nvcc. The CPU library never includes this folder.
#pragma once

#if defined(GROVE_CUDA_EMULATION)
// Test hook: tests/cuda_emulation.hpp, included before grove, provides the subset of the CUDA
// runtime, device intrinsics and WMMA that grove uses, executed on the CPU, so the test suite
// runs these very kernels on machines without a GPU. Never define this in real builds.
#else
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "grove/error.hpp"
#include "grove/version.hpp"

GROVE_BEGIN_NAMESPACE
namespace cuda {

/// The BF16 element type of released checkpoints; the device math accumulates it in fp32.
using bfloat16 = __nv_bfloat16;

namespace detail {

using grove::detail::require;

/// Throws grove::error naming the CUDA call that failed and CUDA's reason.
inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw error(std::string("grove::cuda: ") + what + " failed: " + cudaGetErrorName(status) + " (" +
                cudaGetErrorString(status) + ")");
}

/// Checks the launch just issued (bad configuration, missing kernel image for this GPU).
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

/// kernel<<<grid, block, shared_bytes, stream>>>(args...), then check_launch(name). (A function
/// rather than the chevrons at each call so that the tests' CPU emulation can stand in.)
template <class... Params, class... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes,
            cudaStream_t stream, Args&&... args) {
#if defined(GROVE_CUDA_EMULATION)
  grove_emulation::launch(kernel, grid, block, shared_bytes, stream, static_cast<Params>(std::forward<Args>(args))...);
#else
  // clang-format off
  kernel<<<grid, block, shared_bytes, stream>>>(static_cast<Params>(std::forward<Args>(args))...);
  // clang-format on
#endif
  check_launch(name);
}

template <class T>
inline constexpr bool is_device_scalar = std::is_same_v<T, float> || std::is_same_v<T, bfloat16>;

__host__ __device__ inline float to_float(float v) { return v; }
__host__ __device__ inline float to_float(bfloat16 v) { return __bfloat162float(v); }

/// float -> T with round-to-nearest-even (what PyTorch's .to(torch.bfloat16) does).
template <class T>
__host__ __device__ inline T from_float(float v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return __float2bfloat16_rn(v);
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

inline void require_size(std::size_t count, std::size_t capacity) {
  if (count > capacity)
    throw error("grove::cuda: a copy of " + std::to_string(count) + " elements does not fit a device buffer of " +
                std::to_string(capacity));
}

/// The block's dynamic shared memory (128-byte aligned), viewed as T.
template <class T>
__device__ inline T* dynamic_shared() {
#if defined(GROVE_CUDA_EMULATION)
  return reinterpret_cast<T*>(grove_emulation::dynamic_shared_memory());
#else
  extern __shared__ __align__(128) unsigned char grove_dynamic_shared[];
  return reinterpret_cast<T*>(grove_dynamic_shared);
#endif
}

}  // namespace detail

/// `#pragma unroll`, spelled so that host compilers that do not know it stay quiet.
#if defined(GROVE_CUDA_EMULATION)
#define GROVE_UNROLL
#else
#define GROVE_UNROLL _Pragma("unroll")
#endif

namespace detail {
/// Makes `device` current for a scope and restores the caller's device after it: a runner's
/// calls run on its device whichever device the calling thread has selected.
class device_scope {
 public:
  explicit device_scope(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    changed_ = previous_ != device;
  }
  ~device_scope() {
    if (changed_) (void)cudaSetDevice(previous_);
  }
  device_scope(const device_scope&) = delete;
  device_scope& operator=(const device_scope&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};
}  // namespace detail

/// Number of CUDA devices usable by this process; 0 when there is no GPU or no driver (the
/// tests use it to skip themselves). Never throws.
inline int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the non-sticky error so later calls start clean
    return 0;
  }
  return count;
}

/// An owning, typed device allocation (cudaMalloc / cudaFree). Move-only.
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t count) { allocate(count); }
  ~device_buffer() { release(); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  device_buffer& operator=(device_buffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }

  /// Replaces the allocation with `count` uninitialised elements.
  void allocate(std::size_t count) {
    release();
    if (count == 0) return;
    void* p = nullptr;
    detail::check(cudaMalloc(&p, count * sizeof(T)),
                  ("cudaMalloc of " + std::to_string(count * sizeof(T)) + " bytes").c_str());
    data_ = static_cast<T*>(p);
    size_ = count;
  }

  /// Makes room for `count` elements: allocates (uninitialised, contents dropped) only when the
  /// buffer is smaller. Returns true when it allocated; a workspace counts these.
  bool reserve(std::size_t count) {
    if (count <= size_) return false;
    allocate(count);
    return true;
  }

  [[nodiscard]] T* data() const { return data_; }
  [[nodiscard]] std::size_t size() const { return size_; }
  [[nodiscard]] bool empty() const { return size_ == 0; }

  /// Sets every byte to zero, ordered on `stream`.
  void zero(cudaStream_t stream = nullptr) {
    if (size_) detail::check(cudaMemsetAsync(data_, 0, size_ * sizeof(T), stream), "cudaMemsetAsync");
  }
  /// Copies `count` elements from host memory (synchronous with respect to the host).
  void upload(const T* host, std::size_t count) {
    detail::require_size(count, size_);
    if (count)
      detail::check(cudaMemcpy(data_, host, count * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy to device");
  }
  void upload(const std::vector<T>& host) { upload(host.data(), host.size()); }
  /// Copies `count` elements from host memory, ordered on `stream`. From pageable memory the
  /// call returns once the data is staged, so `host` may change afterwards.
  void upload_async(const T* host, std::size_t count, cudaStream_t stream) {
    detail::require_size(count, size_);
    if (count)
      detail::check(cudaMemcpyAsync(data_, host, count * sizeof(T), cudaMemcpyHostToDevice, stream),
                    "cudaMemcpyAsync to device");
  }
  void upload_async(const std::vector<T>& host, cudaStream_t stream) { upload_async(host.data(), host.size(), stream); }
  /// Copies the whole buffer to the host (waits for all preceding work on the device).
  [[nodiscard]] std::vector<T> download() const { return download(size_); }
  [[nodiscard]] std::vector<T> download(std::size_t count) const {
    detail::require_size(count, size_);
    std::vector<T> host(count);
    if (count)
      detail::check(cudaMemcpy(host.data(), data_, count * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy to host");
    return host;
  }

 private:
  void release() noexcept {
    if (data_) (void)cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace cuda
GROVE_END_NAMESPACE

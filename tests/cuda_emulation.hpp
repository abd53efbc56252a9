// A CPU emulation of the small CUDA subset grove's kernels use, for tests only: it lets the
// device code of include/grove/cuda run, unchanged, on a machine without a GPU (compiled by the
// host compiler with GROVE_CUDA_EMULATION). What it checks: indexing, the plan and schedule
// logic, tile loads, epilogues, the kernels' arithmetic (with ASan: every out-of-bounds access
// to "device" and shared memory). What it cannot check: the GPU memory model, real warp
// scheduling, WMMA's hardware fragment layout and rounding, performance.
//
// Model: a launch runs its blocks one after another; the threads of a block are fibers on the
// calling thread, switched at barriers (__syncthreads; a warp barrier inside every shuffle and
// vote). A persistent kernel's spin-waits therefore never spin: tickets are handed out in order
// and a block finishes each item before taking the next. Dynamic shared memory is filled with
// NaN bytes before each block and cudaMalloc memory with garbage, so reading either before
// writing shows. WMMA fragments hold the whole 16×16 tile, computed once per warp (by lane 0).
// Streams are ignored: every call is synchronous. Include this header before any grove header,
// in one translation unit.
#pragma once

#define GROVE_CUDA_EMULATION 1

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <numbers>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define GROVE_EMULATION_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define GROVE_EMULATION_ASAN 1
#endif
#endif
#ifndef GROVE_EMULATION_ASAN
#define GROVE_EMULATION_ASAN 0
#endif
#if GROVE_EMULATION_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---- keywords --------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---- types -----------------------------------------------------------------------------------
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}  // NOLINT
};
struct uint4 {
  unsigned x, y, z, w;
};
struct grove_emulated_stream;
using cudaStream_t = grove_emulated_stream*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

/// BF16 as its 16 bits.
struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(v.bits) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if (std::isnan(f)) return __nv_bfloat16{0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return __nv_bfloat16{static_cast<std::uint16_t>(u >> 16)};
}

namespace grove_emulation {

// ---- fibers ----------------------------------------------------------------------------------
// Each CUDA thread of a block is a fiber on the calling thread; a fiber runs until it reaches a
// barrier (__syncthreads, or a warp barrier inside a shuffle or vote) or returns, then the next
// one runs. When every live fiber of the block (or of a warp) waits at the barrier, they all go
// on. Execution is deterministic and single-threaded; a barrier that can never complete aborts
// with a message (a divergent __syncthreads, say). On x86-64 Linux the switch is a few
// instructions (callee-saved registers and the stack pointer); elsewhere it is ucontext.
#if defined(__x86_64__) && defined(__linux__)
extern "C" void grove_emulation_switch(void** save_sp, void* load_sp);
// Weak, so that including this header in several translation units links.
__asm__(
    ".pushsection .text\n"
    ".weak grove_emulation_switch\n"
    ".type grove_emulation_switch,@function\n"
    "grove_emulation_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size grove_emulation_switch,.-grove_emulation_switch\n"
    ".popsection\n");

struct context {
  void* sp = nullptr;
};
inline void switch_context(context& from, context& to) { grove_emulation_switch(&from.sp, to.sp); }
/// A context whose first switch-to enters `entry` on `stack` (entry must never return).
inline void make_context(context& c, char* stack, std::size_t size, void (*entry)()) {
  const auto top = reinterpret_cast<std::uintptr_t>(stack + size) & ~std::uintptr_t{15};
  auto* p = reinterpret_cast<std::uint64_t*>(top);
  p[-1] = 0;                                       // entry's (absent) return address
  p[-2] = reinterpret_cast<std::uint64_t>(entry);  // where the first switch's `ret` goes
  for (int i = 3; i <= 8; ++i) p[-i] = 0;          // rbp, rbx, r12..r15
  std::uint32_t mxcsr = 0;
  std::uint16_t fpu_control = 0;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpu_control));
  p[-9] = mxcsr | (static_cast<std::uint64_t>(fpu_control) << 32);
  c.sp = &p[-9];
}
#else
struct context {
  ucontext_t uc{};
};
inline void switch_context(context& from, context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(context& c, char* stack, std::size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

enum class fiber_state { runnable, block_wait, warp_wait, done };

struct launch_state {
  dim3 grid, block;
  std::size_t shared_bytes = 0;
  std::unique_ptr<unsigned char[]> shared;
  unsigned threads = 0;
  std::vector<context> contexts;
  std::vector<fiber_state> state;
  std::vector<std::uint64_t> warp_slots;  // 2 × 32 per warp: exchanges alternate between the halves
  std::vector<unsigned> exchanges;        // per thread, how many exchanges it has made
  context scheduler{};
  unsigned running = 0;
  std::function<void()> body;
#if GROVE_EMULATION_ASAN
  const void* scheduler_stack = nullptr;
  std::size_t scheduler_stack_size = 0;
#endif
};

inline launch_state* current = nullptr;
inline uint3 thread_index{};
inline uint3 block_index{};
inline constexpr std::size_t fiber_stack_bytes = 512 * 1024;

/// Fiber stacks, kept between launches (a block has at most 1024 threads).
inline std::vector<std::unique_ptr<char[]>>& stacks() {
  static std::vector<std::unique_ptr<char[]>> pool;
  return pool;
}

inline unsigned char* dynamic_shared_memory() { return current->shared.get(); }

/// From the running fiber back to the scheduler; `exiting` fibers are never resumed.
inline void switch_to_scheduler(fiber_state s, bool exiting = false) {
  launch_state& l = *current;
  l.state[l.running] = s;
#if GROVE_EMULATION_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, l.scheduler_stack, l.scheduler_stack_size);
#else
  (void)exiting;
#endif
  switch_context(l.contexts[l.running], l.scheduler);
#if GROVE_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

[[noreturn]] inline void fiber_main() {
#if GROVE_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &current->scheduler_stack, &current->scheduler_stack_size);
#endif
  current->body();
  switch_to_scheduler(fiber_state::done, true);
  std::abort();  // never resumed
}

inline void run_block(launch_state& l) {
  auto& pool = stacks();
  while (pool.size() < l.threads) pool.emplace_back(new char[fiber_stack_bytes]);
  for (unsigned i = 0; i < l.threads; ++i) {
#if GROVE_EMULATION_ASAN
    // A fiber ends inside switch_to_scheduler and never returns from it, so that frame's
    // redzones stay poisoned on its stack. The next launch's frames land on those bytes and
    // AddressSanitizer would report them; a reused stack starts clean.
    ASAN_UNPOISON_MEMORY_REGION(pool[i].get(), fiber_stack_bytes);
#endif
    make_context(l.contexts[i], pool[i].get(), fiber_stack_bytes, fiber_main);
    l.state[i] = fiber_state::runnable;
    l.exchanges[i] = 0;
  }
  const unsigned warps = (l.threads + 31) / 32;
  for (;;) {
    for (unsigned i = 0; i < l.threads; ++i) {
      if (l.state[i] != fiber_state::runnable) continue;
      l.running = i;
      thread_index = uint3{i % l.block.x, (i / l.block.x) % l.block.y, i / (l.block.x * l.block.y)};
#if GROVE_EMULATION_ASAN
      void* fake = nullptr;
      __sanitizer_start_switch_fiber(&fake, pool[i].get(), fiber_stack_bytes);
#endif
      switch_context(l.scheduler, l.contexts[i]);
#if GROVE_EMULATION_ASAN
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    }
    bool live = false, released = false;
    for (unsigned w = 0; w < warps; ++w) {
      bool all_waiting = true, any = false;
      for (unsigned i = w * 32; i < std::min(l.threads, w * 32 + 32); ++i) {
        if (l.state[i] == fiber_state::done) continue;
        any = true;
        all_waiting = all_waiting && l.state[i] == fiber_state::warp_wait;
      }
      if (any && all_waiting) {
        for (unsigned i = w * 32; i < std::min(l.threads, w * 32 + 32); ++i)
          if (l.state[i] == fiber_state::warp_wait) l.state[i] = fiber_state::runnable;
        released = true;
      }
    }
    bool all_block = true;
    for (unsigned i = 0; i < l.threads; ++i) {
      if (l.state[i] == fiber_state::done) continue;
      live = true;
      all_block = all_block && l.state[i] == fiber_state::block_wait;
    }
    if (!live) return;
    if (all_block) {
      for (auto& st : l.state)
        if (st == fiber_state::block_wait) st = fiber_state::runnable;
      released = true;
    }
    if (!released) {
      std::fprintf(stderr, "grove CUDA emulation: the threads of a block wait at different barriers (deadlock)\n");
      std::abort();
    }
  }
}

template <class Kernel>
struct launcher {
  Kernel kernel;
  dim3 grid, block;
  std::size_t smem;

  template <class... Args>
  void operator()(Args... args) const {
    launch_state l;
    l.grid = grid;
    l.block = block;
    l.shared_bytes = smem;
    l.shared.reset(new unsigned char[smem ? smem : 1]);
    l.threads = block.x * block.y * block.z;
    l.contexts.resize(l.threads);
    l.state.resize(l.threads);
    l.warp_slots.resize(64 * ((l.threads + 31) / 32));
    l.exchanges.resize(l.threads);
    l.body = [&] { kernel(args...); };
    launch_state* outer = current;
    current = &l;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          block_index = uint3{bx, by, bz};
          std::memset(l.shared.get(), 0xff, smem);  // NaN bytes: reading before writing shows
          run_block(l);
        }
    current = outer;
  }
};

/// What grove::cuda::detail::launch calls in place of kernel<<<grid, block, smem, stream>>>(args...).
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t, Args... args) {
  launcher<void (*)(Params...)>{kernel, grid, block, smem}(args...);
}

inline unsigned my_lane() { return current->running % 32; }
inline unsigned my_warp() { return current->running / 32; }

/// This lane's half of its warp's exchange slots for the next exchange. Lanes of a warp make
/// the same exchanges in the same order, and consecutive exchanges use different halves, so
/// one barrier per exchange suffices: a lane can only overwrite a half after every lane has
/// passed the barrier of the exchange that followed the last read of it.
inline std::uint64_t* exchange_slots() {
  launch_state& l = *current;
  const unsigned parity = l.exchanges[l.running]++ % 2;
  return &l.warp_slots[64 * my_warp() + 32 * parity];
}

/// Every lane of the warp publishes `v`; returns lane `src`'s value.
template <class T>
T exchange(T v, unsigned src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  std::uint64_t* slots = exchange_slots();
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[my_lane()] = bits;
  switch_to_scheduler(fiber_state::warp_wait);
  T out;
  const std::uint64_t got = slots[src % 32];
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

}  // namespace grove_emulation

#define threadIdx (::grove_emulation::thread_index)
#define blockIdx (::grove_emulation::block_index)
#define blockDim (::grove_emulation::current->block)
#define gridDim (::grove_emulation::current->grid)

// ---- device intrinsics -----------------------------------------------------------------------
inline void __syncthreads() { grove_emulation::switch_to_scheduler(grove_emulation::fiber_state::block_wait); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  grove_emulation::switch_to_scheduler(grove_emulation::fiber_state::warp_wait);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) {}

template <class T>
T __shfl_sync(unsigned, T v, int src) {
  return grove_emulation::exchange(v, static_cast<unsigned>(src));
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return grove_emulation::exchange(v, grove_emulation::my_lane() ^ static_cast<unsigned>(mask));
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
  const unsigned lane = grove_emulation::my_lane();
  return grove_emulation::exchange(v, lane >= delta ? lane - delta : lane);
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  using namespace grove_emulation;
  std::uint64_t* slots = exchange_slots();
  slots[my_lane()] = predicate ? 1u : 0u;
  switch_to_scheduler(fiber_state::warp_wait);
  unsigned bits = 0;
  const unsigned base = 32 * my_warp();
  for (unsigned l = 0; l < 32 && base + l < current->threads; ++l)
    if (slots[l]) bits |= 1u << l;
  return bits;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }

inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
inline int atomicExch(int* p, int v) { return std::atomic_ref<int>(*p).exchange(v); }

inline int __popc(unsigned v) { return std::popcount(v); }
inline int __ffs(int v) { return v == 0 ? 0 : std::countr_zero(static_cast<unsigned>(v)) + 1; }

template <class T>
T __ldcg(const T* p) {
  return *p;
}

inline float cospif(float x) { return static_cast<float>(std::cos(std::numbers::pi * static_cast<double>(x))); }
using std::isnan;

// ---- WMMA ------------------------------------------------------------------------------------
namespace nvcuda::wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

// A fragment holds the whole 16×16 tile. Only lane 0 of a warp loads, multiplies and stores
// (grove never reads fragment elements directly), so the warp does the work once.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation knows 16x16x16 only");
  float v[16 * 16];  // (row, col) of the fragment's matrix at v[row * 16 + col]
};

template <class Use, int M, int N, int K, class T, class L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float value) {
  std::fill(std::begin(f.v), std::end(f.v), value);
}

template <class Use, int M, int N, int K, class T, class L, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  if (grove_emulation::my_lane() != 0) return;
  const auto at = [&](int r, int c) {
    // row-major: element (r, c) at p[r*ldm + c]; column-major: at p[c*ldm + r]
    const std::size_t i =
        std::is_same_v<L, row_major> ? static_cast<std::size_t>(r) * ldm + c : static_cast<std::size_t>(c) * ldm + r;
    return __bfloat162float(p[i]);
  };
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = at(r, c);
}

template <class TA, class LA, class TB, class LB, class TC>
void mma_sync(fragment<accumulator, 16, 16, 16, TC>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, TC>& c) {
  if (grove_emulation::my_lane() != 0) return;
  float out[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.v[i * 16 + k] * b.v[k * 16 + j];
      out[i * 16 + j] = s;
    }
  std::copy(std::begin(out), std::end(out), d.v);
}

template <class TC>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, TC>& f, unsigned ldm, layout_t layout) {
  if (grove_emulation::my_lane() != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      const std::size_t i =
          layout == mem_row_major ? static_cast<std::size_t>(r) * ldm + c : static_cast<std::size_t>(c) * ldm + r;
      p[i] = f.v[r * 16 + c];
    }
}
}  // namespace nvcuda::wmma

// ---- runtime ---------------------------------------------------------------------------------
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
/// The fields of cudaDeviceProp grove reads.
struct cudaDeviceProp {
  char name[256];
  int multiProcessorCount;
};
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* properties, int) {
  std::snprintf(properties->name, sizeof(properties->name), "%s", "CPU emulation");
  properties->multiProcessorCount = 2;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 2;  // two "SMs": persistent kernels get more than one block
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  *p = ::operator new(bytes, std::align_val_t(256), std::nothrow);
  if (*p == nullptr) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xcd, bytes);  // like the GPU: garbage, not zeros
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) {
  ::operator delete(p, std::align_val_t(256));
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
inline cudaError_t cudaMemcpy2DAsync(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch,
                                     std::size_t width, std::size_t height, cudaMemcpyKind, cudaStream_t) {
  if (width > dst_pitch || width > src_pitch) return cudaErrorInvalidValue;
  for (std::size_t r = 0; r < height; ++r)
    if (width)
      std::memcpy(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch, width);
  return cudaSuccess;
}
/// Streams are ignored (every call is synchronous); a stream is a distinct non-null pointer.
struct grove_emulated_stream {};
inline cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  *stream = new grove_emulated_stream;
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete stream;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t = nullptr) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaError"; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return cudaSuccess;
}
template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, std::size_t) {
  *blocks = 1;
  return cudaSuccess;
}

// grove CUDA backend: the one tile product every kernel is built from (docs/cuda.md, "Tiles").
//
// A tile computes up to a few products C_p = A_{pa[p]} · B_{pb[p]}ᵀ of shape tile_m × tile_n
// over a shared reduction depth K, with fp32 accumulation, and leaves them in shared memory
// (fp32, row-major, leading dimension tile_ldc) for the caller's epilogue. Operands are
// described, not copied: each is a set of row-major "runs" in global memory (a row of x
// picked through the dispatch rows, a row of a weight, a row of an activation buffer), read
// either along K (the run is a row of the logical operand) or across K (the run is a column),
// so gathers, transposes and K-concatenations all happen in the loads into shared memory.
//
// Math policies: BF16 uses tensor cores through WMMA (mma.sync underneath, sm_80 and sm_90);
// fp32 uses a plain FMA micro-kernel so fp32 results match the CPU to rounding (TF32 tensor
// cores would not).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>

#include "grove/cuda/common.cuh"
#include "grove/cuda/device_plan.cuh"
#include "grove/cuda/schedule.cuh"

GROVE_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

/// Leading dimension of the fp32 result tiles (a multiple of 4 as WMMA stores require; the
/// padding breaks bank conflicts).
inline constexpr int tile_ldc = tile_n + 4;

/// Leading dimension of the staged operand tiles: WMMA needs a multiple of 8 BF16 elements
/// (and 32-byte aligned fragments); the fp32 FMA path wants an odd stride (conflict-free).
template <class T>
inline constexpr int tile_lds = std::is_same_v<T, float> ? tile_k + 1 : tile_k + 8;

template <class T>
__host__ __device__ constexpr std::size_t staging_bytes(int a_tiles, int b_tiles) {
  return static_cast<std::size_t>(a_tiles * tile_m + b_tiles * tile_n) * tile_lds<T> * sizeof(T);
}
__host__ __device__ constexpr std::size_t result_bytes(int products) {
  return static_cast<std::size_t>(products) * tile_m * tile_ldc * sizeof(float);
}
/// Shared memory of one tile product: staging and results overlap (results are written after the last step).
template <class T>
__host__ __device__ constexpr std::size_t tile_smem_bytes(int a_tiles, int b_tiles, int products) {
  const std::size_t s = staging_bytes<T>(a_tiles, b_tiles), r = result_bytes(products);
  return s > r ? s : r;
}

/// Maps a run index to the start of a row-major run in global memory.
///   direct:   base + i·ld                           (i <  split)
///   split:    base2 + (i − split)·ld                (i >= split: a K-concatenation [G; U])
///   gathered: base + gather[i].token·ld, optionally scaled by gather[i].weight
/// Runs outside [0, count) read as zeros.
template <class Src>
struct row_runs {
  const Src* base = nullptr;
  const Src* base2 = nullptr;
  std::int64_t ld = 0;
  int count = 0;
  int split = 0x7fffffff;
  const dispatch_row* gather = nullptr;
  bool scaled = false;

  __device__ const Src* at(int i, float& scale) const {
    scale = 1.0f;
    if (i < 0 || i >= count) return nullptr;
    if (gather != nullptr) {
      const dispatch_row r = gather[i];
      if (scaled) scale = r.weight;
      return base + static_cast<std::int64_t>(r.token) * ld;
    }
    if (i >= split) return base2 + static_cast<std::int64_t>(i - split) * ld;
    return base + static_cast<std::int64_t>(i) * ld;
  }
};

/// A logical operand of `rows` × K (rows = M for A, N for B). With `k_contiguous` each run is
/// one logical row and `extent` = K; otherwise each run is one k and `extent` = rows.
/// `coherent` operands were written earlier in the same launch by other blocks and are read
/// through L2 (ld.global.cg), never from a possibly stale L1 line.
template <class Src>
struct operand {
  row_runs<Src> runs;
  int extent = 0;
  bool k_contiguous = true;
  bool coherent = false;
};

template <class Src>
inline constexpr int vector_width = 16 / static_cast<int>(sizeof(Src));

template <class Src>
__device__ inline Src load_scalar(const Src* p, bool coherent) {
  return coherent ? __ldcg(p) : *p;
}

/// One 16-byte load (p is 16-byte aligned). Through a uint4 on the device, which becomes a
/// single LDG.128; by memcpy on the host, where reading floats through a uint4 would break
/// strict aliasing.
template <class Src>
__device__ inline void load_16_bytes(const Src* p, bool coherent, Src (&out)[vector_width<Src>]) {
#if defined(__CUDA_ARCH__)
  const uint4 raw = coherent ? __ldcg(reinterpret_cast<const uint4*>(p)) : *reinterpret_cast<const uint4*>(p);
  memcpy(out, &raw, sizeof(raw));
#else
  (void)coherent;
  std::memcpy(out, p, sizeof(out));
#endif
}

/// Loads `vector_width` consecutive elements of a run starting at `offset` as floats: one
/// 16-byte load when aligned and wholly inside the run, else element by element with zeros
/// past `extent`.
template <class Src>
__device__ inline void load_chunk(const Src* run, int offset, int extent, bool coherent,
                                  float (&v)[vector_width<Src>]) {
  constexpr int width = vector_width<Src>;
  if (run == nullptr || offset >= extent) {
    GROVE_UNROLL
    for (int u = 0; u < width; ++u) v[u] = 0.0f;
    return;
  }
  const Src* p = run + offset;
  if (offset + width <= extent && (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0) {
    Src e[width];
    load_16_bytes(p, coherent, e);
    GROVE_UNROLL
    for (int u = 0; u < width; ++u) v[u] = to_float(e[u]);
  } else {
    GROVE_UNROLL
    for (int u = 0; u < width; ++u) v[u] = offset + u < extent ? to_float(load_scalar(p + u, coherent)) : 0.0f;
  }
}

/// Stages rows [row0, row0 + Rows) × k [k0, k0 + tile_k) of an operand into shared memory as
/// s[row][k] (leading dimension tile_lds<T>), converting to T and applying a run's scale.
template <class T, int Rows, class Src>
__device__ inline void load_tile(T* s, const operand<Src>& op, int row0, int k0) {
  constexpr int width = vector_width<Src>;
  constexpr int lds = tile_lds<T>;
  if (op.k_contiguous) {
    constexpr int per_row = tile_k / width;
    for (int idx = static_cast<int>(threadIdx.x); idx < Rows * per_row; idx += tile_threads) {
      const int i = idx / per_row, c = (idx % per_row) * width;
      float scale;
      const Src* run = op.runs.at(row0 + i, scale);
      float v[width];
      load_chunk(run, k0 + c, op.extent, op.coherent, v);
      GROVE_UNROLL
      for (int u = 0; u < width; ++u) s[i * lds + c + u] = from_float<T>(v[u] * scale);
    }
  } else {
    constexpr int per_k = Rows / width;
    for (int idx = static_cast<int>(threadIdx.x); idx < tile_k * per_k; idx += tile_threads) {
      const int kk = idx / per_k, c = (idx % per_k) * width;
      float scale;
      const Src* run = op.runs.at(k0 + kk, scale);
      float v[width];
      load_chunk(run, row0 + c, op.extent, op.coherent, v);
      GROVE_UNROLL
      for (int u = 0; u < width; ++u) s[(c + u) * lds + kk] = from_float<T>(v[u] * scale);
    }
  }
}

/// Tile math: accumulate A[tile_m][tile_k] · B[tile_n][tile_k]ᵀ into per-thread accumulators,
/// then store them as fp32 C[tile_m][tile_ldc].
template <class T>
struct tile_math;

/// fp32: each thread owns rows ty + 8r (r < 8) and columns tx + 16c (c < 4) of the tile;
/// with the odd stride, the B reads of a half-warp hit 16 banks and the A reads broadcast.
template <>
struct tile_math<float> {
  struct accumulator {
    float v[8][4];
  };
  __device__ static void zero(accumulator& acc) {
    GROVE_UNROLL
    for (int r = 0; r < 8; ++r) GROVE_UNROLL
    for (int c = 0; c < 4; ++c) acc.v[r][c] = 0.0f;
  }
  __device__ static void multiply(accumulator& acc, const float* as, const float* bs) {
    constexpr int lds = tile_lds<float>;
    const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
    GROVE_UNROLL
    for (int kk = 0; kk < tile_k; ++kk) {
      float a[8], b[4];
      GROVE_UNROLL
      for (int r = 0; r < 8; ++r) a[r] = as[(ty + 8 * r) * lds + kk];
      GROVE_UNROLL
      for (int c = 0; c < 4; ++c) b[c] = bs[(tx + 16 * c) * lds + kk];
      GROVE_UNROLL
      for (int r = 0; r < 8; ++r) GROVE_UNROLL
      for (int c = 0; c < 4; ++c) acc.v[r][c] += a[r] * b[c];  // one FFMA on the device
    }
  }
  __device__ static void store(const accumulator& acc, float* c_tile) {
    const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
    GROVE_UNROLL
    for (int r = 0; r < 8; ++r) GROVE_UNROLL
    for (int c = 0; c < 4; ++c) c_tile[(ty + 8 * r) * tile_ldc + tx + 16 * c] = acc.v[r][c];
  }
};

/// BF16: tensor cores through WMMA 16×16×16 (fp32 accumulators). Warp w owns the 32 × 32
/// quarter (w / 2, w % 2) of the tile: 2 × 2 fragments.
template <>
struct tile_math<bfloat16> {
  using fragment_c = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  using fragment_a = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, bfloat16, nvcuda::wmma::row_major>;
  using fragment_b = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bfloat16, nvcuda::wmma::col_major>;
  struct accumulator {
    fragment_c f[2][2];
  };
  __device__ static void zero(accumulator& acc) {
    GROVE_UNROLL
    for (int i = 0; i < 2; ++i) GROVE_UNROLL
    for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc.f[i][j], 0.0f);
  }
  __device__ static void multiply(accumulator& acc, const bfloat16* as, const bfloat16* bs) {
    constexpr int lds = tile_lds<bfloat16>;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    GROVE_UNROLL
    for (int kk = 0; kk < tile_k; kk += 16) {
      fragment_a a[2];
      fragment_b b[2];
      GROVE_UNROLL
      for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(a[i], as + (wm + 16 * i) * lds + kk, lds);
      GROVE_UNROLL
      for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(b[j], bs + (wn + 16 * j) * lds + kk, lds);
      GROVE_UNROLL
      for (int i = 0; i < 2; ++i) GROVE_UNROLL
      for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc.f[i][j], a[i], b[j], acc.f[i][j]);
    }
  }
  __device__ static void store(const accumulator& acc, float* c_tile) {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    GROVE_UNROLL
    for (int i = 0; i < 2; ++i) GROVE_UNROLL
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(c_tile + (wm + 16 * i) * tile_ldc + wn + 16 * j, acc.f[i][j], tile_ldc,
                                      nvcuda::wmma::mem_row_major);
  }
};

/// Products p < NP: C_p = A[pa[p]] (rows a_row0 ..) · B[pb[p]] (rows b_row0 ..)ᵀ summed over
/// k in [k_begin, k_end) (k_begin a multiple of tile_k; k_end is the operand's K or, for a
/// split, the next split's k_begin). On return C_p lies at result_tile(smem, p) and every
/// thread may read it. All threads of the block must call this (it synchronises).
template <class T, int NA, int NB, int NP, class SrcA, class SrcB>
__device__ void tile_products(unsigned char* smem, const operand<SrcA> (&a)[NA], int a_row0,
                              const operand<SrcB> (&b)[NB], int b_row0, const int (&pa)[NP], const int (&pb)[NP],
                              int k_begin, int k_end) {
  constexpr int lds = tile_lds<T>;
  T* as = reinterpret_cast<T*>(smem);
  T* bs = as + NA * tile_m * lds;
  typename tile_math<T>::accumulator acc[NP];
  GROVE_UNROLL
  for (int p = 0; p < NP; ++p) tile_math<T>::zero(acc[p]);
  for (int k0 = k_begin; k0 < k_end; k0 += tile_k) {
    GROVE_UNROLL
    for (int i = 0; i < NA; ++i) load_tile<T, tile_m>(as + i * tile_m * lds, a[i], a_row0, k0);
    GROVE_UNROLL
    for (int i = 0; i < NB; ++i) load_tile<T, tile_n>(bs + i * tile_n * lds, b[i], b_row0, k0);
    __syncthreads();
    GROVE_UNROLL
    for (int p = 0; p < NP; ++p) tile_math<T>::multiply(acc[p], as + pa[p] * tile_m * lds, bs + pb[p] * tile_n * lds);
    __syncthreads();
  }
  float* c = reinterpret_cast<float*>(smem);
  GROVE_UNROLL
  for (int p = 0; p < NP; ++p) tile_math<T>::store(acc[p], c + p * tile_m * tile_ldc);
  __syncthreads();
}

/// Result tile p of the last tile_products call.
__device__ inline float* result_tile(unsigned char* smem, int p) {
  return reinterpret_cast<float*>(smem) + p * tile_m * tile_ldc;
}

// ---- grid-scope signalling between blocks of one persistent launch -----------------------
/// Publishes this block's writes and bumps `counter` (call after __syncthreads, from one thread).
__device__ inline void signal_ready(int* counter) {
  __threadfence();
#if defined(__CUDA_ARCH__)
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(counter), "r"(1) : "memory");
#else  // host compilation (nvcc's host pass, the CPU emulation)
  std::atomic_ref<int>(*counter).fetch_add(1, std::memory_order_release);
#endif
}

__device__ inline int load_acquire(const int* p) {
#if defined(__CUDA_ARCH__)
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
#else
  return std::atomic_ref<int>(*const_cast<int*>(p)).load(std::memory_order_acquire);
#endif
}

/// Blocks until *counter >= target (all threads return together).
__device__ inline void wait_ready(const int* counter, int target) {
  if (threadIdx.x == 0)
    while (load_acquire(counter) < target) __nanosleep(64);
  __syncthreads();
}

// SwiGLU pieces as the CPU writes them (weights/swiglu.hpp), in fp32.
__host__ __device__ inline float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }
__host__ __device__ inline float silu(float z) { return z / (1.0f + expf(-z)); }
__host__ __device__ inline float silu_derivative(float z) {
  const float s = 1.0f / (1.0f + expf(-z));
  return s * (1.0f + z * (1.0f - s));
}

}  // namespace detail
}  // namespace cuda
GROVE_END_NAMESPACE

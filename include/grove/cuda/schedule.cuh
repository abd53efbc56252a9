// grove CUDA backend: tile sizes and the persistent schedule's bookkeeping. Everything here is
// __host__ __device__ plain arithmetic, so the tests check it on the host even without a GPU.
#pragma once

#include <bit>
#include <cstdint>

#include "grove/cuda/common.cuh"
#include "grove/cuda/device_weights.cuh"

GROVE_BEGIN_NAMESPACE
namespace cuda {
namespace detail {

// ---- tiles (docs/cuda.md, "Tiles") -------------------------------------------------------
inline constexpr int tile_m = 64;         ///< rows of a tile (tokens for the expert products)
inline constexpr int tile_n = 64;         ///< columns of a tile (output features)
inline constexpr int tile_k = 32;         ///< reduction depth staged in shared memory per step
inline constexpr int tile_threads = 128;  ///< 4 warps; each owns a 32 x 32 quarter of the tile
static_assert(tile_m == tile_n,
              "GROVE_CUDA_SCHEDULE_ASSUMES_SQUARE_TILES (weight-gradient items count n-tiles by either)");

// ---- routing chunks (docs/cuda.md, "Plan on the device") ---------------------------------
/// Tokens per routing chunk. Each chunk keeps, per bucket (MLP), a bitmask over its
/// chunk_tokens · k (token, slot) positions: k words of 32 bits.
inline constexpr int chunk_tokens = 32;
inline constexpr int routing_threads = 128;  ///< 4 warps, one token at a time each
inline constexpr int max_top_k = 32;         ///< one warp lane per pick

__host__ __device__ inline int popcount32(std::uint32_t v) {
#ifdef __CUDA_ARCH__
  return __popc(v);
#else
  return std::popcount(v);
#endif
}

/// Number of set bits of `words` strictly before bit `position`: the rank of a (token, slot)
/// position among the chunk's positions that went to the same bucket. Because positions are
/// numbered token-major, ranks follow ascending token order: the device plan is stable.
__host__ __device__ inline int rank_in_mask(const std::uint32_t* words, int position) {
  const int word = position / 32;
  int rank = 0;
  for (int w = 0; w < word; ++w) rank += popcount32(words[w]);
  const int bit = position % 32;
  return rank + (bit ? popcount32(words[word] & ((1u << bit) - 1u)) : 0);
}

/// Where the row of (chunk, bucket, position) goes in the dispatch array: the bucket's offset,
/// the rows earlier chunks put in that bucket, and the rank inside this chunk.
/// Layouts: chunk_base [buckets][chunks], chunk_masks [chunks][buckets][top_k words].
__host__ __device__ inline int dispatch_position(const int* offsets, const int* chunk_base,
                                                 const std::uint32_t* chunk_masks, int buckets, int chunks, int top_k,
                                                 int chunk, int bucket, int position) {
  const std::int64_t cell = static_cast<std::int64_t>(chunk) * buckets + bucket;
  return offsets[bucket] + chunk_base[static_cast<std::int64_t>(bucket) * chunks + chunk] +
         rank_in_mask(chunk_masks + cell * top_k, position);
}

/// Exclusive prefix over the chunks of one bucket (layout [buckets][chunks]); returns the
/// bucket's total. The reference for what the scan kernel computes with warp scans.
__host__ __device__ inline int prefix_over_chunks(const int* chunk_counts, int* chunk_base, int chunks, int bucket) {
  int running = 0;
  for (int c = 0; c < chunks; ++c) {
    const std::int64_t at = static_cast<std::int64_t>(bucket) * chunks + c;
    chunk_base[at] = running;
    running += chunk_counts[at];
  }
  return running;
}

// ---- the schedule ------------------------------------------------------------------------
/// Five exclusive prefix arrays of E + G + 1 entries each, in one int buffer:
///   offsets    rows per MLP (the dispatch offsets)
///   row_tiles  ceil(rows / tile_m): the row tiles whose readiness counters gate later items
///   gate_up    gate/up items:  row tiles × ceil(N_m / tile_n)
///   down       down (or input-gradient) items: row tiles × ceil(H / tile_n)
///   weights    weight-gradient items: (rows > 0) × ceil(N_m / tile_n) × ceil(H / tile_n)
template <class Int>
struct schedule_arrays {
  Int* offsets = nullptr;
  Int* row_tiles = nullptr;
  Int* gate_up = nullptr;
  Int* down = nullptr;
  Int* weights = nullptr;
  int mlps = 0;

  __host__ __device__ static schedule_arrays at(Int* base, int mlps) {
    schedule_arrays s;
    s.mlps = mlps;
    s.offsets = base;
    s.row_tiles = base + (mlps + 1);
    s.gate_up = base + 2 * (mlps + 1);
    s.down = base + 3 * (mlps + 1);
    s.weights = base + 4 * (mlps + 1);
    return s;
  }
  static constexpr int arrays = 5;
};

/// What MLP m with `rows` rows adds to each of the five prefix arrays.
/// (A plain aggregate: the scan kernel keeps some in __shared__ memory.)
struct schedule_terms {
  int rows, row_tiles, gate_up, down, weights;

  __host__ __device__ static schedule_terms of(int m, int rows, const layer_dims& shape) {
    schedule_terms t{};
    const int h_tiles = ceil_div(shape.hidden, tile_n);
    const int nt = ceil_div(shape.intermediate(m), tile_n);
    t.rows = rows;
    t.row_tiles = ceil_div(rows, tile_m);
    t.gate_up = t.row_tiles * nt;
    t.down = t.row_tiles * h_tiles;
    t.weights = rows > 0 ? nt * h_tiles : 0;
    return t;
  }
  __host__ __device__ friend schedule_terms operator+(schedule_terms a, const schedule_terms& b) {
    a.rows += b.rows;
    a.row_tiles += b.row_tiles;
    a.gate_up += b.gate_up;
    a.down += b.down;
    a.weights += b.weights;
    return a;
  }
  __host__ __device__ friend schedule_terms operator-(schedule_terms a, const schedule_terms& b) {
    a.rows -= b.rows;
    a.row_tiles -= b.row_tiles;
    a.gate_up -= b.gate_up;
    a.down -= b.down;
    a.weights -= b.weights;
    return a;
  }
  /// Writes this running sum as entry m of the five arrays.
  __host__ __device__ void store(const schedule_arrays<int>& s, int m) const {
    s.offsets[m] = rows;
    s.row_tiles[m] = row_tiles;
    s.gate_up[m] = gate_up;
    s.down[m] = down;
    s.weights[m] = weights;
  }
};

/// Fills the schedule from the rows per MLP, serially: the reference for the scan kernel,
/// which computes the same prefixes in parallel.
__host__ __device__ inline void build_schedule(const int* rows_per_mlp, const layer_dims& shape,
                                               const schedule_arrays<int>& s) {
  schedule_terms sum{};
  for (int m = 0; m < s.mlps; ++m) {
    sum.store(s, m);
    sum = sum + schedule_terms::of(m, rows_per_mlp[m], shape);
  }
  sum.store(s, s.mlps);
}

/// Largest m in [0, buckets) with prefix[m] <= q, for prefix[0] <= q < prefix[buckets]: the
/// MLP a ticket falls in (never an empty one, since its successor's prefix would then be <= q).
__host__ __device__ inline int find_bucket(const int* prefix, int buckets, int q) {
  int lo = 0, hi = buckets - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= q)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

/// The kinds of work item of the two persistent kernels (docs/cuda.md, "Schedule").
enum class item_kind : int {
  done = -1,
  gate_up = 0,         ///< forward: h = silu(G x) ⊙ (U x) for a row tile × an intermediate tile
  down = 1,            ///< forward: y[token] += w · (D h) for a row tile × a hidden tile
  gate_up_grad = 2,    ///< backward: recompute g, u; dh = D^T dy; h, dg, du and the dw partials
  input_grad = 3,      ///< backward: dx[token] += G^T dg + U^T du for a row tile × a hidden tile
  weight_gate_up = 4,  ///< backward: ∂G, ∂U of an intermediate tile × a hidden tile (all rows of the MLP)
  weight_down = 5,     ///< backward: ∂D of a hidden tile × an intermediate tile (all rows of the MLP)
};

/// One work item: MLP `mlp`, tile coordinates (a, b) whose meaning depends on the kind
/// (gate_up, gate_up_grad: row tile, intermediate tile; down, input_grad: row tile, hidden tile;
/// weight_gate_up: intermediate tile, hidden tile; weight_down: hidden tile, intermediate tile).
struct work_item {
  item_kind kind = item_kind::done;
  int mlp = 0;
  int a = 0;
  int b = 0;
};

namespace schedule_detail {
__host__ __device__ inline work_item locate(item_kind kind, const int* prefix, int mlps, int q,
                                            int minor_tiles_of_mlp_n, const layer_dims& shape,
                                            bool minor_is_intermediate) {
  work_item w;
  w.kind = kind;
  w.mlp = find_bucket(prefix, mlps, q);
  const int local = q - prefix[w.mlp];
  const int minor = minor_is_intermediate ? ceil_div(shape.intermediate(w.mlp), tile_n) : minor_tiles_of_mlp_n;
  w.a = local / minor;
  w.b = local % minor;
  return w;
}
}  // namespace schedule_detail

/// Ticket q of the forward kernel: all gate/up items first, then all down items. A down item
/// waits for its row tile's gate/up items; since every gate/up ticket is handed out before any
/// down ticket and gate/up items never wait, the waits cannot deadlock.
__host__ __device__ inline work_item forward_item(int q, const schedule_arrays<const int>& s,
                                                  const layer_dims& shape) {
  const int m = s.mlps;
  const int h_tiles = ceil_div(shape.hidden, tile_n);
  if (q < s.gate_up[m]) return schedule_detail::locate(item_kind::gate_up, s.gate_up, m, q, 0, shape, true);
  q -= s.gate_up[m];
  if (q < s.down[m]) return schedule_detail::locate(item_kind::down, s.down, m, q, h_tiles, shape, false);
  return work_item{};
}

/// Ticket q of the backward kernel: gate/up-gradient items, then input-gradient items (wait for
/// their row tile), then weight-gradient items (wait for all rows of their MLP).
__host__ __device__ inline work_item backward_item(int q, const schedule_arrays<const int>& s,
                                                   const layer_dims& shape) {
  const int m = s.mlps;
  const int h_tiles = ceil_div(shape.hidden, tile_n);
  if (q < s.gate_up[m]) return schedule_detail::locate(item_kind::gate_up_grad, s.gate_up, m, q, 0, shape, true);
  q -= s.gate_up[m];
  if (q < s.down[m]) return schedule_detail::locate(item_kind::input_grad, s.down, m, q, h_tiles, shape, false);
  q -= s.down[m];
  if (q < s.weights[m]) {
    // intermediate tile major, hidden tile minor
    return schedule_detail::locate(item_kind::weight_gate_up, s.weights, m, q, h_tiles, shape, false);
  }
  q -= s.weights[m];
  if (q < s.weights[m]) {
    // hidden tile major, intermediate tile minor
    return schedule_detail::locate(item_kind::weight_down, s.weights, m, q, 0, shape, true);
  }
  return work_item{};
}

/// Upper bounds used to preallocate from the largest batch: a device-routed plan's row counts
/// stay on the device, so the host sizes every buffer from max_tokens, never from a batch.
struct capacity {
  int tokens = 0;
  int rows = 0;       ///< T·k expert rows + T·k adjugate rows (once per pick is the worst case)
  int row_tiles = 0;  ///< Σ_m ceil(rows_m / tile_m) <= rows / tile_m + (E + G)
  int chunks = 0;

  static capacity of(int max_tokens, int top_k, int mlps) {
    capacity c;
    c.tokens = max_tokens;
    c.rows = 2 * max_tokens * top_k;
    c.row_tiles = c.rows / tile_m + mlps + 1;
    c.chunks = ceil_div(max_tokens, chunk_tokens);
    return c;
  }
};

}  // namespace detail
}  // namespace cuda
GROVE_END_NAMESPACE

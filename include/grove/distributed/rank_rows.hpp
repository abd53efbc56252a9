#pragma once

// A batch's rows across the ranks of a communicator (docs/distributed.md): the contiguous,
// nearly equal blocks in rank order that `mpirun grove run` and the expert-parallel training
// example split a batch into, and every rank's rows gathered back in rank order (the router
// gradient's sum over every token reads them so, and so do the tool and the example).

#include <algorithm>
#include <cstring>
#include <span>
#include <vector>

#include "grove/config/dynamic.hpp"
#include "grove/distributed/communicator.hpp"
#include "grove/error.hpp"
#include "grove/weights/tensor_types.hpp"

GROVE_BEGIN_NAMESPACE

/// The first of rank `rank`'s rows when `total` rows are split into `ranks` contiguous blocks in
/// rank order, the first total mod ranks blocks one row longer; rank `ranks` gives `total`.
[[nodiscard]] inline index first_row_of_rank(index total, int ranks, int rank) {
  return static_cast<index>(rank) * (total / ranks) + std::min<index>(rank, total % ranks);
}

/// Every rank's rows [T_r, cols], concatenated in rank order, on every rank. Collective.
template <class T>
[[nodiscard]] row_matrix<T> gather_rows_in_rank_order(communicator& comm, std::type_identity_t<const_rows_ref<T>> rows) {
  const index cols = rows.cols();
  std::vector<T> own(static_cast<std::size_t>(rows.size()));
  for (index r = 0; r < rows.rows(); ++r)
    std::copy_n(rows.data() + r * rows.outerStride(), cols, own.data() + r * cols);
  const std::vector<T> all = gather_in_rank_order(comm, std::span<const T>(own));
  detail::require(cols > 0 ? all.size() % static_cast<std::size_t>(cols) == 0 : all.empty(), "grove: the ranks sent ",
                  all.size(), " values, which are not whole rows of ", cols);
  row_matrix<T> out(cols > 0 ? static_cast<index>(all.size()) / cols : 0, cols);
  if (!all.empty()) std::memcpy(out.data(), all.data(), all.size() * sizeof(T));
  return out;
}

GROVE_END_NAMESPACE

#pragma once

#include <type_traits>

#include <Eigen/Core>

#include "grove/version.hpp"

GROVE_BEGIN_NAMESPACE

/// Row-major dense matrix: PyTorch's layout, so a [out, in] nn.Linear weight maps without a copy.
template <class Scalar>
using row_matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Column vector of run-time length.
template <class Scalar>
using vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// A map over row-major memory; `matrix_map<const float>` is read-only, `matrix_map<float>` writable.
template <class T>
using matrix_map = Eigen::Map<std::conditional_t<std::is_const_v<T>, const row_matrix<std::remove_const_t<T>>,
                                                 row_matrix<T>>>;

/// A map over a contiguous vector.
template <class T>
using vector_map =
    Eigen::Map<std::conditional_t<std::is_const_v<T>, const vector<std::remove_const_t<T>>, vector<T>>>;

/// What the layer accepts as a batch of tokens: any row-major [T, H] block (a row_matrix, a
/// Map over caller memory, a block of either) without copying.
template <class Scalar>
using const_rows_ref = Eigen::Ref<const row_matrix<Scalar>>;

/// Writable row-major [T, n] block.
template <class Scalar>
using rows_ref = Eigen::Ref<row_matrix<Scalar>>;

GROVE_END_NAMESPACE

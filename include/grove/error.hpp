#pragma once

#include <stdexcept>
#include <string>

#include "grove/version.hpp"

GROVE_BEGIN_NAMESPACE

/// The one exception type grove throws for bad input: wrong shapes, missing tensors, corrupt
/// files, invalid configurations. The message names the offending tensor or setting together
/// with what was expected and what was found.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
/// Throws grove::error with `message` when `condition` is false. Used for runtime checks of
/// what cannot be checked at compile time (shapes read from files, dynamic sizes).
inline void require(bool condition, const std::string& message) {
  if (!condition) throw error(message);
}
}  // namespace detail

GROVE_END_NAMESPACE

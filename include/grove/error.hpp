#pragma once

#include <concepts>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

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

/// Longest text, in bytes, that an error message quotes from its input (a name, a value, a
/// line of JSON). A file may hold a 100 MB tensor name or a value nested a million levels deep;
/// quoting it whole would make the message itself the problem.
inline constexpr std::size_t max_quoted_bytes = 200;

/// `text` when it has at most `limit` bytes, else its first `limit` bytes (cut at a UTF-8
/// character boundary) followed by "… (N bytes)".
inline std::string excerpt(std::string_view text, std::size_t limit = max_quoted_bytes) {
  if (text.size() <= limit) return std::string(text);
  std::size_t cut = limit;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;  // a continuation byte
  return std::string(text.substr(0, cut)) + "\u2026 (" + std::to_string(text.size()) + " bytes)";
}

/// Appends one part of an error message: text as it is, numbers in decimal.
inline void append_message_part(std::string& out, std::string_view text) { out.append(text); }
inline void append_message_part(std::string& out, char c) { out.push_back(c); }
template <class Number>
  requires(std::is_arithmetic_v<Number> && !std::same_as<Number, char> && !std::same_as<Number, bool>)
void append_message_part(std::string& out, Number value) {
  out.append(std::to_string(value));
}

/// Builds the message from its parts and throws. Kept out of line of the check so that the
/// check itself is a compare and a branch.
template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::string message;
  (append_message_part(message, parts), ...);
  throw error(message);
}

/// Throws grove::error when `condition` is false. The message is given as parts (text and
/// numbers) and is built only on failure, so a passing check never allocates: the steady-state
/// passes (runner forward and backward, route_into) promise no heap allocation.
///
///   require(x.cols() == H, "grove: input x has ", x.cols(), " columns, expected ", H);
template <class... Parts>
void require(bool condition, const Parts&... parts) {
  if (!condition) [[unlikely]]
    fail(parts...);
}

}  // namespace detail

GROVE_END_NAMESPACE

#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <system_error>

#include <nlohmann/json.hpp>

#include "grove/error.hpp"
#include "grove/io/messages.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// Deepest nesting of arrays and objects grove accepts in JSON it reads (safetensors headers,
/// checkpoint indexes, config.json). Real files nest 3 or 4 levels; a hostile one may nest a
/// million, and anything that walks a value recursively (nlohmann's dump(), comparisons) would
/// overflow the stack on it. So the depth is bounded before any such code runs.
inline constexpr int max_json_depth = 64;

/// The byte offset in `text` of the bracket that opens level `limit` + 1, or npos when JSON
/// `text` nests arrays and objects at most `limit` deep. One linear pass, no recursion:
/// brackets inside strings do not count. On text that is not JSON the answer may be npos where
/// a parser would stop at a syntax error first; up to the first syntax error, this scan and a
/// JSON parser agree on where strings begin and end, so the parser never nests deeper.
inline std::size_t json_too_deep_at(std::string_view text, int limit = max_json_depth) {
  int depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;  // the escaped character, whatever it is
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) return i;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return std::string_view::npos;
}

/// Reads a small text file (config.json, an index) whole; throws naming the file. `what` says
/// what the file is for messages ("config", "checkpoint index").
inline std::string read_text_file(const std::filesystem::path& path, const char* what,
                                  std::uintmax_t limit = 256u << 20) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw error(std::string("grove: ") + what + " " + quoted(path) + " does not exist");
  if (std::filesystem::is_directory(path, ec)) throw error(std::string("grove: ") + what + " " + quoted(path) + " is a directory");
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) throw error(std::string("grove: cannot read ") + what + " " + quoted(path) + ": " + ec.message());
  if (size > limit)
    throw error(std::string("grove: ") + what + " " + quoted(path) + " is too large (" + std::to_string(size) +
                " bytes; the limit is " + std::to_string(limit) + ")");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw error(std::string("grove: cannot open ") + what + " " + quoted(path));
  std::string text(static_cast<std::size_t>(size), '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  if (static_cast<std::uintmax_t>(in.gcount()) != size) throw error(std::string("grove: cannot read ") + what + " " + quoted(path));
  return text;
}

/// Parses JSON `text` read from `path` after bounding its depth (max_json_depth), turning
/// nlohmann's exceptions into grove::error naming the file.
inline nlohmann::json parse_json_text(const std::string& text, const std::filesystem::path& path, const char* what) {
  if (const std::size_t at = json_too_deep_at(text); at != std::string_view::npos)
    throw error(std::string("grove: ") + what + " " + quoted(path) + " nests arrays and objects deeper than " +
                std::to_string(max_json_depth) + " levels (at byte " + std::to_string(at) + ")");
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw error(std::string("grove: ") + what + " " + quoted(path) + " is not valid JSON (" + excerpt(e.what()) + ")");
  }
}

/// Reads and parses the JSON file at `path` (parse_json_text).
inline nlohmann::json parse_json_file(const std::filesystem::path& path, const char* what) {
  return parse_json_text(read_text_file(path, what), path, what);
}

/// A JSON value as an error message quotes it: compact, cut to max_quoted_bytes. Only for values
/// parsed by parse_json_text (their depth is bounded, so dump() is safe); bytes that are not
/// UTF-8 are replaced rather than thrown on.
inline std::string json_excerpt(const nlohmann::json& value) {
  return excerpt(value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

}  // namespace detail
GROVE_END_NAMESPACE

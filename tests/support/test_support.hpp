// Helpers shared by grove's tests: scratch directories, random matrices, bitwise comparison.
// Each test area includes this one header instead of keeping its own copy.
#pragma once

#include <grove/config/dynamic.hpp>
#include <grove/weights/random.hpp>
#include <grove/weights/tensor_types.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <system_error>
#include <type_traits>

#include <sys/wait.h>

namespace grove_test {

/// A fresh directory under the system temp directory, removed with everything in it.
/// `dir / "name"` is the path of a file in it, as a string (so it concatenates into commands).
class temp_dir {
 public:
  temp_dir() {
    static std::atomic<int> counter{0};
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    path_ = std::filesystem::temp_directory_path() /
            ("grove-test-" + std::to_string(stamp) + "-" + std::to_string(counter++));
    std::filesystem::create_directories(path_);
  }
  ~temp_dir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  [[nodiscard]] std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

/// A file's bytes ("" when it cannot be read).
inline std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// What a shell command did: its exit status (-1 when it did not exit normally, e.g. a crash)
/// and what it printed.
struct command_result {
  int code = -1;
  std::string out, err;
};

/// Runs `command` through the shell with stdout and stderr captured in files of `dir`.
inline command_result run_command(const std::string& command, const temp_dir& dir) {
  const std::string out = dir / "stdout.txt", err = dir / "stderr.txt";
  const int status = std::system((command + " >'" + out + "' 2>'" + err + "'").c_str());
  command_result r;
  r.code = (status != -1 && WIFEXITED(status)) ? WEXITSTATUS(status) : -1;
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

/// A [rows, cols] matrix of N(0, stddev²) draws, reproducible from `seed`.
template <class Scalar>
grove::row_matrix<Scalar> random_matrix(grove::index rows, grove::index cols, std::uint64_t seed,
                                        double stddev = 1.0) {
  grove::detail::normal_generator gen(seed);
  grove::row_matrix<Scalar> m(rows, cols);
  for (grove::index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(stddev * gen.normal());
  return m;
}

/// True when a and b (Eigen matrices or spans of one element type) hold the same values, bit
/// for bit: the determinism tests' comparison.
template <class A, class B>
bool same_bits(const A& a, const B& b) {
  static_assert(std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(a.data())>>,
                               std::remove_cv_t<std::remove_pointer_t<decltype(b.data())>>>,
                "same_bits compares buffers of one element type");
  if constexpr (requires { a.rows(); b.rows(); }) {
    if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  }
  const auto n = static_cast<std::size_t>(a.size());
  return n == static_cast<std::size_t>(b.size()) &&
         (n == 0 || std::memcmp(a.data(), b.data(), sizeof(*a.data()) * n) == 0);
}

}  // namespace grove_test

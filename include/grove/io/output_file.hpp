#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <system_error>
#include <utility>

#include <fcntl.h>
#include <unistd.h>

#include "grove/error.hpp"
#include "grove/io/messages.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// A file written under a temporary name beside its destination, then renamed over it: a
/// reader of the destination sees the old file or the whole new one, never half of it, and a
/// failed or abandoned write leaves the destination as it was.
///
/// The temporary is `<destination>.<16 hex digits>.grove-partial` in the destination's
/// directory (a rename does not cross file systems), created with O_CREAT | O_EXCL |
/// O_NOFOLLOW: it is always a new file of this writer's own. A name already taken, by another
/// writer or by a link planted there, is never opened; another random name is tried instead.
/// The new file gets the usual permissions (0666 less the umask). POSIX only.
class output_file {
 public:
  explicit output_file(std::filesystem::path destination) : destination_(std::move(destination)) {
    for (int attempt = 0; attempt < 100; ++attempt) {
      temporary_ = destination_;
      temporary_ += "." + random_suffix() + ".grove-partial";
      fd_ = ::open(temporary_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
      if (fd_ >= 0) return;
      const int reason = errno;
      temporary_.clear();  // not ours: never removed
      if (reason != EEXIST) fail(reason, "cannot create a temporary file beside");
    }
    throw error("grove: cannot create a temporary file beside " + quoted(destination_) +
                ": 100 random names were all taken");
  }
  ~output_file() { discard(); }
  output_file(const output_file&) = delete;
  output_file& operator=(const output_file&) = delete;

  [[nodiscard]] const std::filesystem::path& destination() const { return destination_; }
  /// The temporary file's path (until commit()).
  [[nodiscard]] const std::filesystem::path& temporary() const { return temporary_; }

  /// Appends `bytes` bytes; throws grove::error naming the destination on a failed write.
  void write(const void* data, std::size_t bytes) {
    const auto* p = static_cast<const char*>(data);
    while (bytes > 0) {
      const ::ssize_t n = ::write(fd_, p, bytes);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) fail(n < 0 ? errno : EIO, "failed writing");
      p += n;
      bytes -= static_cast<std::size_t>(n);
    }
  }

  /// Closes the temporary and renames it over the destination (atomically on POSIX).
  void commit() {
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) fail(errno, "failed writing");
    if (std::rename(temporary_.c_str(), destination_.c_str()) != 0) fail(errno, "cannot write");
    temporary_.clear();
  }

 private:
  /// 64 bits from the process, the time, a counter and the random device (when it has one).
  static std::string random_suffix() {
    static std::atomic<std::uint64_t> counter{0};
    std::uint64_t z = static_cast<std::uint64_t>(::getpid()) * 0x9E3779B97F4A7C15ull ^
                      static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                      (counter.fetch_add(1) << 32);
    try {
      std::random_device device;
      z ^= (static_cast<std::uint64_t>(device()) << 32) ^ device();
    } catch (...) {
      // no random device: the process, time and counter still differ between writers
    }
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;  // splitmix64's finalizer
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    char text[17];
    std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(z));
    return text;
  }

  /// Removes the temporary, if any (a failed or abandoned write).
  void discard() noexcept {
    if (fd_ >= 0) ::close(std::exchange(fd_, -1));
    if (!temporary_.empty()) ::unlink(temporary_.c_str());
    temporary_.clear();
  }

  [[noreturn]] void fail(int reason, const char* what) {
    discard();
    throw error(std::string("grove: ") + what + " " + quoted(destination_) + ": " + std::strerror(reason));
  }

  std::filesystem::path destination_;
  std::filesystem::path temporary_;
  int fd_ = -1;
};

}  // namespace detail
GROVE_END_NAMESPACE

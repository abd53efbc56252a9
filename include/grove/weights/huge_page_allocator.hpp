#pragma once

#include <cstddef>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "grove/version.hpp"

GROVE_BEGIN_NAMESPACE

namespace detail {

/// Allocator for large weight buffers: blocks of 2 MiB or more are 2 MiB aligned and, on Linux,
/// advised to use transparent huge pages (MADV_HUGEPAGE). The expert kernels stream weights at
/// memory bandwidth; with 4 KiB pages every 4 KiB of a multi-gigabyte layer is a TLB miss and
/// a page walk whose tables do not fit in cache (docs/performance.md, "Memory").
template <class T>
struct huge_page_allocator {
  using value_type = T;
  static constexpr std::size_t huge_page = std::size_t(2) << 20;

  huge_page_allocator() = default;
  template <class U>
  huge_page_allocator(const huge_page_allocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor)

  T* allocate(std::size_t n) {
    const std::size_t bytes = n * sizeof(T);
    if (bytes < huge_page) return static_cast<T*>(::operator new(bytes, std::align_val_t{64}));
    void* p = ::operator new(rounded(bytes), std::align_val_t{huge_page});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)::madvise(p, rounded(bytes), MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    const std::size_t bytes = n * sizeof(T);
    if (bytes < huge_page)
      ::operator delete(p, std::align_val_t{64});
    else
      ::operator delete(p, std::align_val_t{huge_page});
  }
  template <class U>
  friend bool operator==(const huge_page_allocator&, const huge_page_allocator<U>&) noexcept {
    return true;
  }

 private:
  static std::size_t rounded(std::size_t bytes) { return (bytes + huge_page - 1) / huge_page * huge_page; }
};

}  // namespace detail

GROVE_END_NAMESPACE

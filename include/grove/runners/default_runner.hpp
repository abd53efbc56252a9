#pragma once

#include <memory>
#include <mutex>
#include <utility>

#include "grove/runners/cpu_runner.hpp"
#include "grove/runners/runner.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {
struct default_runner_slot {
  std::mutex mutex;
  std::shared_ptr<runner> current;
};
inline default_runner_slot& default_runner_storage() {
  static default_runner_slot slot;
  return slot;
}
}  // namespace detail

/// The runner a layer gets when it is given none: a cpu_runner with every hardware thread and
/// the best instruction set, made on first use. A convenience, visible and replaceable: a layer
/// shows its runner (layer::runner()) and takes another (layer::set_runner, layer::on), and
/// set_default_runner() changes what later layers get. Layers that share it run one at a time;
/// give concurrent layers runners of their own.
[[nodiscard]] inline std::shared_ptr<runner> default_runner() {
  auto& slot = detail::default_runner_storage();
  std::lock_guard<std::mutex> lock(slot.mutex);
  if (!slot.current) slot.current = std::make_shared<cpu_runner>();
  return slot.current;
}

/// Replaces the runner default_runner() returns (nullptr: a fresh cpu_runner on next use).
/// Layers made earlier keep the runner they hold.
inline void set_default_runner(std::shared_ptr<runner> replacement) {
  auto& slot = detail::default_runner_storage();
  std::lock_guard<std::mutex> lock(slot.mutex);
  slot.current = std::move(replacement);
}

GROVE_END_NAMESPACE

// The project's one error type for user and I/O errors, and a formatting throw helper.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace lowbit {

// Thrown for every user or I/O error (bad file, bad flag, shape mismatch).
// The message is one line: what happened, and where possible a hint.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace lowbit

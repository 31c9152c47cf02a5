// Host-side CUDA runtime helpers usable from C++ code that is not compiled by nvcc.
#pragma once

#include <string>
#include <vector>

namespace longattn {
namespace cuda {

int device_count();
std::vector<std::string> device_names();
int runtime_version();
const char* error_string(int status);

// Makes `device` current for its lifetime and restores the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace cuda
}  // namespace longattn

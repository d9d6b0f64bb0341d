// The driver gate of the GPU kernels (see kld_gpu_gate.h) and its exported test entry points.
#include "cc/kernels/kld_gpu_gate.h"

#include <dirent.h>
#include <dlfcn.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace tf_kld {
namespace {

// "12.8" for 12080.
std::string CudaVersion(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// The oldest Linux driver branch for a CUDA version, where it is known (NVIDIA's release notes).
std::string DriverBranch(int v) {
  struct Branch {
    int cuda, driver;
  };
  static const Branch kBranches[] = {{13000, 580}, {12090, 575}, {12080, 570}, {12060, 560}, {12050, 555},
                                     {12040, 550}, {12030, 545}, {12020, 535}, {12000, 525}};
  for (const Branch& b : kBranches) {
    if (b.cuda == v) return " (R" + std::to_string(b.driver) + " or newer)";
  }
  return "";
}

// Test hooks: tests/test_cuda_build.py stands in for a machine with GPUs and an old driver.
bool TestOverride(const char* name, int* value) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return false;
  *value = std::atoi(text);
  return true;
}

}  // namespace

GpuGateDecision GpuGate(int driver_version, int gpus, int needed) {
  GpuGateDecision d;
  if (gpus <= 0 || driver_version >= needed) return d;
  d.register_kernels = false;
  const std::string need = "a driver for CUDA " + CudaVersion(needed) + DriverBranch(needed) +
                           " (cudaDriverGetVersion >= " + std::to_string(needed) + ")";
  const std::string found =
      driver_version > 0 ? "this machine's CUDA driver supports CUDA " + CudaVersion(driver_version) +
                               " (cudaDriverGetVersion " + std::to_string(driver_version) + ")"
                         : "this machine shows " + std::to_string(gpus) +
                               " GPU(s) but no usable CUDA driver (libcuda.so.1 did not load or report a "
                               "version)";
  d.reason = found + ", and the library's GPU kernels need " + need +
             ". Its GPU kernels are not registered: ops placed on a GPU run as the pure-TensorFlow "
             "composite under implementation('auto'). Upgrade the driver to use them.";
  return d;
}

int ProbeDriverVersion() {
  int version = 0;
  if (TestOverride("TF_KLD_TEST_DRIVER_VERSION", &version)) return version;
  // The driver API, not the runtime: TensorFlow's runtime stub would load its libcudart first, and
  // cuDriverGetVersion needs no cuInit (which would break CUDA in processes forked later).
  void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (lib == nullptr) return 0;
  using DriverGetVersion = int (*)(int*);
  auto get = reinterpret_cast<DriverGetVersion>(dlsym(lib, "cuDriverGetVersion"));
  if (get == nullptr || get(&version) != 0) version = 0;
  // Not dlclose'd: TensorFlow loads the same library for its GPUs.
  return version;
}

int ProbeGpuCount() {
  int count = 0;
  if (TestOverride("TF_KLD_TEST_GPU_COUNT", &count)) return count;
  if (DIR* dev = opendir("/dev")) {
    while (const dirent* e = readdir(dev)) {
      const char* digits = e->d_name + 6;  // after "nvidia"
      if (std::strncmp(e->d_name, "nvidia", 6) == 0 && *digits != '\0' &&
          std::strspn(digits, "0123456789") == std::strlen(digits)) {
        ++count;
      }
    }
    closedir(dev);
  }
  struct stat st;
  if (count == 0 && stat("/dev/dxg", &st) == 0) count = 1;  // WSL 2: GPUs behind one device
  return count;
}

}  // namespace tf_kld

// For tests and tf_kld.gpu_info() (ctypes). reason: a buffer of reason_size bytes (may be null).
extern "C" __attribute__((visibility("default"))) int TfKldGpuGate(int driver_version, int gpus, int needed,
                                                                   char* reason, int reason_size) {
  const tf_kld::GpuGateDecision d = tf_kld::GpuGate(driver_version, gpus, needed);
  if (reason != nullptr && reason_size > 0) std::snprintf(reason, reason_size, "%s", d.reason.c_str());
  return d.register_kernels ? 1 : 0;
}

extern "C" __attribute__((visibility("default"))) int TfKldCudaDriverVersion() {
  return tf_kld::ProbeDriverVersion();
}

extern "C" __attribute__((visibility("default"))) int TfKldGpuCount() { return tf_kld::ProbeGpuCount(); }

// The driver gate of the GPU kernels: whether this machine's CUDA driver can run the library's device
// code. nvcc 13 device code (PTX ISA 9.0, cubin ABI 8) needs a driver for CUDA 13.0 (R580+), while
// TensorFlow itself runs on R525+; with an older driver every launch would fail, so the GPU kernels
// are then not registered and TensorFlow, or tf_kld's dispatch, uses something else.
//
// The decision is a pure function (GpuGate), exported for tests with the probe's inputs
// (TfKldGpuGate, TfKldCudaDriverVersion, TfKldGpuCount). No CUDA headers: the driver is found with
// dlopen, so this file is the same in CPU and CUDA builds.
#ifndef TF_KLD_CC_KERNELS_KLD_GPU_GATE_H_
#define TF_KLD_CC_KERNELS_KLD_GPU_GATE_H_

#include <string>

namespace tf_kld {

struct GpuGateDecision {
  bool register_kernels = true;
  std::string reason;  // empty when registering; else why not, naming the driver found and needed
};

// driver_version: as cudaDriverGetVersion gives it (e.g. 12080 for CUDA 12.8), 0 when there is no
// usable driver. gpus: the GPUs this machine shows (0: none). needed: the version the device code
// needs (e.g. 13000). No GPU at all registers the kernels, as a build without the gate did: nothing
// can place an op on a GPU then.
__attribute__((visibility("hidden"))) GpuGateDecision GpuGate(int driver_version, int gpus, int needed);

// The installed driver's version (libcuda.so.1's cuDriverGetVersion, no cuInit), 0 without one.
__attribute__((visibility("hidden"))) int ProbeDriverVersion();

// GPUs visible to this process without initialising CUDA (/dev/nvidia<N>, or 1 for WSL's /dev/dxg).
__attribute__((visibility("hidden"))) int ProbeGpuCount();

// GpuGate for this machine and the library's device code, decided once (CUDA builds only: defined
// in kld_kernels.cc); every family's GPU kernels register only where it says so.
__attribute__((visibility("hidden"))) const GpuGateDecision& GpuGateAtLoad();

}  // namespace tf_kld

#endif  // TF_KLD_CC_KERNELS_KLD_GPU_GATE_H_

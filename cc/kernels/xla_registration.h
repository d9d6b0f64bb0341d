// Registration of tf_kld's XLA lowerings (kld_xla.cc, distill_xla.cc), shared by every op family.
//
// XLA builds its table of compilation kernels once per process, from the REGISTER_XLA_OP entries
// present then (at the first TensorFlow op, usually before this library loads), and aborts the
// process (LOG(FATAL)) when a second library registers an op that is there already. So the library
// never uses REGISTER_XLA_OP: on load it has XLA build its table (a no-op when built already), and
// from then on, the table being final, registers its kernels for each XLA backend itself, unless a
// kernel for one of the ops is registered there already (another copy of this library). Each family
// calls RegisterXlaKernels once per copy, from a function-local static run by a static initialiser;
// copies do not interleave: the dynamic loader runs static initialisers under its lock.
#ifndef TF_KLD_CC_KERNELS_XLA_REGISTRATION_H_
#define TF_KLD_CC_KERNELS_XLA_REGISTRATION_H_

#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>

#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "tensorflow/core/framework/kernel_def.pb.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tf_kld {
namespace xla_registration {

using Factory = tensorflow::OpKernel* (*)(tensorflow::OpKernelConstruction*);

struct Kernel {
  const char* op;
  Factory factory;
};

template <typename Op>
tensorflow::OpKernel* Create(tensorflow::OpKernelConstruction* ctx) {
  return new Op(ctx);
}

inline bool HasKernel(const std::string& op, const std::string& device) {
  const tensorflow::KernelList kernels = tensorflow::GetRegisteredKernelsForOp(op);
  for (const tensorflow::KernelDef& def : kernels.kernel()) {
    if (def.device_type() == device) return true;
  }
  return false;
}

// Our types that `backend` compiles: those of XLA's own Log lowering there, which XLA registered
// for the intersection of Log's types and the backend's.
inline std::vector<tensorflow::DataType> BackendTypes(const std::string& backend) {
  std::vector<tensorflow::DataType> types;
  const tensorflow::KernelList log = tensorflow::GetRegisteredKernelsForOp("Log");
  for (const tensorflow::KernelDef& def : log.kernel()) {
    if (def.device_type() != backend) continue;
    for (const auto& constraint : def.constraint()) {
      if (constraint.name() != "T") continue;
      for (tensorflow::DataType type : {tensorflow::DT_HALF, tensorflow::DT_BFLOAT16,
                                        tensorflow::DT_FLOAT, tensorflow::DT_DOUBLE}) {
        const auto& allowed = constraint.allowed_values().list().type();
        if (std::find(allowed.begin(), allowed.end(), type) != allowed.end()) types.push_back(type);
      }
    }
  }
  return types;
}

inline void Register(const char* op, const std::string& backend,
                     const std::vector<tensorflow::DataType>& types, Factory factory) {
  auto* def = new tensorflow::KernelDef();
  def->set_op(op);
  def->set_device_type(backend);
  auto* constraint = def->add_constraint();
  constraint->set_name("T");
  for (tensorflow::DataType type : types) {
    constraint->mutable_allowed_values()->mutable_list()->add_type(type);
  }
  // The registrar keeps a pointer to the KernelDef: both live as long as the process.
  new tensorflow::kernel_factory::OpKernelRegistrar(def, "XlaOpKernel", factory);
}

// Registers `kernels` (ops with a type attr "T") for every XLA backend that has none of them yet;
// returns how many backends it registered for (0 when another copy of the library had).
inline int RegisterXlaKernels(std::initializer_list<Kernel> kernels) {
  // Some other build registered these ops with REGISTER_XLA_OP: XLA owns them; adding ours would
  // duplicate its kernels.
  for (const std::string& op : tensorflow::XlaOpRegistry::GetAllRegisteredOps()) {
    for (const Kernel& k : kernels) {
      if (op == k.op) return 0;
    }
  }
  // From here on XLA's table is final: nothing can register in between or after.
  tensorflow::XlaOpRegistry::RegisterCompilationKernels();
  int backends = 0;
  for (const std::string& backend : tensorflow::XlaOpRegistry::BackendNames()) {
    if (std::any_of(kernels.begin(), kernels.end(),
                    [&](const Kernel& k) { return HasKernel(k.op, backend); })) {
      continue;  // another copy
    }
    const std::vector<tensorflow::DataType> types = BackendTypes(backend);
    if (types.empty()) continue;
    for (const Kernel& k : kernels) Register(k.op, backend, types, k.factory);
    ++backends;
  }
  return backends;
}

}  // namespace xla_registration
}  // namespace tf_kld

#endif  // TF_KLD_CC_KERNELS_XLA_REGISTRATION_H_

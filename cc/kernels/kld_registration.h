// Kernel registration that tolerates a second copy of the library in the process.
//
// TensorFlow accepts an op registered twice (tf.load_op_library of a copy of _kld_ops.so after
// tf_kld loaded the original), but two identical kernel registrations make every later lookup of
// the op fail ("Multiple OpKernel registrations match NodeDef"). TF_KLD_REGISTER_KERNEL is
// REGISTER_KERNEL_BUILDER that registers only when no kernel for the same op, device, label and
// type constraints exists yet, so the copy adds nothing and the first copy's kernels keep working.
#ifndef TF_KLD_CC_KERNELS_KLD_REGISTRATION_H_
#define TF_KLD_CC_KERNELS_KLD_REGISTRATION_H_

#include <memory>

#include "tensorflow/core/framework/kernel_def.pb.h"
#include "tensorflow/core/framework/kernel_def_builder.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tf_kld {

inline bool SameKernel(const tensorflow::KernelDef& a, const tensorflow::KernelDef& b) {
  if (a.op() != b.op() || a.device_type() != b.device_type() || a.label() != b.label() ||
      a.constraint_size() != b.constraint_size()) {
    return false;
  }
  for (int i = 0; i < a.constraint_size(); ++i) {
    if (a.constraint(i).SerializeAsString() != b.constraint(i).SerializeAsString()) return false;
  }
  return true;
}

// Registers Kernel for `built` (a KernelDefBuilder's Build(), owned) unless an equal KernelDef is
// registered already.
template <typename Kernel>
bool RegisterKernelOnce(const tensorflow::KernelDef* built, const char* class_name) {
  std::unique_ptr<const tensorflow::KernelDef> def(built);
  const tensorflow::KernelList existing = tensorflow::GetRegisteredKernelsForOp(def->op());
  for (const tensorflow::KernelDef& other : existing.kernel()) {
    if (SameKernel(other, *def)) return false;
  }
  // The registrar keeps the KernelDef; both live as long as the process.
  new tensorflow::kernel_factory::OpKernelRegistrar(
      def.release(), class_name,
      [](tensorflow::OpKernelConstruction* ctx) -> tensorflow::OpKernel* { return new Kernel(ctx); });
  return true;
}

}  // namespace tf_kld

#define TF_KLD_REGISTER_KERNEL(builder, ...) TF_KLD_REGISTER_KERNEL_ID(__COUNTER__, builder, __VA_ARGS__)
#define TF_KLD_REGISTER_KERNEL_ID(id, builder, ...) TF_KLD_REGISTER_KERNEL_AT(id, builder, __VA_ARGS__)
#define TF_KLD_REGISTER_KERNEL_AT(id, builder, ...)                                  \
  static const bool tf_kld_kernel_registered_##id [[maybe_unused]] =                 \
      ::tf_kld::RegisterKernelOnce<__VA_ARGS__>(::tensorflow::register_kernel::builder.Build(), \
                                                #__VA_ARGS__)

#endif  // TF_KLD_CC_KERNELS_KLD_REGISTRATION_H_

// Reading the ops' attributes, shared by the CPU, CUDA and XLA kernels.
#ifndef TF_KLD_CC_KERNELS_KLD_ATTRS_H_
#define TF_KLD_CC_KERNELS_KLD_ATTRS_H_

#include <charconv>
#include <string>
#include <system_error>

#include "cc/kernels/kld.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tf_kld {

// The clip epsilon: the float attr, or for float64 the exact double carried as text in
// epsilon_f64 (a TensorFlow float attr holds only 32 bits).
inline absl::StatusOr<double> ReadEpsilon(tensorflow::OpKernelConstruction* ctx) {
  tensorflow::DataType type;
  TF_RETURN_IF_ERROR(ctx->GetAttr("T", &type));
  float eps32 = 0.0f;
  TF_RETURN_IF_ERROR(ctx->GetAttr("epsilon", &eps32));
  std::string eps64;
  TF_RETURN_IF_ERROR(ctx->GetAttr("epsilon_f64", &eps64));
  if (type != tensorflow::DT_DOUBLE || eps64.empty()) return eps32;
  // std::from_chars, not strtod: it ignores the C locale (a comma-decimal LC_NUMERIC made strtod
  // stop at the '.') and parses subnormals (strtod flags them ERANGE).
  double eps = 0.0;
  const char* const end = eps64.data() + eps64.size();
  const std::from_chars_result parsed = std::from_chars(eps64.data(), end, eps);
  if (parsed.ec != std::errc() || parsed.ptr != end) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attr epsilon_f64 must be a decimal number such as \"1e-07\", got \"", eps64, "\""));
  }
  return eps;
}

inline absl::StatusOr<Wrt> ReadWrt(tensorflow::OpKernelConstruction* ctx) {
  std::string wrt;
  TF_RETURN_IF_ERROR(ctx->GetAttr("wrt", &wrt));
  return wrt == "y_true" ? Wrt::kYTrue : Wrt::kYPred;
}

}  // namespace tf_kld

#endif  // TF_KLD_CC_KERNELS_KLD_ATTRS_H_
